"""Every benchmark runs to the end at tiny sizes, so a change that breaks one fails here
(their shard step once crashed on main for weeks: nothing ran them). Speed figures are not
judged here (machines differ); each run must print both sides and a finite ratio."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RATIO = re.compile(r"^(.*): (.+) vs (.+) -> ([0-9.]+)x", re.M)


def _bench(module: str, *args: str, tmp_path: Path) -> str:
    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _ratios(out: str) -> dict[str, float]:
    """Each ``what: ours vs baseline -> ratio`` line, by what; every ratio finite and positive."""
    found = {m.group(1).strip(): float(m.group(4)) for m in RATIO.finditer(out)}
    assert found, out[-2000:]
    assert all(math.isfinite(r) and r > 0 for r in found.values()), found
    return found


def test_bench_index_builds_grows_and_judges_a_tiny_index(tmp_path):
    out = _bench("bench.index", "--n", "20000", "--skip-autofaiss", "--queries", "200", "--dir", str(tmp_path / "bi"),
                 tmp_path=tmp_path)
    assert "imgsim Flat, nprobe 1" in out and "recall@10 1.0000" in out
    assert "adding 1% new vectors vs a full build" in _ratios(out)


def test_bench_serve_runs_every_phase_on_a_tiny_index(tmp_path):
    out = _bench("bench.serve", "--vectors", "20000", "--seconds", "1", "--clients", "2", tmp_path=tmp_path)
    for phase in ("cold start", "id queries", "image queries", "reload under load"):
        assert phase in out
    assert "failed queries during the swap: 0 of" in out


def test_bench_preprocess_compares_with_the_plain_loop_at_every_size(tmp_path):
    out = _bench("bench.preprocess", "--per-size", "1", "--repeats", "1", "--dir", str(tmp_path / "p"),
                 tmp_path=tmp_path)
    ratios = _ratios(out)
    assert {"all photos, 1 process", "all photos, imgsim decode workers vs plain 1 process"} <= set(ratios)
    assert sum("MP), 1 process" in what for what in ratios) == 3  # one line per photo size


def test_bench_embedding_compares_the_materialization_with_the_bare_loop(tmp_path):
    out = _bench("bench.embedding", "--images", "8", "--batch-size", "4", "--rounds", "1", "--depth", "1",
                 tmp_path=tmp_path)
    assert "materialization / bare loop (time)" in _ratios(out) and "image_embeddings: 8 images" in out


def test_bench_memory_measures_each_batch_size_in_its_own_process(tmp_path):
    out = _bench("bench.memory", "--sizes", "16", "32", "--depth", "1", "--dir", str(tmp_path / "m"), tmp_path=tmp_path)
    assert {"peak RSS 32 vs 16 images", "peak RSS 32 images vs the 2 GB budget"} <= set(_ratios(out))


def test_bench_throughput_compares_files_to_vectors_with_the_model_alone(tmp_path):
    out = _bench("bench.throughput", "--device", "cpu", "--models", "dinov2_vits14", "--decode", "workers",
                 "--images", "8", "--batch-size", "4", "--depth", "1", "--dir", str(tmp_path / "t"), tmp_path=tmp_path)
    assert "files -> vectors, workers decode" in _ratios(out)


def test_bench_hostile_accounts_for_every_damaged_file(tmp_path):
    out = _bench("bench.hostile", "--variants", "100", tmp_path=tmp_path)
    assert "accounted for: 100.00%" in out and re.search(r"exceptions escaped\s+0\b", out)


def test_bench_duplicates_scores_the_grouping_rules_on_known_groups(tmp_path):
    out = _bench("bench.duplicates", "--corpus", "synthetic", tmp_path=tmp_path)
    rows = {line.split("  ")[0]: line.split() for line in out.splitlines() if line.startswith(("0.95", "calibrated"))}
    assert set(rows) == {"0.95, connected (before)", "0.95, representative", "calibrated, connected",
                         "calibrated, representative"}
    for cells in rows.values():
        purity, completeness = float(cells[-5]), float(cells[-4])
        assert 0 < purity <= 1 and 0 < completeness <= 1


def test_bench_scale_runs_three_ingests_stage_by_stage(tmp_path):
    out = _bench("bench.scale", "--images", "60", "--batches", "3", "--add", "10", "--root", str(tmp_path / "s"),
                 tmp_path=tmp_path)
    assert "ingest of 60 images in 3 batches" in out and "ingest again, nothing new" in out
    assert "one batch of 10 added to 60" in out
    for stage in ("embed_batch", "index_shard", "merge_index", "analyze_index"):
        assert stage in out


def test_bench_encoders_evaluates_a_tiny_ingested_collection(tmp_path):
    from dagster import instance_for_test

    from imgsim_assets.core.sample_data import write_synthetic_batch
    from imgsim_assets.ingest import ingest
    from imgsim_assets_tests.run_processes import tiny_definitions

    data = tmp_path / "data"
    for i in range(2):
        write_synthetic_batch(data / "images" / f"b{i}", 12, seed=i)
    (tmp_path / "home").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        assert ingest(tiny_definitions(data), instance, data / "images", log=lambda m: None).ok
    out = _bench("bench.encoders", "--data-dir", str(data), "--device", "cpu", "--workers", "1", "--eval-sample-size",
                 "4", "--sample-size", "4", "--database-size", "24", "--option", "cls@56", tmp_path=tmp_path)
    assert "24 indexed images" in out and "retrieval_eval: " in out and "recall@1" in out


def test_bench_hostile_service_attacks_a_real_server(tmp_path):
    out = _bench("bench.hostile", "--service", tmp_path=tmp_path)
    rows = dict(m.groups() for line in out.splitlines()[1:] if (m := re.match(r"(\S.*?)\s{2,}(\S.*)$", line)))
    assert rows["16-bit 13,376² PNG (340 KB): status, seconds"].startswith("422,")
    assert rows["chunked 256 MB upload (limit 32 MB): status, MB taken, s"].startswith("413,")
    assert rows["idle connections still open after 12 s (of 200)"] == "0"
    assert rows["Host: rebound.example → status"] == "421"
    assert rows["'Authorization: TOKEN' (no Bearer) → status"] == "401"
    assert rows["error body names the data dir"] == "no"
