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

# (line printed by `imgsim ingest`, seconds to wait after it before the kill): from inside
# the first embedding run to the analysis after the merge. Each restart redoes only what
# the previous attempt did not finish, so every point is reached again.
KILL_POINTS = [
    ("running embed_batch for a", 2.0),
    ("running embed_batch for b", 4.0),
    ("running train_index", 1.5),
    ("running index_shard for b", 0.5),
    ("running merge_index", 1.0),
    ("running analyze_index", 0.2),
]


def _env(data: Path) -> dict:
    env = {**os.environ, "IMGSIM_DATA_DIR": str(data), "IMGSIM_WEIGHTS": "random", "IMGSIM_DEVICE": "cpu",
           "PYTHONUNBUFFERED": "1"}
    env.pop("DAGSTER_HOME", None)
    return env


def _ingest(data: Path) -> list[str]:
    result = subprocess.run(IMGSIM + ["ingest"], env=_env(data), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout.splitlines()


def _ingest_killed_at(data: Path, trigger: str, delay: float) -> list[str]:
    """Run `imgsim ingest`; SIGKILL its whole process group ``delay`` s after ``trigger`` is printed."""
    proc = subprocess.Popen(IMGSIM + ["ingest"], env=_env(data), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    seen: list[str] = []
    fired = threading.Event()

    def read():
        for line in proc.stdout:
            seen.append(line.rstrip())
            if line.startswith(trigger) and not fired.is_set():
                fired.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not fired.wait(timeout=0.5):
            assert proc.poll() is None and time.monotonic() < deadline, f"ingest never printed {trigger!r}: {seen}"
        time.sleep(delay)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the run process, its decode workers, everything
        proc.wait(timeout=30)
    reader.join(timeout=10)
    return seen


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

    printed = []
    for trigger, delay in KILL_POINTS:
        lines = _ingest_killed_at(crashed, trigger, delay)
        assert not any(line.startswith("ingest:") for line in lines), f"finished before the kill at {trigger!r}"
        _assert_artifacts_whole(crashed / "assets")
        printed += lines
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
