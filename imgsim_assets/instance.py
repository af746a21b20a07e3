"""The local Dagster instance's ``dagster.yaml``: written once, never overwritten.

    python -m imgsim_assets.instance DAGSTER_HOME
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from imgsim_assets.core.storage import temp_sibling

LOCAL_INSTANCE_YAML = """\
# Local Dagster instance: runs, events and schedules in SQLite under this folder.
# For Postgres, see "Deploying" in the README.
telemetry:
  enabled: false
# A run that fails (a worker killed, a GPU lost) is retried from the failed steps.
run_retries:
  enabled: true
  max_retries: 2
# Steps in a pool (the project's only one is "gpu": embedding and k-means) run one at a time.
concurrency:
  pools:
    default_limit: 1
# With the daemon (dagster dev): a pool slot still held by a run that has ended (its process
# was killed, then the run was marked failed in the UI) is freed after 30 s.
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 30
"""


def ensure_instance_yaml(home: str | Path) -> Path:
    """Write ``home/dagster.yaml`` unless one is already there (a user's own stays untouched)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        # Written aside, then linked into place: the link fails if another process got there
        # first, so a reader sees no file or the whole file, and a user's file is never replaced.
        tmp = temp_sibling(config)
        tmp.write_text(LOCAL_INSTANCE_YAML)
        try:
            os.link(tmp, config)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return config


def _names_postgres(config: Path) -> bool:
    """Whether a ``dagster.yaml`` puts the run storage on PostgreSQL (``storage: postgres:`` or a
    ``dagster_postgres`` run storage), so that loading the instance is worth it."""
    import yaml

    parsed = yaml.safe_load(config.read_text()) or {}
    storage, runs = parsed.get("storage") or {}, parsed.get("run_storage") or {}
    return "postgres" in storage or "dagster_postgres" in str(runs.get("module", ""))


def review_database_url(settings, instance=None) -> str:
    """Where duplicate decisions live: ``IMGSIM_REVIEW_DB``; else the Dagster instance's
    PostgreSQL, when it runs on one (its tables are prefixed ``imgsim_``); else ``review.db`` in
    the data folder."""
    if settings.review_db:
        return settings.review_db
    if instance is None:
        config = Path(os.environ.get("DAGSTER_HOME") or settings.dagster_home) / "dagster.yaml"
        if config.exists() and _names_postgres(config):
            from dagster import DagsterInstance

            instance = DagsterInstance.from_config(str(config.parent))
    if instance is not None:
        from imgsim_assets.dagster_private import postgres_url

        url = postgres_url(instance)
        if url:
            return url
    return f"sqlite:///{settings.data_dir / 'review.db'}"


if __name__ == "__main__":
    print(ensure_instance_yaml(sys.argv[1]))
