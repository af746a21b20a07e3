"""What the suite's own servers (PostgreSQL, Milvus, a Ray cluster, the search service, the
Dagster UI) share: a free loopback port, and what happens when one cannot be had here."""

from __future__ import annotations

import os
import socket
from typing import NoReturn

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unavailable(message: str, required_by: str) -> NoReturn:
    """Skip saying ``message``; fail instead where the environment sets ``required_by`` (CI
    installs what the test needs and sets it, so there a missing piece is an error)."""
    if os.environ.get(required_by):
        pytest.fail(message)
    pytest.skip(message)
