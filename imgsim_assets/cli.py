"""``imgsim``: ingest batch folders, search the index, write the sample corpus."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from imgsim_assets.serve.config import ServeConfig

SERVE = ServeConfig(assets_dir=Path("assets"), images_dir=Path("images"))  # the service's defaults

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


def _above_the_bar(line: str) -> None:
    """A progress line on stderr, above the terminal's progress bar (tqdm's, while it runs)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def encoder_settings(settings, fallback_random: bool = False):
    """``settings`` with its weights checked before any run: an unknown model, a device that is
    not there, no checkpoint for ``auto`` that could be found or fetched, or a checkpoint that
    does not fit the model cannot heal by retrying, so they stop here (exit 2, the message
    once). With ``fallback_random``, no checkpoint for ``auto`` means random weights instead.
    A first ``auto`` fetches the checkpoint here, with a progress bar."""
    from dataclasses import replace

    from imgsim_assets.core import weights
    from imgsim_assets.core.models import EncoderSpec

    EncoderSpec(model=settings.model, weights=settings.weights)  # names a model that exists
    try:  # before torch is imported: no weights to be had is said within a second
        weights.check(settings.model, settings.weights, progress=_above_the_bar)
    except FileNotFoundError as e:
        if not (fallback_random and settings.weights == "auto"):
            raise
        print(f"{e}\n\nfalling back to random weights (--fallback-random).", file=sys.stderr)
        settings = replace(settings, weights="random")
    from imgsim_assets.core.encoder import resolve_device

    try:
        resolve_device(settings.device)
    except RuntimeError as e:
        raise ValueError(f"{e} (IMGSIM_DEVICE={settings.device})") from None
    if settings.weights == "random":
        print(RANDOM_BANNER, file=sys.stderr)
    return settings


def cmd_ingest(args) -> int:
    from imgsim_assets.settings import Settings

    settings = encoder_settings(Settings.from_env(), fallback_random=args.fallback_random)
    if args.ray is not None:
        from dataclasses import replace

        settings = replace(settings, ray_address=args.ray)
    from imgsim_assets.definitions import build_definitions
    from imgsim_assets.ingest import IngestRunning, ingest

    instance = _instance(settings)
    try:
        report = ingest(build_definitions(settings), instance, settings.images_dir, retrain=args.retrain,
                        milvus=args.milvus)
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


def open_searcher(args, settings):
    """The searcher for ``--backend``: the published faiss_index, or the Milvus collection."""
    from imgsim_assets.core.search import FaissSearcher, MilvusSearcher

    if args.backend == "milvus":
        from imgsim_assets.core import milvus

        uri = args.milvus_uri or settings.milvus
        return (MilvusSearcher(milvus.connect(uri), args.collection or milvus.COLLECTION, device=settings.device,
                               backend=settings.encoder_backend, dtype=settings.encoder_dtype,
                               allow_other_weights=args.allow_other_weights), f"Milvus {uri}")
    searcher = FaissSearcher.open(settings.assets_dir, device=settings.device, backend=settings.encoder_backend,
                                  dtype=settings.encoder_dtype, allow_other_weights=args.allow_other_weights)
    return searcher, f"{searcher.num_vectors} images indexed, {searcher.info.get('factory')}"


