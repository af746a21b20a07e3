"""Giving decoded images' memory back to the system after a burst of uploads.

glibc serves allocations above its mmap threshold with their own mappings, returned on free,
but it raises that threshold as large blocks are freed (up to 32 MiB), after which decoded
frames come from the heap and stay there: eight large uploads once left the service 1.2 GB
larger for good. A fixed threshold keeps every large block a mapping of its own; a trim when
a burst of large decodes has ended returns what the heap still holds. Elsewhere than glibc
both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks from this size on are mappings of their own: Pillow's (16 MiB) are, the model's
# activations for one query (about 1.6 MB for ViT-S) stay on the heap, where reuse is cheap.
LARGE = 16 << 20


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
