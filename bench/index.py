"""Index building at scale: imgsim's sizing vs autofaiss under the same memory budget.

    python -m bench.index [--n 1000000] [--dim 384] [--budget-mb 512] [--autofaiss-venv DIR]

Data: a synthetic mixture that looks like image embeddings (Zipf-sized clusters around unit
centres, spread within a shared low-rank subspace plus isotropic noise, L2-normalised),
with held-out queries from the same distribution and exact top-10 by brute force.
imgsim: the assets' own chain, ``core.build`` with its default settings (``train_centroids``,
``train_template`` for the budget, ``build_shard``, ``merge``, then ``tune``: nprobe 1, 2, 4, …
a few at a time, on queries drawn from the collection, to the cheapest nprobe reaching
recall@10 ≥ 0.95), all counted as build time. autofaiss 2.18 runs in its own
virtual environment (it needs numpy < 2), created on first use from PyPI. Both indexes are
then judged by the same ``recall.evaluate`` on the same held-out queries (tie-aware recall@10
and 1-recall@1 against exact search, median single-query latency). Both work on the raw
vectors (no PCA) and use every core.
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

import faiss
import numpy as np

from bench._common import header, ratio_line
from imgsim_assets.core import build
from imgsim_assets.core import index as ix
from imgsim_assets.core import recall
from imgsim_assets.core.build import ChainSettings, IndexSettings, TemplateSettings
from imgsim_assets.core.vectors import Arrays

# autofaiss 2.18 needs numpy < 2, hence pyarrow < 18, and the faiss API of its time (OPQMatrix keywords);
# faiss-cpu 1.8.0 imports packaging without declaring it.
AUTOFAISS = ["autofaiss==2.18.0", "pyarrow<18", "faiss-cpu==1.8.0", "packaging"]
TARGET_RECALL = IndexSettings.recall_target

AUTOFAISS_DRIVER = r"""
import json, sys, time
import numpy as np
from autofaiss import build_index
x = np.load(sys.argv[1], mmap_mode="r")
start = time.perf_counter()
index, infos = build_index(
    embeddings=np.ascontiguousarray(x), index_path=sys.argv[2], index_infos_path=sys.argv[2] + ".json",
    max_index_memory_usage=sys.argv[3], current_memory_available="16G", metric_type="ip",
    min_nearest_neighbors_to_retrieve=10, save_on_disk=True, verbose=30,
)
print(json.dumps({"seconds": time.perf_counter() - start, "infos": infos}))
"""


def mixture(n: int, dim: int, seed: int, clusters: int = 2000, rank: int = 64) -> np.ndarray:
    """Database and query draws share the generator's structure (same seed for structure)."""
    structure = np.random.default_rng(0)
    centres = ix.normalize_rows(structure.normal(size=(clusters, dim)))
    basis = structure.normal(size=(rank, dim)) / np.sqrt(rank)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.8
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        c = rng.choice(clusters, size=m, p=weights)
        spread = rng.normal(size=(m, rank)) @ basis  # within-cluster variation, low rank
        x = centres[c] + (0.6 * spread + 0.2 * rng.normal(size=(m, dim))) / np.sqrt(dim)
        out[start : start + m] = ix.normalize_rows(x)
    return out


def judge(index: faiss.Index, queries: np.ndarray, x: np.ndarray, nprobes=None) -> recall.RecallCurve:
    """``recall.evaluate`` on queries that are not in the database (id -1), the database being
    ``x`` under ids 0..n-1 (imgsim's ids, and autofaiss' positions)."""
    return recall.evaluate(index, queries, np.full(len(queries), -1, np.int64), lambda: [(np.arange(len(x)), x)],
                           nprobes=nprobes)


def build_imgsim(x: np.ndarray, budget_mb: int) -> build.Built:
    """``core.build``'s chain, as the assets run it, with their default settings (the raw
    vectors stand in for the PCA output: no PCA)."""
    settings = ChainSettings(pca=None, template=TemplateSettings(memory_budget_mb=budget_mb))
    return build.run(Arrays(np.arange(len(x)), x), settings)


