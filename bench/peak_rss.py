"""Run a command and report the peak of the summed resident memory of it and all its descendants.

    python bench/peak_rss.py -- make demo
Samples every 0.2 s with psutil (installed with Ray). Ray workers started by the command are its descendants
only while they are; Ray's raylet reparents nothing here, since a local Ray is started by the command itself.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print(__doc__)
        return 2
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        peak = max(peak, total)
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    print(
        f"\npeak summed RSS {peak / 2**30:.2f} GiB; wall {wall:.0f} s; exit {proc.returncode}",
        file=sys.stderr,
    )
    return proc.returncode or 0


if __name__ == "__main__":
    sys.exit(main())
