"""The batch folders under the images folder: which names can be batches (partition keys)."""

from __future__ import annotations

import re
from pathlib import Path

from imgsim_assets.core import images

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
