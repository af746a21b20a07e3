"""The whole chain on many small images: what each stage costs per image, per batch, in memory and on disk.

    python -m bench.scale [--images 100000] [--batches 100] [--add 1000] [--workers 0] [--root DIR]
    python -m bench.scale --images 1000000 --batches 1000          # the full run

Generates ``--images`` small photo-like JPEGs in ``--batches`` batch folders and runs
``imgsim ingest``'s code (the same assets, jobs and a SQLite Dagster instance configured as
``imgsim`` configures it) with a 2-block ViT at 56 px and random weights, so that what is
measured is everything but a real model. Then it runs an ingest with nothing new, and adds
one more batch of ``--add`` images. For each ingest it reports, per stage (job):

- runs and wall time, ms per image of the collection (of the new batch for the addition), and
  per image without the model's own time (``image_embeddings`` records it);
- orchestration: the run's wall time outside its steps' own compute, per run and per batch
  (ingest runs up to 25 adjacent batches of a stage as one run);
- peak memory (PSS) of the process and its decode workers while the stage ran;
- bytes on disk of the stage's artifacts.

Keep ``--root`` to rerun the addition on the same collection (generation and the first ingest
are skipped when the root already holds them).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from dagster import DagsterEventType, DagsterInstance, RunsFilter
from PIL import Image

from imgsim_assets.cli import print_table
from imgsim_assets.definitions import build_definitions
from imgsim_assets.ingest import ingest
from imgsim_assets.instance import ensure_instance_yaml
from imgsim_assets.resources import EncoderResource, PreprocessResource
from imgsim_assets.settings import Settings

SIZE = (64, 48)  # width, height of every generated picture
ARTIFACTS = {  # what each job writes, under assets/
    "embed_batch": ["raw_images", "cropped_tensors", "image_embeddings"],
    "train_index": ["pca_model.npz", "cluster_centroids.npy", "index_template.faiss"],
    "index_shard": ["faiss_index_shards"],
    "merge_index": ["faiss_index"],
    "evaluate_index": ["retrieval_eval.json"],
    "analyze_index": ["near_duplicates.parquet", "image_clusters.parquet"],
}


def write_pictures(folder: Path, count: int, seed: int) -> None:
    """``count`` distinct small JPEGs: a colour gradient, a few shapes, sensor noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = SIZE
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(count):
        base = rng.uniform(0, 255, 3)
        grad = rng.uniform(-2, 2, (3, 2))
        img = base[:, None, None] + grad[:, 0, None, None] * yy + grad[:, 1, None, None] * xx
        for _ in range(3):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, h / 2)
            img[:, (yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, (3, 1))
        img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=85)
        (folder / f"img_{i:05d}.jpg").write_bytes(buf.getvalue())
    (folder / "_SUCCESS").touch()


def _rss_mb() -> float:
    """Proportional resident memory (PSS: shared pages split among their users, so torch's
    libraries are not counted once per worker) of this process and its children, in MB."""
    pids = [os.getpid()]
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


@dataclass
class Tracker:
    """Follows ingest's log: which job runs, for how long, at what peak memory."""

    current: str = "observe and plan"
    started: float = field(default_factory=time.perf_counter)
    wall: dict = field(default_factory=lambda: defaultdict(float))
    runs: dict = field(default_factory=lambda: defaultdict(int))
    batches: dict = field(default_factory=lambda: defaultdict(int))  # partitions its runs covered
    peak: dict = field(default_factory=lambda: defaultdict(float))

    def log(self, message: str) -> None:
        if message.startswith("running "):
            self._switch(message.split()[1])
            self.runs[self.current] += 1
            covered = re.search(r"\((\d+) batches\)$", message)
            self.batches[self.current] += int(covered.group(1)) if covered else int(" for " in message)

    def _switch(self, job: str) -> None:
        now = time.perf_counter()
        self.wall[self.current] += now - self.started
        self.current, self.started = job, now

    def finish(self) -> None:
        self._switch("done")

    def sample(self, stop: threading.Event) -> None:
        while not stop.wait(0.25):
            self.peak[self.current] = max(self.peak[self.current], _rss_mb())


def _step_seconds(instance: DagsterInstance, since: float) -> dict[str, float]:
    """Per job, the seconds its runs spent inside their steps (step start to step end)."""
    seconds: dict[str, float] = defaultdict(float)
    for run in instance.get_runs(RunsFilter(created_after=_datetime(since))):
        began = {}
        for record in instance.all_logs(run.run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS,
                                                             DagsterEventType.STEP_FAILURE}):
            key = record.step_key
            if record.dagster_event.event_type == DagsterEventType.STEP_START:
                began[key] = record.timestamp
            elif key in began:
                seconds[run.job_name] += record.timestamp - began.pop(key)
    return seconds