def cmd_search(args) -> int:
    if (args.image is None) == (args.id is None):
        print("imgsim search: give either an IMAGE file or --id IMAGE_ID", file=sys.stderr)
        return 2
    if args.server:
        return _search_server(args)
    from imgsim_assets.core import images
    from imgsim_assets.core.search import UnknownImage
    from imgsim_assets.settings import Settings

    box = images.Box.parse(args.box) if args.box else None  # a malformed box fails before the model loads
    settings = Settings.from_env()
    searcher, source = open_searcher(args, settings)
    filters = search_filters(args)
    if filters is None:
        return 2
    try:
        searcher.check_filters(filters)
    except ValueError as e:
        print(f"imgsim search: {e}", file=sys.stderr)
        return 2
    if searcher.random_weights:
        print(RANDOM_BANNER, file=sys.stderr)
    used = {}
    if args.id is not None and box is None:
        try:
            hits = searcher.search_ids([args.id], args.k, args.nprobe, filters=filters)[0]
        except UnknownImage as e:
            print(f"imgsim search: {e}", file=sys.stderr)
            return 2
        query = f"image_id {args.id} ({searcher.describe(args.id)[0]})"
    else:
        if args.id is not None:  # a region of an indexed image: its file is the query
            path, _, copies = searcher.describe(args.id)
            if not copies:
                print(f"imgsim search: {UnknownImage(args.id)}", file=sys.stderr)
                return 2
            file, root = images.source_path(settings.images_dir, path), settings.images_dir
            query = f"image_id {args.id} ({path})"
        else:
            file, root, query = args.image, None, args.image
        answer = searcher.search_files([file], args.k, args.nprobe, filters=filters, root=root, box=box)[0]
        if not answer.ok:
            print(f"cannot search with {file}: {answer.record.reason}: {answer.record.message}", file=sys.stderr)
            return 2
        hits = answer.hits
        if box is not None:  # as used: cut at the picture's edges
            used["box"] = list(box.clip(*answer.record.size).coords)
            query += f", box {images.Box(*used['box']).text}"
    return _print_answer(args, {"query": query, **used, "backend": args.backend, "hits": [h.to_dict() for h in hits]},
                         source, settings.images_dir)


def search_filters(args):
    """The search's filters from its options (batches included); None, and the reason said,
    when one is not valid."""
    from imgsim_assets.core.filters import Filters

    try:
        return Filters.parse(args.batch or (), args.taken_after, args.taken_before, args.camera, args.min_pixels)
    except ValueError as e:
        print(f"imgsim search: {e}", file=sys.stderr)
        return None


def _search_server(args) -> int:
    """The query answered by a running ``imgsim serve`` (no model, no index loaded here)."""
    from imgsim_assets.serve import client

    from imgsim_assets.settings import Settings

    filters = search_filters(args)
    if filters is None:
        return 2
    photo = [(name, value) for name, value in filters.params() if name != "batch"]
    token = args.token or Settings.from_env().serve_token
    try:
        if args.id is not None:
            answer = client.search_id(args.server, args.id, args.k, args.nprobe, filters.batches, token,
                                      filters=photo, box=args.box)
            query = f"image_id {args.id}"
        else:
            answer = client.search_file(args.server, args.image, args.k, args.nprobe, filters.batches, token,
                                        filters=photo, box=args.box)
            query = args.image
    except client.ServerError as e:
        print(f"imgsim search: {e}", file=sys.stderr)
        return 2
    source = f"{answer['num_vectors']} images indexed, {args.server}, {answer['took_ms']:.1f} ms"
    return _print_answer(args, {"query": query, "backend": "server", **answer}, source)


def _print_answer(args, answer: dict, source: str, images_dir: Path | None = None) -> int:
    """An answer as JSON (``--json``) or as a table; paths under ``images_dir`` when given."""
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(f"query: {answer['query']}   ({source})")
    print(f"{'rank':>4}  {'score':>6}  {'inner':>7}  {'image_id':>20}  path")
    for h in answer["hits"]:
        extra = f"  (+{h['copies'] - 1} identical)" if h.get("copies", 1) > 1 else ""
        path = images_dir / h["path"] if images_dir is not None else h["path"]
        print(f"{h['rank']:>4}  {h['score']:6.4f}  {h['inner_product']:7.4f}  {h['image_id']:>20}  {path}{extra}")
    return 0


def serve_token(args, settings) -> str:
    """The service's token: ``--token-file`` or ``$IMGSIM_SERVE_TOKEN_FILE`` (first line), else
    ``$IMGSIM_SERVE_TOKEN``, else ``--token`` (which ``ps`` shows to every user: warned)."""
    path = args.token_file or settings.serve_token_file
    if path:
        try:
            token = Path(path).expanduser().read_text().strip().splitlines()[0].strip()
        except (OSError, IndexError) as e:
            raise ValueError(f"cannot read a token from {path}: {e}") from None
        if not token:
            raise ValueError(f"the token file {path} is empty")
        return token
    if args.token:
        print("imgsim serve: a token given with --token is visible to every user of this machine (ps); "
              "prefer --token-file or IMGSIM_SERVE_TOKEN", file=sys.stderr)
        return args.token
    return settings.serve_token


