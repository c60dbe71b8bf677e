"""core.progress: meters count whether or not anything is drawn; bars only where they are turned on, which the
command line does only when stderr is a terminal; lines printed while bars are drawn go above them."""

from __future__ import annotations

import io
import sys

import pytest

from sisaflow.core import progress


class FakeBar:
    made: list[FakeBar] = []

    def __init__(self, desc: str, total: int, unit: str) -> None:
        self.desc, self.total, self.unit, self.n, self.closed = desc, total, unit, 0, False
        FakeBar.made.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_meter_counts_to_its_total_and_draws_nothing_without_bars(capsys):
    with progress.watch() as seen, progress.meter("work", 5, "item") as m:
        for _ in range(3):
            m.advance()
        m.advance(2)
        m.advance(0)  # nothing done: nothing reported
    assert seen == [("work", 1, 5), ("work", 2, 5), ("work", 3, 5), ("work", 5, 5)]
    assert m.done == m.total == 5
    assert capsys.readouterr() == ("", "")


def test_captured_stderr_is_no_terminal_so_no_bars(capsys):
    with progress.terminal_bars() as on:
        assert on is False and not progress.bars_on()
        with progress.meter("work", 2) as m:
            m.advance(2)
    assert capsys.readouterr().err == ""


def test_bars_on_a_terminal_and_the_setting_comes_back(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.delenv("SISAFLOW_PROGRESS", raising=False)
    FakeBar.made.clear()
    with progress.terminal_bars(factory=FakeBar) as on:
        assert on and progress.bars_on()
        with progress.terminal_bars(False):  # a nested setting (a Prefect-like caller) wins inside
            progress.meter("quiet", 1).advance()
        with progress.meter("loud", 4, "step") as m:
            m.advance(3)
            m.advance()
    assert not progress.bars_on()
    (bar,) = FakeBar.made
    assert (bar.desc, bar.total, bar.unit, bar.n, bar.closed) == ("loud", 4, "step", 4, True)


def test_sisaflow_progress_0_turns_bars_off_even_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setenv("SISAFLOW_PROGRESS", "0")
    with progress.terminal_bars() as on:
        assert on is False


def test_tqdm_draws_the_time_left_and_echo_prints_above_the_bar(monkeypatch, capsys):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("SISAFLOW_PROGRESS", raising=False)
    with progress.terminal_bars(), progress.meter("shard 0", 10, "step") as m:
        m.advance(5)
        progress.echo("a line while the bar is drawn")
        m.advance(5)
    drawn = terminal.getvalue()
    assert "shard 0" in drawn and "5/10" in drawn and "<" in drawn  # tqdm's [elapsed<remaining]
    assert capsys.readouterr().out == "a line while the bar is drawn\n"


def test_echo_is_print_without_bars(capsys):
    progress.echo("plain")
    assert capsys.readouterr().out == "plain\n"


def test_watch_stops_at_the_end_of_its_block():
    with progress.watch() as seen:
        progress.meter("in", 1).advance()
    progress.meter("out", 1).advance()
    assert seen == [("in", 1, 1)]


@pytest.fixture(autouse=True)
def _no_bars_left_on():
    yield
    assert not progress.bars_on()
