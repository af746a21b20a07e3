"""The batch folders under the images root: which are batches, which are complete, which changed.

One look at the folders serves both the sensor and ``imgsim ingest``: :func:`plan_tick` is plain
code over a JSON-able cursor, a pure step from (folders, cursor, clock, what each batch's
manifest was built from) to (partitions to add and remove, folder versions to record, batches to
run, next cursor), so it can be tested on a folder. The sensor returns its tick to Dagster;
:func:`observe_folders` (ingest) applies it to the instance at once, taking every folder as it
is now. "Changed" is :func:`folders.folder_changed`; the cursor only keeps what "complete" needs
(when each folder last changed) and the version last requested.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dagster import DagsterInstance

from imgsim_assets.assets import folders
from imgsim_assets.assets.folders import UNREADABLE, folder_changed, folder_version
from imgsim_assets.core import images
from imgsim_assets.partitions import image_batches
from imgsim_assets.policies import MAX_BATCHES_PER_TICK, QUIET_SECONDS, TIME_BUDGET_SECONDS

# Characters Dagster does not allow in partition keys, plus path separators.
_INVALID_KEY = re.compile(r"[\[\],*/\\]|^\.|\.\.")


def invalid_batch_name(name: str) -> str | None:
    """Why ``name`` cannot be a batch (partition key), or None when it can."""
    if not name.strip():
        return "empty name"
    if images.as_text(name) != name:
        return "not valid UTF-8 (partition keys are text; rename the folder)"
    if _INVALID_KEY.search(name):
        return "contains one of [ ] , * / \\ or starts with '.'"
    if len(name) > 255:
        return "longer than 255 characters"
    return None


def discover_batches(images_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Batch folder names under ``images_dir`` and the folders that cannot be batches (with why)."""
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder {images_dir} does not exist; put one folder per batch in it")
    batches, invalid = [], {}
    for entry in sorted(images_dir.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        problem = invalid_batch_name(entry.name)
        if problem:
            invalid[images.as_text(entry.name)] = problem
        else:
            batches.append(entry.name)
    return batches, invalid


def _nothing_consumed(batch: str) -> str | None:
    """No batch has a manifest yet."""
    return None


@dataclass
class Tick:
    new_partitions: list[str] = field(default_factory=list)
    removed_partitions: list[str] = field(default_factory=list)  # their folder is gone
    runs: list[tuple[str, str]] = field(default_factory=list)  # (batch, folder version)
    observations: list[tuple[str, str]] = field(default_factory=list)  # (batch, folder version) to record
    waiting: list[str] = field(default_factory=list)  # changing, unreadable, or quiet for too short a time
    invalid: dict[str, str] = field(default_factory=dict)
    cursor: dict = field(default_factory=dict)


def plan_tick(
    images_dir: Path,
    cursor: dict,
    known_partitions: set[str],
    now: float,
    consumed: Callable[[str], str | None] = _nothing_consumed,
    quiet_seconds: float = QUIET_SECONDS,
    max_batches: int | None = MAX_BATCHES_PER_TICK,
    time_budget_s: float | None = TIME_BUDGET_SECONDS,
    as_is: bool = False,
) -> Tick:
    """Look at up to ``max_batches`` folders (round-robin from where the last tick stopped) for
    at most ``time_budget_s`` (None: all of them, fingerprinted over several processes); a
    folder is complete when it can be read and holds ``_SUCCESS`` or its version (fingerprint of
    names, sizes, mtimes) has not changed for ``quiet_seconds``. A complete folder that changed
    (its version is not the one ``consumed(batch)`` says its manifest was built from) and whose
    version was not requested yet becomes a run (and a partition if new). A partition's new
    version is recorded as an observation. ``as_is`` (ingest): every folder is complete now."""
    folder_states: dict = dict(cursor.get("folders", {}))
    batches, invalid = discover_batches(images_dir)
    tick = Tick(invalid=invalid)
    for gone in set(folder_states) - set(batches):
        del folder_states[gone]
    tick.removed_partitions = sorted(known_partitions - set(batches))
    last = cursor.get("last", "")
    order = [b for b in batches if b > last] + [b for b in batches if b <= last]
    if max_batches is not None:
        order = order[:max_batches]
    versions = (dict(zip(order, folders.folder_versions([images_dir / b for b in order])))
                if time_budget_s is None else {})
    started = time.perf_counter()
    examined = 0
    cursor_last = last
    for batch in order:
        if time_budget_s is not None and time.perf_counter() - started > time_budget_s:
            break
        examined += 1
        cursor_last = batch
        folder = images_dir / batch
        version = versions.get(batch) or folder_version(folder)
        state = {"fingerprint": "", "since": now, "requested": "", **folder_states.get(batch, {})}
        if state["fingerprint"] != version:
            state = {**state, "fingerprint": version, "since": now}
            if batch in known_partitions:
                tick.observations.append((batch, version))
        folder_states[batch] = state
        if as_is:
            complete = True  # an unreadable folder too: its run says what is wrong with it
        elif version == UNREADABLE:
            tick.waiting.append(batch)  # empty, unreadable or vanished: look again next tick
            continue
        else:
            complete = (folder / images.DONE_MARKER).exists() or now - state["since"] >= quiet_seconds
        if complete and batch not in known_partitions:
            tick.new_partitions.append(batch)
            tick.observations.append((batch, version))
        if folder_changed(version, consumed(batch)) and version != state["requested"]:
            if complete:
                tick.runs.append((batch, version))
                state["requested"] = version
            else:
                tick.waiting.append(batch)
    if examined == len(batches):
        cursor_last = ""  # went all the way round: start from the top next time
    tick.cursor = {"folders": folder_states, "last": cursor_last if examined else ""}
    return tick


@dataclass
class Folders:
    """The batch folders found, and how the partitions were changed to match them."""

    new: list[str]
    removed: list[str]
    invalid: dict[str, str]


def observe_folders(instance: DagsterInstance, images_dir: Path, log: Callable[[str], None] = print) -> Folders:
    """Make the partitions match the batch folders as they are now and record each folder's
    current version: the sensor's tick over every folder, applied to the instance at once."""
    versions = folders.FolderVersions.read(instance)
    cursor = {"folders": {b: {"fingerprint": v, "since": 0.0} for b, v in versions.observed.items() if v}}
    known = set(instance.get_dynamic_partitions(image_batches.name))
    tick = plan_tick(images_dir, cursor, known, now=time.time(), consumed=versions.consumed.get,
                     max_batches=None, time_budget_s=None, as_is=True)
    for name, problem in tick.invalid.items():
        log(f"skipping folder {name!r}: not a valid batch name ({problem})")
    if tick.new_partitions:
        instance.add_dynamic_partitions(image_batches.name, tick.new_partitions)
        log(f"registered {len(tick.new_partitions)} new batch(es): {', '.join(tick.new_partitions)}")
    for batch in tick.removed_partitions:
        instance.delete_dynamic_partition(image_batches.name, batch)
        log(f"batch folder {batch!r} is gone: removed it from the partitions (and from the next index)")
    for batch, version in tick.observations:
        instance.report_runless_asset_event(folders.observation(batch, version))
    return Folders(tick.new_partitions, tick.removed_partitions, tick.invalid)
