"""Several batches materialized at once -- separate run processes, each running its steps
in worker processes (the multiprocess executor) -- give the same embeddings and, once
indexed, the same index as one batch after the other."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter, execute_job, reconstructable

from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.definitions import build_definitions
from imgsim_assets.ingest import ingest
from imgsim_assets.instance import ensure_instance_yaml
from imgsim_assets.resources import EncoderResource, PreprocessResource
from imgsim_assets.settings import Settings
from imgsim_assets_tests.contents import assert_same_embeddings, assert_same_index

DATA_DIR_VAR = "IMGSIM_TEST_CONCURRENT_DATA_DIR"
BATCHES = ["b1", "b2", "b3"]


def _definitions(data: Path | None = None):
    return build_definitions(
        Settings(data_dir=data or Path(os.environ[DATA_DIR_VAR])),
        encoder=EncoderResource(weights="random", depth=1, batch_size=4, device="cpu"),
        preprocessing=PreprocessResource(crop_size=56, resize_size=64, workers=1),
    )


def embed_batch_job():
    """Rebuilt in each step's process from this module."""
    return _definitions().resolve_job_def("embed_batch")


def _run(batch: str) -> int:
    """One run of ``embed_batch`` for ``batch`` against the instance in $DAGSTER_HOME."""
    with DagsterInstance.get() as instance:
        with execute_job(reconstructable(embed_batch_job), instance=instance, tags={"dagster/partition": batch}) as result:
            return 0 if result.success else 1


def _all_at_once(data: Path, home: Path) -> None:
    env = {**os.environ, DATA_DIR_VAR: str(data), "DAGSTER_HOME": str(home)}
    runs = [subprocess.Popen([sys.executable, "-m", __name__, b], env=env) for b in BATCHES]
    assert [r.wait(timeout=600) for r in runs] == [0] * len(BATCHES), "a concurrent run failed"


def test_concurrent_batches_build_the_same_index_as_sequential_runs(tmp_path):
    sequential, concurrent = tmp_path / "sequential", tmp_path / "concurrent"
    for i, batch in enumerate(BATCHES):
        files = write_synthetic_batch(sequential / "images" / batch, 6, seed=40 + i)
        if batch == "b1":
            first = files[0]
    # The same picture in two batches: one image_id, one vector, both paths listed.
    shutil.copy(first, sequential / "images" / "b3" / "copy_of_b1.png")
    shutil.copytree(sequential / "images", concurrent / "images")

    home = sequential / "dagster_home"
    ensure_instance_yaml(home)
    with DagsterInstance.from_config(str(home)) as instance:
        report = ingest(_definitions(sequential), instance, sequential / "images", log=lambda m: None)
        assert report.ok and report.embedded == BATCHES and report.merged, report
        expected = _definitions(sequential).load_asset_value("faiss_index", instance=instance)

    home = concurrent / "dagster_home"
    ensure_instance_yaml(home)
    with DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions("image_batches", BATCHES)
        _all_at_once(concurrent, home)
        records = instance.get_run_records(RunsFilter(job_name="embed_batch", statuses=[DagsterRunStatus.SUCCESS]))
        assert len(records) == len(BATCHES)
        assert max(r.start_time for r in records) < min(r.end_time for r in records), "the runs did not overlap"
        steps = [e for r in records for e in instance.all_logs(r.dagster_run.run_id)
                 if e.is_dagster_event and e.dagster_event.event_type_value == "STEP_START"]
        assert len({e.dagster_event.pid for e in steps}) == 2 * len(BATCHES)  # each step in a process of its own
        # The rest of the chain (training, shards, merge) reads what the concurrent runs wrote.
        report = ingest(_definitions(concurrent), instance, concurrent / "images", log=lambda m: None)
        assert report.ok and report.embedded == [] and report.trained and report.merged, report
        actual = _definitions(concurrent).load_asset_value("faiss_index", instance=instance)

    assert expected.num_vectors == 6 * len(BATCHES) and len(expected.catalog) == 6 * len(BATCHES) + 1
    assert_same_index(actual, expected)
    assert_same_embeddings(concurrent / "assets", sequential / "assets", BATCHES)
    copies = [r for r in expected.catalog.to_pylist() if r["path"] in (f"b1/{first.name}", "b3/copy_of_b1.png")]
    assert len(copies) == 2 and copies[0]["image_id"] == copies[1]["image_id"]


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1]))
