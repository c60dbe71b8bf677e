"""Giving freed memory back to the operating system between the batches of a long CPU loop.

glibc's malloc raises its mmap threshold to the size of each large block freed (up to 32 MiB), so the
megabyte-sized tensors a scoring loop allocates afterwards come from the heap, and the heap's fragmented top is
not returned when they are freed. Scoring never-seen records over SmolLM2 with four adapters grew from a 2 GB
working set to 24 GB and was killed at 100 records; calling `malloc_trim` after each batch kept it at 2.3 GB
between batches and 4.4 GB at peak (issue 24's note). Elsewhere (macOS, musl, Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():  # type: ignore[no-untyped-def]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the operating system; True when the C library could (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
