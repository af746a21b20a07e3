"""Giving decoded images' memory back to the system after a burst of uploads.

glibc serves allocations above its mmap threshold with their own mappings, returned on free,
but it raises that threshold as large blocks are freed (up to 32 MiB), after which decoded
frames come from the heap and stay there: eight large uploads once left the service 2 GB
larger for good. A fixed threshold keeps every large block a mapping of its own; a trim after
a large decode returns what the heap still holds. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGE = 1 << 20  # blocks from this size on are mappings of their own


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def map_large_blocks(threshold: int = LARGE) -> bool:
    """Serve allocations of ``threshold`` bytes or more by their own mappings, from now on."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(_LIBC.mallopt(M_TRIM_THRESHOLD, threshold))


def trim() -> None:
    """Return the free memory at the heaps' tops to the system."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
