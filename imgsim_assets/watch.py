"""Which batch folders are new, changed or complete: the bookkeeping behind the sensor.

Plain code over a JSON-able cursor, so a sensor tick is a pure step from (folders, cursor,
clock) to (partitions to add, batches to run, next cursor) and can be tested on a folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from imgsim_assets.core import images
from imgsim_assets.ingest import discover_batches


@dataclass
class Tick:
    new_partitions: list[str] = field(default_factory=list)
    removed_partitions: list[str] = field(default_factory=list)  # their folder is gone
    runs: list[tuple[str, str]] = field(default_factory=list)  # (batch, folder fingerprint)
    waiting: list[str] = field(default_factory=list)  # changing, or quiet for too short a time
    invalid: dict[str, str] = field(default_factory=dict)
    cursor: dict = field(default_factory=dict)


def plan_tick(
    images_dir: Path,
    cursor: dict,
    known_partitions: set[str],
    now: float,
    quiet_seconds: float = 60.0,
    max_batches: int = 25,
    time_budget_s: float = 20.0,
) -> Tick:
    """Look at up to ``max_batches`` folders (round-robin from where the last tick stopped) for
    at most ``time_budget_s``; a folder is complete when it holds ``_SUCCESS`` or its
    fingerprint (names, sizes, mtimes) has not changed for ``quiet_seconds``. A complete
    folder whose fingerprint was not submitted yet becomes a run (and a partition if new)."""
    folders: dict = dict(cursor.get("folders", {}))
    batches, invalid = discover_batches(images_dir)
    tick = Tick(invalid=invalid)
    for gone in set(folders) - set(batches):
        del folders[gone]
    tick.removed_partitions = sorted(known_partitions - set(batches))
    last = cursor.get("last", "")
    order = [b for b in batches if b > last] + [b for b in batches if b <= last]
    started = time.perf_counter()
    examined = 0
    cursor_last = last
    for batch in order:
        if examined >= max_batches or time.perf_counter() - started > time_budget_s:
            break
        examined += 1
        cursor_last = batch
        folder = images_dir / batch
        try:
            files = images.list_batch_files(folder)
        except (OSError, ValueError):
            tick.waiting.append(batch)  # empty, unreadable or vanished: look again next tick
            continue
        fingerprint = images.folder_fingerprint(files)
        state = folders.get(batch) or {"fingerprint": "", "since": now, "submitted": ""}
        if state["fingerprint"] != fingerprint:
            state = {**state, "fingerprint": fingerprint, "since": now}
        complete = (folder / images.DONE_MARKER).exists() or now - state["since"] >= quiet_seconds
        if fingerprint != state["submitted"]:
            if complete:
                if batch not in known_partitions:
                    tick.new_partitions.append(batch)
                tick.runs.append((batch, fingerprint))
                state["submitted"] = fingerprint
            else:
                tick.waiting.append(batch)
        folders[batch] = state
    else:
        cursor_last = ""  # went all the way round: start from the top next time
    tick.cursor = {"folders": folders, "last": cursor_last if examined else ""}
    return tick
