"""Peak memory of ingesting one batch (decode + embed), for growing batch sizes.

    python -m bench.memory [--sizes 1000 3000 10000] [--depth 2]

Each size runs in a fresh process: ``raw_images``, ``cropped_tensors`` and
``image_embeddings`` of one partition, materialized in process, with the decode worker
processes. Reported: peak RSS of the run process, of the largest decode worker, and their
sum over all workers (an upper bound of the whole). The ViT is ViT-S/14 at 224 with
``--depth`` blocks (0 = all 12): memory for streamed batches does not depend on depth, time does.
The 224×224 uint8 tensors alone are 150 KB per image, 1.5 GB for 10,000 images, so a
flat peak means the batch is streamed, never held.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import header, peak_rss_mb, ratio_line

TARGET_MB = 2048
BATCH = "bench"


def child(data_dir: Path, n: int, depth: int) -> None:
    os.environ["DAGSTER_HOME"] = str(data_dir / "dagster_home")
    from dagster import DagsterInstance

    from imgsim_assets.core.images import decode_pool
    from imgsim_assets.core.sample_data import write_synthetic_batch
    from imgsim_assets.definitions import build_definitions
    from imgsim_assets.resources import EncoderResource
    from imgsim_assets.settings import Settings

    settings = Settings(data_dir=data_dir)
    folder = settings.images_dir / BATCH
    if len(list(folder.glob("*.png"))) != n:
        write_synthetic_batch(folder, n, seed=n, size=(120, 160))
    encoder = EncoderResource(weights="random", device="cpu", depth=depth or None)
    defs = build_definitions(settings, encoder=encoder)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("image_batches", [BATCH])
    start = time.perf_counter()
    result = defs.resolve_job_def("embed_batch").execute_in_process(instance=instance, partition_key=BATCH)
    seconds = time.perf_counter() - start
    assert result.success
    worker_mb = [peak_rss_mb(pid) for pid in decode_pool(0)._processes]
    print(json.dumps({"n": n, "seconds": seconds, "main_mb": peak_rss_mb(), "worker_mb": max(worker_mb, default=0),
                      "workers": len(worker_mb)}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "imgsim-bench-memory")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.dir / str(args.child), args.child, args.depth)

    header(f"peak RSS of one batch through raw_images → image_embeddings (ViT-S/14 depth {args.depth or 12})")
    rows = []
    for n in args.sizes:
        out = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--child", str(n), "--depth", str(args.depth), "--dir", str(args.dir)],
            capture_output=True, text=True, check=False,
        )
        if out.returncode != 0:
            sys.exit(f"batch of {n} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["total_mb"] = row["main_mb"] + row["workers"] * row["worker_mb"]
        rows.append(row)
        print(f"  {n:>6} images: {row['seconds']:.0f} s, run process {row['main_mb']:.0f} MB, largest decode "
              f"worker {row['worker_mb']:.0f} MB, all {row['workers']} workers + run process <= {row['total_mb']:.0f} MB")
    big, small = rows[-1], rows[0]
    ratio_line(
        f"peak RSS {big['n']} vs {small['n']} images",
        f"{big['total_mb']:.0f} MB", f"{small['total_mb']:.0f} MB",
        big["total_mb"] / small["total_mb"], "<= 1.10x (flat)", big["total_mb"] / small["total_mb"] <= 1.10,
    )
    ratio_line(
        f"peak RSS {big['n']} images vs the 2 GB budget",
        f"{big['total_mb']:.0f} MB", f"{TARGET_MB} MB", big["total_mb"] / TARGET_MB, "<= 1.00x", big["total_mb"] <= TARGET_MB,
    )


if __name__ == "__main__":
    main()
