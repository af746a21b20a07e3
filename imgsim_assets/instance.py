"""The local Dagster instance's ``dagster.yaml``: written once, never overwritten.

    python -m imgsim_assets.instance DAGSTER_HOME
"""

from __future__ import annotations

import sys
from pathlib import Path

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
"""


def ensure_instance_yaml(home: str | Path) -> Path:
    """Write ``home/dagster.yaml`` unless one is already there (a user's own stays untouched)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(LOCAL_INSTANCE_YAML)
    return config


if __name__ == "__main__":
    print(ensure_instance_yaml(sys.argv[1]))
