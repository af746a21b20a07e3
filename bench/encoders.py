"""Encoder options compared on a published index's own images, and the time the evaluation takes.

    python -m bench.encoders [--data-dir data] [--option cls@224:pca ...] [--sample-size 100]
                             [--database-size 1000] [--device auto] [--json FILE]

Drives the code the ``compare_encoders`` job and the ``retrieval_eval`` asset run
(:func:`comparison.compare`, :func:`evaluation.detect_copies`) without Dagster, so it also runs
where only the model's dependencies are installed (a GPU machine). The index must have been
built (``imgsim ingest``) over ``<data-dir>/images``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from imgsim_assets.core.storage import DataLayout
from imgsim_assets.cli import print_table
from imgsim_assets.core import comparison
from imgsim_assets.core import evaluation as ev
from imgsim_assets.core.search import FaissSearcher, embed_files

COPIES, COMPARISON = ev.CopyDetectionSettings(), comparison.ComparisonSettings()
COLUMNS = ["option", "recall_at_1", "recall_at_10", "mean_average_precision", "threshold", "ms_per_image", "dim"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--option", action="append", default=None)
    parser.add_argument("--sample-size", type=int, default=COMPARISON.sample_size)
    parser.add_argument("--database-size", type=int, default=COMPARISON.database_size)
    parser.add_argument("--eval-sample-size", type=int, default=COPIES.sample_size)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on a GPU, fp32 on CPU")
    parser.add_argument("--eval-only", action="store_true", help="only retrieval_eval's path, no option comparison")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    data = Path(args.data_dir)
    searcher = FaissSearcher.open(DataLayout(data).assets, device=args.device, dtype=args.dtype, workers=args.workers)
    encoder = searcher.encoder
    device = torch.cuda.get_device_name(0) if encoder.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{searcher.num_vectors} indexed images; {encoder.spec.model} "
          f"{'RANDOM WEIGHTS' if searcher.random_weights else encoder.weights_file} on {device}, {encoder.dtype}")

    # retrieval_eval's path on the published index.
    ids = ev.sample_sources(searcher.index.catalog.column("image_id").to_numpy(), args.eval_sample_size,
                            COPIES.seed)
    sources = ev.indexed_sources(searcher.index, DataLayout(data).images, ids)
    began = time.perf_counter()
    result = ev.detect_copies(sources, lambda paths, root: embed_files(paths, encoder, searcher.preprocess, root=root,
                                                                  workers=args.workers),
                         ev.IndexSpace(searcher.index), random_weights=searcher.random_weights)
    seconds = time.perf_counter() - began
    print(f"retrieval_eval: {result.overall.copies} copies of {result.sources} images in {seconds:.1f} s "
          f"({1000 * seconds / result.overall.copies:.1f} ms per copy, embedding {result.embed_ms_per_copy:.1f}); "
          f"recall@1 {result.overall.recall_at_1:.3f}, mAP {result.overall.mean_average_precision:.3f}, "
          f"threshold {result.threshold.value:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "evaluation": result.to_dict(),
                                               "evaluation_seconds": seconds}, indent=1))

    if args.eval_only:
        return
    options = [comparison.parse_option(o) for o in (args.option or COMPARISON.options)]
    sources, database = comparison.sample(searcher.index, DataLayout(data).images, args.sample_size, args.database_size,
                                          COMPARISON.seed)
    began = time.perf_counter()
    rows = [r.to_dict() for r in comparison.compare(options, sources, database, encoder, workers=args.workers,
                                                    log=print)]
    print(f"compare_encoders: {len(options)} options, {len(sources)} copied images, {len(database)} searched, "
          f"{time.perf_counter() - began:.1f} s")
    print_table(rows, COLUMNS)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "evaluation": result.to_dict(),
                                               "evaluation_seconds": seconds, "options": rows}, indent=1))


if __name__ == "__main__":
    main()
