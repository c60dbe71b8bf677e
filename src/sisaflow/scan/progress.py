"""How far a scan has got: bytes searched out of the bytes it found to search, for a caller's callback, and a
terminal progress bar with the time left (tqdm) that shows only when stderr is a terminal (as the other bars of
`sisaflow.core.progress`, which count steps and records rather than bytes).

The scan lists every place first (files, DVC remote objects, git objects) so that it knows the total, calls
`progress(0, total)`, then `progress(done, total)` after each file or object it searched; `done` only grows.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from sisaflow.core.progress import stderr_is_terminal

ProgressCallback = Callable[[int, int], None]
"""progress(bytes searched so far, bytes to search in all)."""


class Progress:
    """Bytes searched out of `total`, passed on to a callback (or to nobody)."""

    def __init__(self, callback: ProgressCallback | None = None) -> None:
        self.callback = callback
        self.total = 0
        self.done = 0

    def plan(self, nbytes: int) -> None:
        """Count `nbytes` more to search."""
        self.total += nbytes

    def advance(self, nbytes: int) -> None:
        """`nbytes` more searched (a place can turn out larger than listed: the total grows with it)."""
        self.done += nbytes
        self.total = max(self.total, self.done)
        if self.callback is not None:
            self.callback(self.done, self.total)


@contextmanager
def terminal_bar(desc: str = "scan", stream: TextIO | None = None) -> Iterator[ProgressCallback | None]:
    """A progress callback that draws a bar with the time left on `stream` (stderr by default), or None when
    `stream` is not a terminal (a log file, a pipe, a test's captured output) or SISAFLOW_PROGRESS is 0: nothing
    is drawn there."""
    if stream is None:
        stream, on = sys.stderr, stderr_is_terminal()
    else:
        isatty = getattr(stream, "isatty", None)
        on = bool(isatty and isatty()) and os.environ.get("SISAFLOW_PROGRESS", "1") != "0"
    if not on:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(
        total=0,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=stream,
        dynamic_ncols=True,
        leave=False,
    )

    def update(done: int, total: int) -> None:
        if total != bar.total:
            bar.total = total
            bar.refresh()  # the total is known: show the bar at once, not at the next redraw
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()
