"""The instance on PostgreSQL: two batches materialized at once by two run processes, each
executing its steps in worker processes (the multiprocess executor)."""

import os
import subprocess
import sys
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter, execute_job, reconstructable

from imgsim_assets.core.sample_data import write_synthetic_batch
from imgsim_assets.definitions import build_definitions
from imgsim_assets.ingest import ingest
from imgsim_assets.resources import EncoderResource, PreprocessResource
from imgsim_assets.settings import Settings

DATA_DIR_VAR = "IMGSIM_TEST_PG_DATA_DIR"


def _definitions():
    return build_definitions(
        Settings(data_dir=Path(os.environ[DATA_DIR_VAR])),
        encoder=EncoderResource(weights="random", depth=1, batch_size=8, device="cpu"),
        preprocessing=PreprocessResource(crop_size=56, resize_size=64, workers=1),
    )


def embed_batch_job():
    """Rebuilt in each step's process from this module."""
    return _definitions().resolve_job_def("embed_batch")


def _run_batch(batch: str) -> int:
    """One run of ``embed_batch`` for ``batch`` against the instance in $DAGSTER_HOME."""
    with DagsterInstance.get() as instance:
        with execute_job(reconstructable(embed_batch_job), instance=instance, tags={"dagster/partition": batch}) as result:
            return 0 if result.success else 1


def test_two_batches_concurrently_against_postgres(postgres_url, tmp_path, monkeypatch):
    data, home = tmp_path / "data", tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(f"storage:\n  postgres:\n    postgres_url: {postgres_url}\n"
                                       "telemetry:\n  enabled: false\n")
    monkeypatch.setenv(DATA_DIR_VAR, str(data))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    for i, batch in enumerate(("b1", "b2")):
        write_synthetic_batch(data / "images" / batch, 12, seed=i)

    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        instance.add_dynamic_partitions("image_batches", ["b1", "b2"])
        workers = [subprocess.Popen([sys.executable, "-m", "imgsim_assets_tests.test_postgres", b]) for b in ("b1", "b2")]
        assert [w.wait(timeout=600) for w in workers] == [0, 0]

        runs = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.SUCCESS]))
        assert sorted(r.tags["dagster/partition"] for r in runs) == ["b1", "b2"]
        starts = [e for r in runs for e in instance.all_logs(r.run_id)
                  if e.is_dagster_event and e.dagster_event.event_type_value == "STEP_START"]
        assert len({e.dagster_event.pid for e in starts}) == 4  # every step in a worker process of its own

        # The rest of the chain reads what the two runs recorded in Postgres.
        report = ingest(_definitions(), instance, data / "images", log=lambda m: None)
        assert report.ok and report.embedded == [] and report.merged
        assert _definitions().load_asset_value("faiss_index", instance=instance).num_vectors == 24


if __name__ == "__main__":
    sys.exit(_run_batch(sys.argv[1]))