def cmd_serve(args) -> int:
    import uvicorn

    from imgsim_assets.serve.app import Unguarded, create_app
    from imgsim_assets.instance import review_database_url
    from imgsim_assets.serve.connections import guarded_protocol
    from imgsim_assets.settings import Settings

    settings = Settings.from_env()
    config = ServeConfig(assets_dir=settings.assets_dir, images_dir=settings.images_dir, host=args.host,
                         port=args.port, token=serve_token(args, settings), device=settings.device,
                         backend=settings.encoder_backend, dtype=settings.encoder_dtype,
                         max_upload_bytes=int(args.max_upload_mb * 2**20), reload_interval_s=args.reload_interval,
                         allow_other_weights=args.allow_other_weights, allowed_hosts=tuple(args.allowed_host or ()),
                         max_decode_bytes=int(args.max_decode_mb * 2**20),
                         review_db=review_database_url(settings), keep_rules=settings.keep_rules)
    try:
        app = create_app(config)
    except Unguarded as e:
        print(f"imgsim serve: {e}", file=sys.stderr)
        return 2
    service = app.state.service
    loaded = service.live.current
    if loaded.searcher.random_weights:
        print(RANDOM_BANNER, file=sys.stderr)
    print(f"imgsim serve: {loaded.searcher.num_vectors} images (index {loaded.version}) on http://{args.host}:{args.port}/",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                http=guarded_protocol(config.header_timeout_s, config.max_connections), timeout_keep_alive=5,
                h11_max_incomplete_event_size=16 * 1024)
    return 0


def cmd_weights(args) -> int:
    """``list``: every variant, its size and licence, and where it is (or "not fetched");
    ``fetch``: into the cache now (to copy to an offline machine); ``which``: what would load."""
    from imgsim_assets.core import dinov2, weights
    from imgsim_assets.settings import Settings

    settings = Settings.from_env()
    name = args.model or settings.model
    if name not in dinov2.VARIANTS:
        raise ValueError(f"unknown DINOv2 model {name!r}; choose one of {', '.join(dinov2.VARIANTS)}")
    if args.action == "list":
        rows = [{"model": a.model, "size": f"{a.size_bytes / 1e6:,.0f} MB", "licence": a.license,
                 "source": f"hf:{a.repo}", "here": a.found or "not fetched"} for a in weights.available()]
        print_table(rows, ["model", "size", "licence", "source", "here"])
        return 0
    if args.action == "fetch":
        path = weights.find_local(name) or weights.fetch(name, progress=_above_the_bar)
        weights.fits(name, path)
        print(f"{name}: {path}\n  {weights.fingerprint(str(path.resolve()), name)}")
        return 0
    if settings.weights == "auto" and weights.find_local(name) is None:
        hub = weights.Hub.from_env()
        print(f"{name}: not fetched; the first use fetches {hub.endpoint}/{weights.hub_repo(name)} into "
              f"{hub.cache_dir}" + (" (but offline mode is on)" if hub.offline else ""))
        return 1
    resolved = weights.check(name, settings.weights)
    print(f"{name}: {resolved}\n  {weights.fingerprint(resolved, name)}")
    return 0


def print_table(rows: list[dict], columns: list[str]) -> None:
    """``rows`` as an aligned text table of ``columns``, numbers right-aligned."""
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(cell(r[c]).rjust(w) if isinstance(r[c], (int, float)) else cell(r[c]).ljust(w)
                        for c, w in zip(columns, widths)))


def _given(options: dict) -> dict:
    """The options given on the command line; the rest keep the asset config's defaults."""
    return {k: v for k, v in options.items() if v is not None}


def _run_locked(settings, jobs: list[tuple[str, dict | None]]) -> str | None:
    """Run Dagster jobs in order, as ingest runs them and under its lock; the first failure, or None."""
    from imgsim_assets.definitions import build_definitions
    from imgsim_assets.ingest import ingest_lock, run_job

    defs = build_definitions(settings)
    instance = _instance(settings)
    with ingest_lock(instance):
        for name, ops_config in jobs:
            message = run_job(instance, defs.resolve_job_def(name), ops_config=ops_config)
            if message is not None:
                return f"{name}: {message}"
    return None


