"""Training's progress: a shard's meter counts every optimizer step of the slices it trains, up to the total it
announced (from the shard manifest alone); `sisaflow train` draws bars only on a terminal, never into captured
output."""

from __future__ import annotations

import io
import sys

import pytest
import yaml

from sisaflow.core import progress
from sisaflow.core.config import ShardingParams
from sisaflow.data.sharding import read_shard_manifest
from sisaflow.training.checkpoint import MODEL_FILE
from sisaflow.training.loop import planned_steps, train_shard


def _counts(seen, desc):
    return [(done, total) for what, done, total in seen if what == desc]


def _assert_counts_to_total(counts, total):
    assert total > 0 and counts, "the meter was never advanced"
    assert [d for d, _ in counts] == list(range(1, total + 1))  # one step at a time, none skipped
    assert {t for _, t in counts} == {total}


@pytest.mark.parametrize("schedule", ["incremental", "cumulative"])
def test_every_step_of_a_shard_is_counted_up_to_the_planned_total(
    make_workspace, make_records, make_params, schedule
):
    params = make_params(train={"schedule": schedule, "batch_size": 4, "epochs_per_slice": 2})
    ws = make_workspace(make_records(owners=6, per_owner=5), shards=1, slices=3)
    with progress.watch() as seen:
        report = train_shard(ws, 0, params, progress=lambda m: None)
    counts = _counts(seen, "shard 0")
    total = planned_steps(read_shard_manifest(ws, 0), 0, params.train)
    _assert_counts_to_total(counts, total)
    assert total == sum(s.steps for s in report.slices)


def test_a_resumed_shard_counts_only_the_slices_it_trains(make_workspace, make_records, tiny_params):
    ws = make_workspace(make_records(owners=6, per_owner=5), shards=1, slices=3)
    train_shard(ws, 0, tiny_params, progress=lambda m: None)
    (ws.checkpoint_dir(0, 2) / MODEL_FILE).unlink()  # the last slice must train again
    with progress.watch() as seen:
        report = train_shard(ws, 0, tiny_params, progress=lambda m: None)
    assert report.start_slice == 2
    total = planned_steps(read_shard_manifest(ws, 0), 2, tiny_params.train)
    _assert_counts_to_total(_counts(seen, "shard 0"), total)
    assert total == report.slices[0].steps


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _cli_workspace(make_workspace, make_records, tiny_params):
    import dataclasses

    params = dataclasses.replace(tiny_params, sharding=ShardingParams(shards=1, slices=3))
    ws = make_workspace(make_records(owners=6, per_owner=5), shards=1, slices=3)
    ws.params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return ws


def test_sisaflow_train_draws_no_bar_into_captured_output(make_workspace, make_records, tiny_params, capfd):
    from sisaflow import cli

    ws = _cli_workspace(make_workspace, make_records, tiny_params)
    with progress.watch() as seen:
        assert cli.main(["--workspace", str(ws.root), "train", "--in-process"]) == 0
    out, err = capfd.readouterr()
    assert "shard 0: trained from slice 0" in out
    assert "\r" not in out + err and "step/s" not in out + err and "it/s" not in out + err
    assert _counts(seen, "shard 0")[-1][0] == _counts(seen, "shard 0")[-1][1]  # counted all the same


def test_sisaflow_train_on_a_terminal_shows_the_shards_bar_and_keeps_its_lines(
    make_workspace, make_records, tiny_params, monkeypatch, capsys
):
    from sisaflow import cli

    ws = _cli_workspace(make_workspace, make_records, tiny_params)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("SISAFLOW_PROGRESS", raising=False)
    assert cli.main(["--workspace", str(ws.root), "train", "--in-process"]) == 0
    total = planned_steps(read_shard_manifest(ws, 0), 0, tiny_params.train)
    drawn = terminal.getvalue()
    assert "shard 0" in drawn and f"{total}/{total}" in drawn
    out = capsys.readouterr().out
    assert "checkpoint written" in out and "shard 0: trained from slice 0" in out
    assert not progress.bars_on()
