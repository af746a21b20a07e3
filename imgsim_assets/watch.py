"""Which batch folders are complete and changed: the bookkeeping behind the sensor.

Plain code over a JSON-able cursor, so a sensor tick is a pure step from (folders, cursor,
clock, what each batch's manifest was built from) to (partitions to add, folder versions to
record, batches to run, next cursor) and can be tested on a folder. "Changed" is
:func:`folders.folder_changed`, the definition ``imgsim ingest`` uses too; the cursor only
keeps what "complete" needs (when each folder last changed) and the version last requested.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from imgsim_assets.assets.folders import UNREADABLE, folder_changed, folder_version
from imgsim_assets.core import images
from imgsim_assets.ingest import discover_batches


def _nothing_consumed(batch: str) -> str | None:
    """No batch has a manifest yet."""
    return None


@dataclass
class Tick:
    new_partitions: list[str] = field(default_factory=list)
    removed_partitions: list[str] = field(default_factory=list)  # their folder is gone
    runs: list[tuple[str, str]] = field(default_factory=list)  # (batch, folder version)
    observations: list[tuple[str, str]] = field(default_factory=list)  # (batch, folder version) to record
    waiting: list[str] = field(default_factory=list)  # changing, or quiet for too short a time
    invalid: dict[str, str] = field(default_factory=dict)
    cursor: dict = field(default_factory=dict)


def plan_tick(
    images_dir: Path,
    cursor: dict,
    known_partitions: set[str],
    now: float,
    consumed: Callable[[str], str | None] = _nothing_consumed,
    quiet_seconds: float = 60.0,
    max_batches: int = 25,
    time_budget_s: float = 20.0,
) -> Tick:
    """Look at up to ``max_batches`` folders (round-robin from where the last tick stopped) for
    at most ``time_budget_s``; a folder is complete when it holds ``_SUCCESS`` or its version
    (fingerprint of names, sizes, mtimes) has not changed for ``quiet_seconds``. A complete
    folder that changed (its version is not the one ``consumed(batch)`` says its manifest was
    built from) and whose version was not requested yet becomes a run (and a partition if new).
    A partition's new version is recorded as an observation."""
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
        version = folder_version(folder)
        if version == UNREADABLE:
            tick.waiting.append(batch)  # empty, unreadable or vanished: look again next tick
            continue
        state = {"fingerprint": "", "since": now, "requested": "", **folders.get(batch, {})}
        if state["fingerprint"] != version:
            state = {**state, "fingerprint": version, "since": now}
            if batch in known_partitions:
                tick.observations.append((batch, version))
        complete = (folder / images.DONE_MARKER).exists() or now - state["since"] >= quiet_seconds
        if folder_changed(version, consumed(batch)) and version != state["requested"]:
            if complete:
                if batch not in known_partitions:
                    tick.new_partitions.append(batch)
                    tick.observations.append((batch, version))
                tick.runs.append((batch, version))
                state["requested"] = version
            else:
                tick.waiting.append(batch)
        folders[batch] = state
    else:
        cursor_last = ""  # went all the way round: start from the top next time
    tick.cursor = {"folders": folders, "last": cursor_last if examined else ""}
    return tick