def cmd_evaluate(args) -> int:
    from imgsim_assets.assets.evaluation import EVAL_COLUMNS
    from imgsim_assets.core.evaluation import CopyDetectionReport
    from imgsim_assets.core.storage import artifact_path
    from imgsim_assets.settings import Settings

    settings = Settings.from_env()
    config = _given({"sample_size": args.sample_size, "seed": args.seed, "duplicate_precision": args.precision,
                     "families": args.families})
    failed = _run_locked(settings, [("evaluate_index", {"retrieval_eval": {"config": config}}), ("analyze_index", None)])
    if failed:
        print(f"imgsim evaluate: {failed}", file=sys.stderr)
        return 1
    result = CopyDetectionReport.from_dict(json.loads(artifact_path(settings.assets_dir, "retrieval_eval", suffix=".json").read_text()))
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    if result.random_weights:
        print(RANDOM_BANNER, file=sys.stderr)
    print(f"{result.overall.copies} edited copies of {result.sources} indexed images, searched in faiss_index:")
    print_table(result.table(), EVAL_COLUMNS)
    t = result.threshold
    print(f"duplicate threshold {t.value:.4f}: precision {t.precision:.3f} (target {result.target_precision}"
          f"{'' if t.reached else ', not reached'}), recall {t.recall:.3f}; on held-out images "
          f"precision {result.held_out_precision:.3f}, recall {result.held_out_recall:.3f}")
    print("grouping: " + ", ".join(f"{g.rule} purity {g.purity:.3f} completeness {g.completeness:.3f}"
                                   for g in result.groupings) + f" -> {result.grouping}")
    return 0


def cmd_compare_encoders(args) -> int:
    from imgsim_assets.assets.evaluation import COMPARISON_COLUMNS
    from imgsim_assets.core import comparison
    from imgsim_assets.core.storage import artifact_path
    from imgsim_assets.settings import Settings

    settings = Settings.from_env()
    options = args.option or list(comparison.ComparisonSettings.options)
    for option in options:
        comparison.parse_option(option)  # a typo fails here, before the model loads
    config = _given({"options": options, "sample_size": args.sample_size, "database_size": args.database_size,
                     "seed": args.seed})
    failed = _run_locked(settings, [("compare_encoders", {"encoder_comparison": {"config": config}})])
    if failed:
        print(f"imgsim compare-encoders: {failed}", file=sys.stderr)
        return 1
    import pyarrow.parquet as pq

    rows = pq.read_table(artifact_path(settings.assets_dir, "encoder_comparison", suffix=".parquet")).to_pylist()
    if args.json:
        print(json.dumps(rows))
        return 0
    if any(r["random_weights"] for r in rows):
        print(RANDOM_BANNER, file=sys.stderr)
    print_table(rows, COMPARISON_COLUMNS)
    return 0


def cmd_sample_data(args) -> int:
    from imgsim_assets.core.sample_data import write_sample_corpus
    from imgsim_assets.settings import Settings

    data_dir = Path(args.data_dir) if args.data_dir else Settings.from_env().data_dir
    folders = write_sample_corpus(data_dir)
    for name, folder in folders.items():
        print(f"{name}: {folder} ({sum(1 for p in folder.iterdir() if p.suffix in ('.png', '.jpg'))} images)")
    return 0