def autofaiss_venv(path: Path) -> Path:
    """A virtual environment with autofaiss (numpy < 2), made with this Python's base interpreter."""
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([str(Path(sys.base_prefix) / "bin" / "python3"), "-m", "venv", str(path)], check=True)
    if subprocess.run([str(python), "-c", "import autofaiss, faiss"], capture_output=True).returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *AUTOFAISS], check=True)
    return python


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--budget-mb", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "imgsim-bench-index")
    parser.add_argument("--autofaiss-venv", type=Path, default=Path(tempfile.gettempdir()) / "imgsim-autofaiss-venv")
    parser.add_argument("--skip-autofaiss", action="store_true")
    parser.add_argument("--reuse-autofaiss", action="store_true",
                        help="evaluate the autofaiss index an earlier run left in --dir instead of building it again")
    args = parser.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)

    x = mixture(args.n, args.dim, seed=1)
    queries = mixture(args.queries, args.dim, seed=2)
    header(f"{args.n:,} x {args.dim} vectors, memory budget {args.budget_mb} MB, {faiss.omp_get_max_threads()} threads")

    built = build_imgsim(x, args.budget_mb)
    ours, took = built.merged, built.seconds
    build_s = sum(took.values())
    nprobe = built.chosen.nprobe
    point = judge(ours, queries, x, [nprobe]).curve[0]
    for note in built.plan.notes:
        print(f"  imgsim plan note: {note}")
    print(f"  imgsim {ix.factory_of(ours)}, nprobe {nprobe}: build {build_s:.1f} s (train {took['train']:.1f}, "
          f"add {took['add']:.1f}, merge {took['merge']:.1f}, tune {took['tune']:.1f}), "
          f"{ix.memory_bytes(ours) / 2**20:.0f} MB, recall@10 {point.recall_at_10:.4f}, "
          f"1-recall@1 {point.one_recall_at_1:.4f}, p50 single query {point.ms_per_query:.3f} ms")

    # Adding 1% new vectors: one new shard from the same template, merged with the existing index.
    new = mixture(max(1, args.n // 100), args.dim, seed=4)
    t0 = time.perf_counter()
    built.add_batch("new", np.arange(args.n, args.n + len(new)), new)
    add_s = time.perf_counter() - t0
    ratio_line("  adding 1% new vectors vs a full build", f"{add_s:.2f} s", f"{build_s:.1f} s", add_s / build_s,
               "<= 0.05x", add_s / build_s <= 0.05)
    ratio_line("  p50 single-query latency vs 1 ms", f"{point.ms_per_query:.3f} ms", "1 ms", point.ms_per_query,
               f"<= 1.00x at recall >= {TARGET_RECALL}",
               point.ms_per_query <= 1.0 and point.recall_at_10 >= TARGET_RECALL)

    if args.skip_autofaiss:
        return
    out = args.dir / "autofaiss.index"
    recorded = args.dir / "autofaiss.result.json"
    earlier = json.loads(recorded.read_text()) if recorded.exists() else {}
    same_data = all(earlier.get(key) == value for key, value in
                    {"n": args.n, "dim": args.dim, "budget_mb": args.budget_mb}.items())
    if args.reuse_autofaiss and out.exists() and same_data:
        result = earlier  # same seeds, same sizes: the same data, built by an earlier run
        print(f"  (autofaiss index and build time reused from {recorded})")
    else:
        data = args.dir / "x.npy"
        np.save(data, x)
        python = autofaiss_venv(args.autofaiss_venv)
        driver = args.dir / "driver.py"
        driver.write_text(AUTOFAISS_DRIVER)
        run = subprocess.run([str(python), str(driver), str(data), str(out), f"{args.budget_mb}M"],
                             capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if run.returncode != 0:
            sys.exit(f"autofaiss failed:\n{run.stderr[-3000:]}")
        result = json.loads(run.stdout.strip().splitlines()[-1])
        recorded.write_text(json.dumps({**result, "n": args.n, "dim": args.dim, "budget_mb": args.budget_mb}))
    theirs = faiss.read_index(str(out))
    their = judge(theirs, queries, x).curve[0]  # at the search parameters autofaiss saved with the index
    print(f"  autofaiss {result['infos'].get('index_key')} ({result['infos'].get('index_param')}): build "
          f"{result['seconds']:.1f} s, {result['infos'].get('size in bytes', 0) / 2**20:.0f} MB, recall@10 "
          f"{their.recall_at_10:.4f}, 1-recall@1 {their.one_recall_at_1:.4f}, "
          f"p50 single query {their.ms_per_query:.3f} ms")
    ratio_line("  build time", f"imgsim {build_s:.1f} s", f"autofaiss {result['seconds']:.1f} s",
               build_s / result["seconds"], "<= 0.5x", build_s / result["seconds"] <= 0.5)
    ratio_line("  recall@10", f"imgsim {point.recall_at_10:.4f}", f"autofaiss {their.recall_at_10:.4f}",
               point.recall_at_10 / max(their.recall_at_10, 1e-9), ">= 1.0x", point.recall_at_10 >= their.recall_at_10)


if __name__ == "__main__":
    main()
