"""The headline benchmarks run to the end at tiny sizes, so a change that breaks one fails here
(their shard step once crashed on main for weeks: nothing ran them)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench(module: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_index_builds_grows_and_judges_a_tiny_index(tmp_path):
    out = _bench("bench.index", "--n", "20000", "--skip-autofaiss", "--queries", "200", "--dir", str(tmp_path / "bi"),
                 tmp_path=tmp_path)
    assert "imgsim Flat, nprobe 1" in out and "recall@10 1.0000" in out
    assert "adding 1% new vectors vs a full build" in out


def test_bench_serve_runs_every_phase_on_a_tiny_index(tmp_path):
    out = _bench("bench.serve", "--vectors", "20000", "--seconds", "1", "--clients", "2", tmp_path=tmp_path)
    for phase in ("cold start", "id queries", "image queries", "reload under load"):
        assert phase in out
    assert "failed queries during the swap: 0 of" in out