def cmd_duplicates(args) -> int:
    """Review and resolve near-duplicate groups: ``list``, ``accept``, ``plan``, ``apply``,
    ``undo``, ``applies``, ``export`` (see :mod:`core.review`, :mod:`core.setaside`)."""

    from imgsim_assets.core import review, setaside
    from imgsim_assets.instance import review_database_url
    from imgsim_assets.settings import Settings

    settings = Settings.from_env()
    decisions = review.Decisions(review_database_url(settings))
    rules = review.KeepRules.parse(args.keep or settings.keep_rules)
    place = setaside.Place(settings.data_dir, settings.images_dir)

    def current() -> review.Review:  # read the manifests and pairs only for the actions that need them
        return review.load(settings.assets_dir, decisions, rules)

    if args.action == "list":
        groups, total = current().page(args.page, args.per_page, args.min_score)
        for g in groups:
            print(f"group {g.number}: {len(g.members)} images, every pair >= {g.score:.4f}")
            for m in g.members:
                mark = "*" if m["suggested"] == review.KEEP else " "
                print(f"  {mark} {m['image_id']:>20}  {m['decision'] or 'undecided':<10} {m['path']}")
        print(f"page {args.page} of {max(1, -(-total // args.per_page))}: {total} groups (* suggested keeper: "
              f"{', '.join(rules.rules)})")
    elif args.action == "accept":
        if args.min_score is None:
            raise ValueError("accept needs --min-score S: the suggestion is taken for every group at least S similar")
        groups, images = current().accept(args.min_score)
        print(f"accepted the suggestion for {groups} groups: {images} images decided")
    elif args.action in ("plan", "apply"):
        resumed = setaside.resume(decisions, place) if args.action == "apply" else []
        for outcome in resumed:
            print(f"finished the interrupted apply {outcome.apply_id}: {outcome.moved} files")
        moves = setaside.plan(decisions, current().photos, place)
        for m in moves:
            print(f"{'move' if args.action == 'apply' else 'would move'} {m.source} -> {m.target}")
        if args.action == "apply":
            outcome = setaside.apply(decisions, place, moves, review.LOCAL)
            for source, why in outcome.failed:
                print(f"could not move {source}: {why}", file=sys.stderr)
            print(f"apply {outcome.apply_id}: moved {outcome.moved} files to {settings.data_dir / setaside.SET_ASIDE_DIR}; "
                  "the next ingest removes them from the index (undo: imgsim duplicates undo "
                  f"{outcome.apply_id})")
            return 1 if outcome.failed else 0
        print(f"{len(moves)} files ({sum(m.bytes or 0 for m in moves) / 2**20:.1f} MiB) would move; nothing moved")
    elif args.action == "undo":
        if not args.all and not args.apply_id:
            raise ValueError("undo needs an apply id (imgsim duplicates applies) or --all")
        outcomes = setaside.undo(decisions, place, None if args.all else [args.apply_id], review.LOCAL)
        for o in outcomes:
            print(f"apply {o.apply_id}: put back {o.moved} files" + (f", {len(o.failed)} could not" if o.failed else ""))
            for source, why in o.failed:
                print(f"could not put back {source}: {why}", file=sys.stderr)
        return 1 if any(o.failed for o in outcomes) else 0
    elif args.action == "applies":
        for a in setaside.applies(decisions):
            print(f"{a['apply_id']}  {a['state']:<9} {a['started_at']}  {a['applied_by']}  {a['files']}")
    elif args.action == "export":
        text = (review.export_csv if args.format == "csv" else review.export_json)(current())
        if args.output:
            from imgsim_assets.core.storage import atomic_path

            with atomic_path(args.output) as tmp:
                Path(tmp).write_text(text)
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgsim", description="Image similarity index on Dagster.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="register new batch folders and materialize everything missing or stale")
    p.add_argument("--retrain", action="store_true", help="refit PCA and centroids (rebuilds every shard)")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="run the model on a Ray cluster: host:port of its "
                   "head, ray://host:10001, or auto (default: $IMGSIM_RAY_ADDRESS; empty: in this process)")
    p.add_argument("--milvus", action="store_true", help="also upsert changed batches into Milvus "
                   "(milvus_collection; $IMGSIM_MILVUS_URI or a Milvus Lite file)")
    p.add_argument("--fallback-random", action="store_true",
                   help="with IMGSIM_WEIGHTS=auto and no checkpoint found, use random weights (demo)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("search", help="nearest indexed images of IMAGE (or of an indexed image, --id)")
    p.add_argument("image", nargs="?", help="an image file to search with")
    p.add_argument("--id", type=int, default=None, help="search with an indexed image, by its image_id")
    p.add_argument("--box", default=None, metavar="X0,Y0,X1,Y1", help="only this region of the image is the query, "
                   "in pixels of the picture as displayed (after EXIF rotation); cut at its edges, at least 8 px a side")
    p.add_argument("--batch", action="append", default=None, help="only answer from this batch (repeatable)")
    p.add_argument("--taken-after", default=None, metavar="DATE",
                   help="only images taken at or after this camera-local time (EXIF), e.g. 2021-06-01 or 2021-06-01T18:00")
    p.add_argument("--taken-before", default=None, metavar="DATE", help="only images taken before this time (exclusive)")
    p.add_argument("--camera", default=None, metavar="TEXT",
                   help="only images whose camera make and model contain TEXT (case-insensitive: canon, 'iphone 12')")
    p.add_argument("--min-pixels", default=None, metavar="N", help="only images of at least N pixels (width × height)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists to visit (default: as tuned at build)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--backend", choices=["faiss", "milvus"], default="faiss",
                   help="faiss: the materialized faiss_index; milvus: the milvus_collection")
    p.add_argument("--milvus-uri", default=None, help="default: $IMGSIM_MILVUS_URI, else the data root's Milvus Lite file (milvus.db)")
    p.add_argument("--collection", default=None, help="Milvus collection (default: milvus_collection's, imgsim)")
    p.add_argument("--server", default=None, help="ask a running `imgsim serve` at this URL (milliseconds)")
    p.add_argument("--token", default=None, help="the server's token (default: $IMGSIM_SERVE_TOKEN)")
    p.add_argument("--allow-other-weights", action="store_true",
                   help="search even when the weights here differ from the index's (vectors are then not comparable)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("serve", help="the search service and web page over the live faiss_index")
    p.add_argument("--host", default=SERVE.host)
    p.add_argument("--port", type=int, default=SERVE.port)
    p.add_argument("--token", default=None, help="required on every request; needed to bind beyond loopback "
                   "(default: $IMGSIM_SERVE_TOKEN)")
    p.add_argument("--token-file", default=None, help="read the token from this file's first line "
                   "(default: $IMGSIM_SERVE_TOKEN_FILE); keeps it out of ps")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="a Host name to answer besides loopback's and the bound host (repeatable; '*': any)")
    p.add_argument("--max-upload-mb", type=float, default=SERVE.max_upload_bytes / 2**20,
                   help="larger uploads are refused (413)")
    p.add_argument("--max-decode-mb", type=float, default=SERVE.max_decode_bytes / 2**20, help="an upload whose "
                   "decoded pixels would take more (read from its header) is refused (422)")
    p.add_argument("--reload-interval", type=float, default=SERVE.reload_interval_s,
                   help="seconds between looks for a new index version")
    p.add_argument("--allow-other-weights", action="store_true",
                   help="serve even when the weights here differ from the index's (vectors are then not comparable)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("evaluate", help="how well the index finds edited copies of its own images; recalibrates "
                       "the duplicate threshold and regroups near_duplicates")
    p.add_argument("--sample-size", type=int, default=None, help="indexed images to copy (default: "
                   "retrieval_eval's config)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", type=float, default=None, help="precision the duplicate threshold must reach "
                   "(default: retrieval_eval's config)")
    p.add_argument("--family", dest="families", action="append", default=None,
                   help="only this edit family (repeatable; default all)")
    p.add_argument("--json", action="store_true", help="the whole evaluation as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare-encoders", help="the evaluation for several encoder options, one table")
    p.add_argument("--option", action="append", default=None,
                   help="POOLING@SIZE[:REDUCTION], e.g. cls@224:pca, mean@1050x700 (repeatable; default a standard set)")
    p.add_argument("--sample-size", type=int, default=None, help="images copied per option (default: "
                   "encoder_comparison's config)")
    p.add_argument("--database-size", type=int, default=None, help="images searched per option (default: "
                   "encoder_comparison's config)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare_encoders)

    p = sub.add_parser("duplicates", help="review near-duplicate groups and resolve them: set-aside files move to "
                       "<data dir>/set-aside/ (journaled, never deleted, undoable)")
    p.add_argument("action", choices=["list", "accept", "plan", "apply", "undo", "applies", "export"])
    p.add_argument("apply_id", nargs="?", default=None, help="undo: the apply to undo (see `applies`)")
    p.add_argument("--all", action="store_true", help="undo: every apply")
    p.add_argument("--min-score", type=float, default=None, help="list/accept: groups whose every pair is at "
                   "least this similar")
    p.add_argument("--keep", default=None, help="the ordered keep rules, comma-separated (default: "
                   "$IMGSIM_KEEP_RULES, else most_pixels,earliest_capture,oldest_file)")
    p.add_argument("--page", type=int, default=1)
    p.add_argument("--per-page", type=int, default=20)
    p.add_argument("--format", choices=["csv", "json"], default="json", help="export: the format")
    p.add_argument("--output", "-o", default=None, help="export: write to this file (default: stdout)")
    p.set_defaults(func=cmd_duplicates)

    p = sub.add_parser("weights", help="the DINOv2 checkpoints: list them, fetch one ahead of time, say which "
                       "would load")
    p.add_argument("action", choices=["list", "fetch", "which"])
    p.add_argument("model", nargs="?", default=None, help="default: $IMGSIM_MODEL")
    p.set_defaults(func=cmd_weights)

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
