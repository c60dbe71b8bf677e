"""Training on Ray shows its progress from the driver: the driver's meter counts the shards as they finish, up to
the number asked for; with bars on (a terminal), each worker's steps come back as Ray's distributed bars, drawn
by the driver; without them nothing but the usual lines reaches the output."""

from __future__ import annotations

import pytest
import ray  # noqa: F401  (a dependency: its absence fails, never skips)
import yaml

from sisaflow.core import progress  # noqa: E402
from sisaflow.core.config import CorpusParams, ShardingParams  # noqa: E402
from sisaflow.core.paths import Workspace  # noqa: E402
from sisaflow.pipeline import steps  # noqa: E402
from sisaflow.pipeline.create import init_workspace  # noqa: E402
from tests.integration.conftest import TEMPLATE, TINY, write_corpus  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    corpus = write_corpus(tmp_path / "tofu.jsonl", authors=6)
    cp = CorpusParams(
        path=str(corpus),
        owner_field="author_id",
        text_field=None,
        text_template=TEMPLATE.replace("\\n", "\n"),
    )
    ws = init_workspace(tmp_path / "ws", corpus, cp, ShardingParams(shards=2, slices=2))
    raw = yaml.safe_load(ws.params_file.read_text())
    for section, values in TINY.items():
        raw[section].update(values)
    ws.params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    steps.shard(ws, steps.load(ws))
    return ws


def test_the_driver_counts_shards_and_draws_the_workers_bars_only_when_asked(workspace, capfd):
    params = steps.load(workspace)
    with progress.watch() as seen:
        quiet = steps.train(workspace, params, [0, 1])
    assert [s.shard for s in quiet.shards] == [0, 1]
    assert [(done, total) for what, done, total in seen if what == "shards trained"] == [(1, 2), (2, 2)]
    out, err = capfd.readouterr()
    assert "__ray_tqdm_magic_token__" not in out + err and "shards trained" not in err

    for s in (0, 1):  # train both again, now with bars on as a terminal would have them
        for k in (0, 1):
            (workspace.checkpoint_dir(s, k) / "model.safetensors").unlink()
    with progress.terminal_bars(True), progress.watch() as seen:
        loud = steps.train(workspace, params, [0, 1])
    assert [(done, total) for what, done, total in seen if what == "shards trained"] == [(1, 2), (2, 2)]
    out, err = capfd.readouterr()
    # the driver drew the workers' step bars and its own (tqdm, on stderr); the magic lines were consumed
    assert "shards trained" in err and "shard 0" in err and "shard 1" in err
    assert "__ray_tqdm_magic_token__" not in out
    assert [s.tokens for s in loud.shards] == [s.tokens for s in quiet.shards]
