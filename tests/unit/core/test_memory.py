"""release_freed_memory: the heap pages glibc keeps after a loop frees megabyte-sized buffers go back."""

from __future__ import annotations

import platform
import subprocess
import sys

from sisaflow.core.memory import release_freed_memory

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# In a fresh interpreter (a clean heap): free a 24 MiB block, so glibc's mmap threshold rises above 8 MiB, then
# take 100 blocks of 8 MiB from the heap with small live blocks between them, so freeing them cannot shrink the
# heap's top. Prints the resident set (MiB) with the blocks held, then after release_freed_memory.
SCRIPT = """
import numpy as np
from sisaflow.core.memory import release_freed_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
big = np.ones(24 << 20, dtype=np.uint8); del big
blocks, pins = [], []
for _ in range(100):
    blocks.append(np.ones(8 << 20, dtype=np.uint8))
    pins.append(np.ones(64 << 10, dtype=np.uint8))
held = rss()
del blocks
assert release_freed_memory()
print(held, rss())
"""


def test_reports_whether_the_c_library_can_release() -> None:
    assert release_freed_memory() is GLIBC


def test_freed_heap_blocks_leave_the_resident_set() -> None:
    if not GLIBC:  # the mechanism is glibc's; elsewhere the call is a documented no-op (the test above)
        assert release_freed_memory() is False
        return
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout
    held, after = map(int, out.split())
    freed = 100 * 8  # MiB
    assert held >= freed, (held, after)
    # page granularity and the allocator's own bookkeeping keep a little; nine tenths of the blocks go back
    assert after <= held - 0.9 * freed, (held, after)