def _model_seconds(instance: DagsterInstance, since: float) -> float:
    """Seconds the model itself ran in the image_embeddings materializations since ``since``."""
    from dagster import AssetKey, AssetRecordsFilter

    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey("image_embeddings"),
                                                                 after_timestamp=since), limit=10_000).records
    return sum(float(r.asset_materialization.metadata["model_seconds"].value) for r in records
               if "model_seconds" in r.asset_materialization.metadata)


def _datetime(ts: float):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _bytes(path: Path) -> int:
    path = path.resolve() if path.is_symlink() else path
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def measured_ingest(defs, instance, settings: Settings, images: int, title: str) -> dict:
    tracker, stop = Tracker(), threading.Event()
    sampler = threading.Thread(target=tracker.sample, args=(stop,), daemon=True)
    sampler.start()
    since = time.time()
    began = time.perf_counter()
    report = ingest(defs, instance, settings.images_dir, log=tracker.log)
    total = time.perf_counter() - began
    tracker.finish()
    stop.set()
    sampler.join()
    if not report.ok:
        raise SystemExit(f"ingest failed: {report.failed}")
    inside = _step_seconds(instance, since)
    rows = []
    for job, wall in tracker.wall.items():
        runs = tracker.runs.get(job, 0)
        on_disk = sum(_bytes(settings.assets_dir / a) for a in ARTIFACTS.get(job, []))
        batches = tracker.batches.get(job, 0)
        overhead = wall - inside.get(job, 0.0)
        rows.append({"stage": job, "runs": runs, "batches": batches, "wall_s": wall,
                     "ms_per_image": 1000 * wall / max(images, 1),
                     "overhead_s_per_run": overhead / runs if runs else 0.0,
                     "overhead_s_per_batch": overhead / batches if batches else "",
                     "peak_rss_mb": tracker.peak.get(job, 0.0), "disk_mb": on_disk / 2**20})
    model = _model_seconds(instance, since)
    print(f"\n== {title}: {total:.1f} s, {1000 * total / max(images, 1):.2f} ms per image; the model "
          f"{model:.1f} s, everything else {1000 * (total - model) / max(images, 1):.2f} ms per image ==")
    print_table(rows, ["stage", "runs", "batches", "wall_s", "ms_per_image", "overhead_s_per_run",
                       "overhead_s_per_batch", "peak_rss_mb", "disk_mb"])
    return {"total_s": total, "model_s": model, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--add", type=int, default=1000, help="images in the batch added at the end")
    parser.add_argument("--workers", type=int, default=0, help="decode processes (0: one per CPU, 1: inline)")
    parser.add_argument("--root", default=None, help="keep the collection here (default: a temporary folder)")
    args = parser.parse_args()

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="imgsim-scale-"))
    settings = Settings(data_dir=root / "data")
    per_batch = args.images // args.batches
    if not (settings.images_dir / f"b{args.batches - 1:04d}" / "_SUCCESS").exists():
        began = time.perf_counter()
        for b in range(args.batches):
            write_pictures(settings.images_dir / f"b{b:04d}", per_batch, seed=b)
        print(f"generated {per_batch * args.batches} images in {args.batches} batches in {time.perf_counter() - began:.0f} s")
    home = root / "dagster_home"
    ensure_instance_yaml(home)
    os.environ["DAGSTER_HOME"] = str(home)
    defs = build_definitions(
        settings,
        encoder=EncoderResource(weights="random", depth=2, batch_size=256, device="cpu"),
        preprocessing=PreprocessResource(crop_size=56, resize_size=64, workers=args.workers),
    )
    instance = DagsterInstance.get()
    try:
        n = per_batch * args.batches
        measured_ingest(defs, instance, settings, n, f"ingest of {n} images in {args.batches} batches")
        measured_ingest(defs, instance, settings, n, "ingest again, nothing new")
        write_pictures(settings.images_dir / "b_added", args.add, seed=10**6)
        measured_ingest(defs, instance, settings, args.add, f"one batch of {args.add} added to {n}")
        shutil.rmtree(settings.images_dir / "b_added")  # a rerun adds it again
    finally:
        instance.dispose()
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
