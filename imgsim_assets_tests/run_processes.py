"""Runs of ``embed_batch`` in processes of their own, as a deployment makes them: each run
process executes its steps in worker processes (the multiprocess executor), against the
instance in ``$DAGSTER_HOME``, on the data dir in ``$IMGSIM_TEST_DATA_DIR``.

    python -m imgsim_assets_tests.run_processes BATCH
"""

import os
import subprocess
import sys
from pathlib import Path

from dagster import DagsterInstance, execute_job, reconstructable

from imgsim_assets.definitions import build_definitions
from imgsim_assets.resources import EncoderResource, PreprocessResource
from imgsim_assets.settings import Settings

DATA_DIR_VAR = "IMGSIM_TEST_DATA_DIR"


def tiny_definitions(data: Path | None = None):
    """The code location with a 1-block ViT on 56² crops, on ``data`` (default: $IMGSIM_TEST_DATA_DIR)."""
    return build_definitions(
        Settings(data_dir=data or Path(os.environ[DATA_DIR_VAR])),
        encoder=EncoderResource(weights="random", depth=1, batch_size=8, device="cpu"),
        preprocessing=PreprocessResource(crop_size=56, resize_size=64, workers=1),
    )


def embed_batch_job():
    """Rebuilt in each step's process from this module."""
    return tiny_definitions().resolve_job_def("embed_batch")


def run_embed_batch(batch: str) -> int:
    """One run of ``embed_batch`` for ``batch``: 0 when it succeeded."""
    with DagsterInstance.get() as instance:
        with execute_job(reconstructable(embed_batch_job), instance=instance, tags={"dagster/partition": batch}) as result:
            return 0 if result.success else 1


def embed_all_at_once(data: Path, home: Path, batches: list[str]) -> None:
    """One run process per batch, all started together; fails unless every run succeeded."""
    env = {**os.environ, DATA_DIR_VAR: str(data), "DAGSTER_HOME": str(home)}
    runs = [subprocess.Popen([sys.executable, "-m", __name__, b], env=env) for b in batches]
    assert [r.wait(timeout=600) for r in runs] == [0] * len(batches), "a concurrent run failed"


def step_pids(instance: DagsterInstance, run_ids: list[str]) -> set[int]:
    """The processes the steps of these runs started in."""
    return {e.dagster_event.pid for run_id in run_ids for e in instance.all_logs(run_id)
            if e.is_dagster_event and e.dagster_event.event_type_value == "STEP_START"}


if __name__ == "__main__":
    sys.exit(run_embed_batch(sys.argv[1]))
