"""`imgsim ingest` killed with SIGKILL at several points, then rerun, ends with exactly the
index an uninterrupted run builds: same ids, same stored vectors, same catalog. After every
kill, each published artifact is whole (the previous version or the new one)."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import pytest
import numpy as np
import pyarrow.parquet as pq

from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.core.search import ImageIndex
from imgsim_assets_tests.contents import assert_same_embeddings, assert_same_index

IMGSIM = [sys.executable, "-m", "imgsim_assets.cli"]

# (line printed by `imgsim ingest`, seconds to wait after it before the kill), in the order
# ingest reaches them: from inside the first embedding run to the analysis after the merge.
# Each attempt is killed at the first remaining point it reaches (a kill that lands later than
# meant skips the points it overtook), and the next attempt redoes only what was not finished.
KILL_POINTS = [
    ("running embed_batch for a", 2.0),
    ("running embed_batch for b", 1.5),
    ("running train_index", 1.5),
    ("running index_shard for b", 0.5),
    ("running merge_index", 1.0),
    ("running analyze_index", 0.2),
]
MIN_KILLS = 4


def _env(data: Path) -> dict:
    env = {**os.environ, "IMGSIM_DATA_DIR": str(data), "IMGSIM_WEIGHTS": "random", "IMGSIM_DEVICE": "cpu",
           "PYTHONUNBUFFERED": "1"}
    env.pop("DAGSTER_HOME", None)
    return env


def _ingest(data: Path) -> list[str]:
    result = subprocess.run(IMGSIM + ["ingest"], env=_env(data), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout.splitlines()


def _ingest_killed_at_first(data: Path, points: list[tuple[str, float]]) -> tuple[int | None, list[str]]:
    """Run `imgsim ingest`; SIGKILL its whole process group ``delay`` s after it prints the
    first line of ``points`` it reaches. Returns that point's index (None if ingest finished
    first) and what it printed."""
    proc = subprocess.Popen(IMGSIM + ["ingest"], env=_env(data), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    seen: list[str] = []
    hit: list[int] = []
    fired = threading.Event()

    def read():
        for line in proc.stdout:
            seen.append(line.rstrip())
            matches = [i for i, (trigger, _) in enumerate(points) if line.startswith(trigger)]
            if matches and not fired.is_set():
                hit.append(matches[0])
                fired.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not fired.wait(timeout=0.5):
            assert time.monotonic() < deadline, f"ingest stalled: {seen}"
            if proc.poll() is not None:
                reader.join(timeout=10)
                assert proc.returncode == 0, f"ingest failed: {seen}"
                return (hit[0] if hit else None), seen
        time.sleep(points[hit[0]][1])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the run process, its decode workers, everything
        proc.wait(timeout=30)
    reader.join(timeout=10)
    return hit[0], seen


def _assert_artifacts_whole(assets: Path) -> None:
    """Every artifact visible under its published name opens completely."""
    for path in sorted(assets.rglob("*")):
        rel = path.relative_to(assets)
        if any(part.startswith(".") for part in rel.parts) or ".v-" in path.name:
            continue  # staging areas, temporaries, versions behind a link
        if path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".npy":
            np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                [arrays[k] for k in arrays.files]
        elif path.suffix == ".faiss":
            faiss.read_index(str(path))
        elif path.is_symlink():
            ImageIndex.load(path)


def test_ingest_killed_at_several_points_converges_to_the_clean_result(tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    write_synthetic_batch(clean / "images" / "a", 8, seed=11)
    write_synthetic_batch(clean / "images" / "b", 8, seed=12)
    shutil.copytree(clean / "images", crashed / "images")

    _ingest(clean)

    printed, killed_at, remaining = [], [], list(KILL_POINTS)
    while remaining:
        hit, lines = _ingest_killed_at_first(crashed, remaining)
        printed += lines
        if hit is None or any(line.startswith("ingest:") for line in lines):
            break  # it finished before reaching a point
        killed_at.append(remaining[hit][0])
        remaining = remaining[hit + 1 :]
        _assert_artifacts_whole(crashed / "assets")
    assert len(killed_at) >= MIN_KILLS, f"killed only at {killed_at}"
    printed += _ingest(crashed)
    # Runs killed mid-step held the gpu pool slot; the next ingest released them.
    assert any("abandoned by an interrupted ingest" in line for line in printed), printed
    _assert_artifacts_whole(crashed / "assets")

    expected = ImageIndex.load(clean / "assets" / "faiss_index")
    assert expected.num_vectors == 16
    assert_same_index(ImageIndex.load(crashed / "assets" / "faiss_index"), expected)
    assert_same_embeddings(crashed / "assets", clean / "assets", ["a", "b"])


def test_a_second_ingest_on_the_same_instance_is_refused(tmp_path):
    from dagster import DagsterInstance

    from imgsim_assets.definitions import build_definitions
    from imgsim_assets.ingest import IngestRunning, ingest, ingest_lock
    from imgsim_assets.instance import ensure_instance_yaml
    from imgsim_assets.settings import Settings

    defs = build_definitions(Settings(data_dir=tmp_path))
    home = tmp_path / "dagster_home"
    ensure_instance_yaml(home)
    (tmp_path / "images").mkdir()
    with DagsterInstance.from_config(str(home)) as instance:
        with ingest_lock(instance):
            with pytest.raises(IngestRunning, match=f"pid {os.getpid()}"):
                ingest(defs, instance, tmp_path / "images", log=lambda m: None)
        # Released: the next ingest runs (and finds no batch folder to embed).
        report = ingest(defs, instance, tmp_path / "images", log=lambda m: None)
        assert report.ok and report.embedded == []


def test_the_local_instance_frees_slots_of_ended_runs_and_limits_the_gpu_pool(tmp_path):
    from dagster import DagsterInstance

    from imgsim_assets.instance import ensure_instance_yaml

    ensure_instance_yaml(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["dagster.yaml"]  # no temporary left behind
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["free_slots_after_run_end_seconds"] == 30
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2
