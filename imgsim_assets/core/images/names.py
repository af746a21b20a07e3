"""Names in a manifest: file paths as valid UTF-8 text and back, and an image's content address."""

from __future__ import annotations

import os
import re
from pathlib import Path

# The completion marker a producer writes into a finished batch folder: not an image.
DONE_MARKER = "_SUCCESS"


def image_id_from_sha256(hexdigest: str) -> int:
    """The content address of an image: the first 63 bits of its SHA-256, as int64."""
    return int(hexdigest[:16], 16) & 0x7FFF_FFFF_FFFF_FFFF


def as_text(s: str) -> str:
    """``s`` (an OS name, or a message quoting one) as valid UTF-8 text: an undecodable byte
    of an OS name (which Python carries as a lone surrogate) becomes ``\\xNN``; any other
    lone surrogate becomes ``\\udNNN``."""
    try:
        raw = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = s.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def record_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` as :attr:`ImageRecord.path` spells it."""
    return as_text(Path(os.path.relpath(os.fsdecode(path), os.fsdecode(root))).as_posix())


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def os_path(path: str) -> str:
    """The OS path (relative to the images root) of an :attr:`ImageRecord.path`: ``\\xNN``
    escapes become the raw bytes again (as Python's surrogate escapes, usable with ``open``)."""
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m[1], 16)), path)


def source_path(root: str | os.PathLike, path: str) -> Path:
    """The file that :attr:`ImageRecord.path` ``path`` names under ``root``, for reading it
    again (thumbnails, queries). A path that would lead out of ``root`` is refused."""
    root = os.path.normpath(os.fsdecode(root))
    full = os.path.normpath(os.path.join(root, os_path(path)))
    if os.path.isabs(os_path(path)) or os.path.commonpath([root, full]) != root:
        raise ValueError(f"manifest path {path!r} leads outside {root}")
    return Path(full)
