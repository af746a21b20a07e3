"""The duplicate review at scale, through the product's own code (core.review, core.setaside):
a collection of N images of which G planted groups of 2-5 copies, as near_duplicates and the
manifests hold them, decisions in SQLite.

Prints, side by side: the review page's p50 on a collection of 10 groups and on G groups (first
and last page; the goal is the same time), decisions per second (one by one and the bulk
accept), apply and undo files per second, and export times.

    python -m bench.review [--images 100000] [--groups 10000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imgsim_assets.core import review as rv
from imgsim_assets.core import setaside


def write_collection(root: Path, images: int, groups: int, seed: int = 0) -> None:
    """Manifests (100 batches), near_duplicates pairs and, for grouped images, small files."""
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(1, 1 << 62, images + 64, dtype=np.int64))[:images]  # content ids: 63-bit hashes
    ids = rng.permutation(ids)[:images]
    batch = rng.integers(0, 100, images)
    paths = [f"batch-{b:03d}/img_{i:07d}.jpg" for i, b in enumerate(batch)]
    width = rng.choice([640, 1280, 2048, 4032], images).astype(np.int32)
    height = (width * 3 // 4).astype(np.int32)
    captured = np.datetime64("2015-01-01") + rng.integers(0, 3000 * 86400, images).astype("timedelta64[s]")
    modified = np.datetime64("2020-01-01") + rng.integers(0, 1000 * 86400, images).astype("timedelta64[s]")
    table = pa.table({
        "path": paths, "image_id": ids, "status": ["ok"] * images, "bytes": rng.integers(50_000, 5_000_000, images),
        "width": width, "height": height, "captured_at": pa.array(captured.astype("datetime64[us]")),
        "camera_make": rng.choice(["Canon", "Apple", None], images).tolist(),
        "modified_at": pa.array(modified.astype("datetime64[us]"), pa.timestamp("us", tz="UTC")),
    })
    assets = root / "assets" / "raw_images"
    assets.mkdir(parents=True)
    for b in range(100):
        pq.write_table(table.filter(pa.array(batch == b)), assets / f"batch-{b:03d}.parquet")
    sizes = rng.integers(2, 6, groups)
    members = rng.permutation(images)[: int(sizes.sum())]
    a, b_, s = [], [], []
    start = 0
    for size in sizes:
        group = np.sort(ids[members[start : start + size]])
        start += size
        for i in range(size):
            for j in range(i + 1, size):
                a.append(group[i])
                b_.append(group[j])
                s.append(rng.uniform(0.9, 1.0))
    pq.write_table(pa.table({"image_id_a": pa.array(a, pa.int64()), "image_id_b": pa.array(b_, pa.int64()),
                             "similarity": pa.array(s, pa.float32())}), root / "assets" / "near_duplicates.parquet")
    images_dir = root / "images"
    for row in members:
        path = images_dir / paths[row]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 64)


def p50(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(root: Path, images: int, groups: int, repeats: int):
    write_collection(root, images, groups)
    decisions = rv.Decisions(f"sqlite:///{root / 'review.db'}")
    began = time.perf_counter()
    review = rv.load(root / "assets", decisions)
    out = {"build_s": time.perf_counter() - began, "groups": len(review.groups)}
    last = max(1, -(-len(review.groups) // 10))
    out["first_page_s"] = p50(lambda: review.page(1, 10), repeats)
    out["last_page_s"] = p50(lambda: review.page(last, 10), repeats)
    return out, review, decisions


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--groups", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="imgsim-bench-review-"))
    try:
        small, _, _ = measure(root / "small", max(args.images // 1000, 100), 10, args.repeats)
        big, review, decisions = measure(root / "big", args.images, args.groups, args.repeats)
        print(f"review of {big['groups']} groups ({args.images} images): built in {big['build_s']:.2f} s")
        print(f"page of 10 groups, p50: {small['groups']} groups {1000 * small['first_page_s']:.1f} ms | "
              f"{big['groups']} groups first page {1000 * big['first_page_s']:.1f} ms, last page "
              f"{1000 * big['last_page_s']:.1f} ms | ratio last/small {big['last_page_s'] / small['first_page_s']:.2f}x")

        ids = review.groups.members[:200].tolist()
        began = time.perf_counter()
        for image_id in ids:
            decisions.decide({image_id: rv.KEEP})
        one_by_one = len(ids) / (time.perf_counter() - began)
        decisions.decide({i: None for i in ids})
        began = time.perf_counter()
        accepted_groups, accepted = review.accept(min_score=0.0)
        bulk = accepted / (time.perf_counter() - began)
        print(f"decisions: one by one {one_by_one:.0f}/s (as the page clicks) | bulk accept {bulk:.0f}/s "
              f"({accepted} images in {accepted_groups} groups)")

        place = setaside.Place(root / "big", root / "big" / "images")
        moves = setaside.plan(decisions, review.photos, place, dt.date(2026, 1, 1))
        began = time.perf_counter()
        outcome = setaside.apply(decisions, place, moves, rv.LOCAL)
        apply_s = time.perf_counter() - began
        began = time.perf_counter()
        csv_text = rv.export_csv(review)
        csv_s = time.perf_counter() - began
        began = time.perf_counter()
        json_text = rv.export_json(review)
        json_s = time.perf_counter() - began
        began = time.perf_counter()
        [undone] = setaside.undo(decisions, place, [outcome.apply_id])
        undo_s = time.perf_counter() - began
        print(f"apply: {outcome.moved} files in {apply_s:.2f} s, {outcome.moved / apply_s:.0f} files/s "
              f"({len(outcome.failed)} failed) | undo: {undone.moved / undo_s:.0f} files/s")
        print(f"export: csv {csv_s:.2f} s ({len(csv_text) / 2**20:.1f} MiB) | json {json_s:.2f} s "
              f"({len(json_text) / 2**20:.1f} MiB)")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
