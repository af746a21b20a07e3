"""``imgsim``: ingest batch folders, search the index, write the sample corpus."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

RANDOM_BANNER = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! RANDOM WEIGHTS: no pretrained DINOv2 checkpoint was found or configured.   !!
!! The pipeline runs end to end, but similarity only reflects low-level pixel  !!
!! statistics. Point IMGSIM_WEIGHTS at a checkpoint for real results.         !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


def _instance(settings):
    from dagster import DagsterInstance

    from imgsim_assets.instance import ensure_instance_yaml

    if not os.environ.get("DAGSTER_HOME"):
        os.environ["DAGSTER_HOME"] = str(settings.dagster_home)
    ensure_instance_yaml(os.environ["DAGSTER_HOME"])
    try:
        instance = DagsterInstance.get()
        instance.get_dynamic_partitions("image_batches")  # touches the storage: fail here, clearly
    except Exception as e:  # sqlite, postgres and their drivers raise many kinds
        raise ConnectionError(
            f"the Dagster instance in {os.environ['DAGSTER_HOME']} cannot be reached: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else e!r}. Is its database up?"
        ) from e
    return instance


def _warn_if_random(weights: str, model: str) -> None:
    from imgsim_assets.core import dinov2

    if weights == "random":
        print(RANDOM_BANNER, file=sys.stderr)
    elif weights == "auto":
        try:
            dinov2.find_pretrained(model)
        except FileNotFoundError as e:
            print(str(e), file=sys.stderr)


def cmd_ingest(args) -> int:
    from imgsim_assets.core import dinov2
    from imgsim_assets.settings import Settings

    settings = Settings.from_env()
    if args.fallback_random and settings.weights == "auto":
        try:
            dinov2.find_pretrained(settings.model)
        except FileNotFoundError as e:
            print(f"{e}\n\nfalling back to random weights (--fallback-random).", file=sys.stderr)
            # The code location reads its defaults from the environment, once, at import.
            os.environ["IMGSIM_WEIGHTS"] = "random"
            settings = Settings.from_env()
    _warn_if_random(settings.weights, settings.model)

    from imgsim_assets.definitions import defs
    from imgsim_assets.ingest import IngestRunning, ingest

    instance = _instance(settings)
    try:
        report = ingest(defs, instance, settings.images_dir, retrain=args.retrain, milvus=args.milvus)
    except IngestRunning as e:
        print(f"imgsim ingest: {e}; try again when it has finished", file=sys.stderr)
        return 3
    print(
        f"ingest: {len(report.embedded)} batch(es) embedded, {'retrained, ' if report.trained else ''}"
        f"{len(report.shards)} shard(s) built, index {'rebuilt' if report.merged else 'unchanged'}"
    )
    for label, message in report.failed.items():
        print(f"  failed: {label}: {message}", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_search(args) -> int:
    import pyarrow.compute as pc

    from imgsim_assets.core import tables
    from imgsim_assets.definitions import defs
    from imgsim_assets.settings import Settings

    if (args.image is None) == (args.id is None):
        print("imgsim search: give either an IMAGE file or --id IMAGE_ID", file=sys.stderr)
        return 2
    settings = Settings.from_env()
    if args.backend == "milvus":
        return _search_milvus(args, settings)
    instance = _instance(settings)
    index = defs.load_asset_value("faiss_index", instance=instance)
    if index.info.get("encoder", {}).get("weights_file") == "random":
        print(RANDOM_BANNER, file=sys.stderr)
    if args.id is not None:
        path, batch, _ = index.describe(args.id)
        if not path:
            print(f"imgsim search: image_id {args.id} is not in the index", file=sys.stderr)
            return 2
        embeddings = defs.load_asset_value("image_embeddings", instance=instance, partition_key=batch)
        rows = embeddings.filter(pc.equal(embeddings.column("image_id"), args.id))
        vectors, query = tables.embedding_matrix(rows)[:1], f"image_id {args.id} ({path})"
    else:
        vectors = _embed_query(args.image, index.info, settings)
        if vectors is None:
            return 2
        query = args.image
    hits = index.search(vectors, args.k, nprobe=args.nprobe, batches=args.batch)[0]
    if args.json:
        print(json.dumps({"query": query, "hits": [h.to_dict() for h in hits]}, indent=2))
        return 0
    print(f"query: {query}   ({index.num_vectors} images indexed, {index.info.get('factory')})")
    print(f"{'rank':>4}  {'score':>6}  {'inner':>7}  {'image_id':>20}  path")
    for h in hits:
        extra = f"  (+{h.copies - 1} identical)" if h.copies > 1 else ""
        print(f"{h.rank:>4}  {h.score:6.4f}  {h.inner_product:7.4f}  {h.image_id:>20}  {settings.images_dir / h.path}{extra}")
    return 0


def _embed_query(image: str, info: dict, settings):
    """The query's vector, made with the encoder and preprocessing in ``info``; None (and why,
    on stderr) when the file is rejected."""
    from imgsim_assets.core.search import embed_files, encoder_from_info, preprocess_from_info

    records, vectors = embed_files([image], encoder_from_info(info, device=settings.device), preprocess_from_info(info))
    if records[0].status != "ok":
        print(f"cannot search with {image}: {records[0].reason}: {records[0].message}", file=sys.stderr)
        return None
    return vectors


def _search_milvus(args, settings) -> int:
    from imgsim_assets.core import milvus
    from imgsim_assets.core.search import similarity_score

    if args.image is None:
        print("imgsim search --backend milvus: give an IMAGE file", file=sys.stderr)
        return 2
    uri = args.milvus_uri or settings.milvus_uri or str(settings.data_dir / "milvus.db")
    client = milvus.connect(uri)
    if not client.has_collection(args.collection):
        print(f"imgsim search: Milvus at {uri!r} has no collection {args.collection!r}; materialize "
              "milvus_collection first", file=sys.stderr)
        return 2
    vectors = _embed_query(args.image, {"encoder": milvus.provenance(client, args.collection)}, settings)
    if vectors is None:
        return 2
    hits = milvus.search(client, args.collection, vectors, args.k, batches=args.batch)[0]
    for rank, hit in enumerate(hits, start=1):
        hit.update(rank=rank, score=similarity_score(hit["inner_product"]))
    if args.json:
        print(json.dumps({"query": args.image, "backend": "milvus", "hits": hits}, indent=2))
        return 0
    print(f"query: {args.image}   (Milvus {uri}, collection {args.collection})")
    for hit in hits:
        print(f"{hit['rank']:>4}  {hit['score']:6.4f}  {hit['inner_product']:7.4f}  {hit['image_id']:>20}  "
              f"{settings.images_dir / hit['path']}")
    return 0


def cmd_sample_data(args) -> int:
    from imgsim_assets.core.sample_data import write_sample_corpus
    from imgsim_assets.settings import Settings

    data_dir = Path(args.data_dir) if args.data_dir else Settings.from_env().data_dir
    folders = write_sample_corpus(data_dir)
    for name, folder in folders.items():
        print(f"{name}: {folder} ({sum(1 for p in folder.iterdir() if p.suffix in ('.png', '.jpg'))} images)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgsim", description="Image similarity index on Dagster.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="register new batch folders and materialize everything missing or stale")
    p.add_argument("--retrain", action="store_true", help="refit PCA and centroids (rebuilds every shard)")
    p.add_argument("--milvus", action="store_true", help="also upsert changed batches into Milvus "
                   "(milvus_collection; $IMGSIM_MILVUS_URI or a Milvus Lite file)")
    p.add_argument("--fallback-random", action="store_true",
                   help="with IMGSIM_WEIGHTS=auto and no checkpoint found, use random weights (demo)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("search", help="nearest indexed images of IMAGE (or of an indexed image, --id)")
    p.add_argument("image", nargs="?", help="an image file to search with")
    p.add_argument("--id", type=int, default=None, help="search with an indexed image, by its image_id")
    p.add_argument("--batch", action="append", default=None, help="only answer from this batch (repeatable)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (default: as tuned at build)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--backend", choices=["faiss", "milvus"], default="faiss",
                   help="faiss: the materialized faiss_index; milvus: the milvus_collection")
    p.add_argument("--milvus-uri", default=None, help="default: $IMGSIM_MILVUS_URI, else <data>/milvus.db")
    p.add_argument("--collection", default="imgsim", help="Milvus collection")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("sample-data", help="write the bundled sample corpus (two batches and queries)")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=cmd_sample_data)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, PermissionError, ConnectionError) as e:
        print(f"imgsim {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
