"""How far long work has got: counters that the library advances, drawn as bars with the time left only where a
person watches a terminal.

Training (steps of a shard's slices), `evaluate` (records scored and continued) and `verify --exact` (shards
retrained) open a `meter(desc, total, unit)` and `advance` it as the work is done. Nothing is drawn unless the
command line turned bars on with `terminal_bars()`, which does so only when stderr is a terminal: Prefect runs,
Ray workers, logs and captured output keep their lines as before. While bars are drawn, `echo` prints a line
above them instead of through them. `watch()` hands every advance to a caller (a test, a benchmark) without a
terminal. The scan has its own bar over bytes (`sisaflow.scan.progress`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

Advance = tuple[str, int, int]
"""(what, done so far, total) after one advance."""

BarFactory = Callable[..., Any]
"""Makes a bar: called with desc, total and unit; the bar has update(n) and close() (tqdm's, or Ray's)."""

_factory: BarFactory | None = None
_watchers: list[Callable[[Advance], None]] = []


def _tqdm(desc: str, total: int, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)


def stderr_is_terminal() -> bool:
    """stderr is a terminal (not a file, a pipe or a test's capture), and SISAFLOW_PROGRESS is not 0."""
    if os.environ.get("SISAFLOW_PROGRESS", "1") == "0":
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


@contextlib.contextmanager
def terminal_bars(enabled: bool | None = None, factory: BarFactory | None = None) -> Iterator[bool]:
    """Draw the meters opened inside as bars on stderr when `enabled` (default: when stderr is a terminal);
    `factory` makes them (default tqdm). Yields whether bars are on; the previous setting comes back after."""
    global _factory
    previous = _factory
    on = stderr_is_terminal() if enabled is None else enabled
    _factory = (factory or _tqdm) if on else None
    try:
        yield on
    finally:
        _factory = previous


def bars_on() -> bool:
    """Whether meters opened now are drawn."""
    return _factory is not None


class Meter:
    """`done` out of `total` units of one piece of work; drawn as a bar while bars are on."""

    def __init__(self, desc: str, total: int, unit: str = "it") -> None:
        self.desc, self.total, self.unit, self.done = desc, total, unit, 0
        self._bar = _factory(desc=desc, total=total, unit=unit) if _factory is not None else None

    def advance(self, n: int = 1) -> None:
        """`n` more units done."""
        if n <= 0:
            return
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        for watcher in list(_watchers):
            watcher((self.desc, self.done, self.total))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def meter(desc: str, total: int, unit: str = "it") -> Meter:
    """A meter for `total` units of work called `desc` (use it in a `with`: the bar closes at the end)."""
    return Meter(desc, total, unit)


def echo(message: str) -> None:
    """Print a line of progress on stdout; while tqdm bars are drawn, above them rather than through them."""
    if _factory is _tqdm:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(message, flush=True)


@contextlib.contextmanager
def watch() -> Iterator[list[Advance]]:
    """Every advance of every meter while inside, in order, as (what, done, total)."""
    seen: list[Advance] = []
    watcher = seen.append
    _watchers.append(watcher)
    try:
        yield seen
    finally:
        _watchers.remove(watcher)
