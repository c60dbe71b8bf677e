"""Bad input through the command line: a clear message naming the file, line or key, a non-zero exit, and
nothing half-written."""

from __future__ import annotations

import json

import pytest
import yaml

from sisaflow import cli
from tests.integration.conftest import TEMPLATE, write_corpus


def _init(tmp_path, corpus, *extra):
    return cli.main(
        [
            "init",
            str(tmp_path / "ws"),
            "--corpus",
            str(corpus),
            "--owner-field",
            "author_id",
            "--text-template",
            TEMPLATE,
            *extra,
        ]
    )


def test_missing_corpus(tmp_path, capsys):
    assert _init(tmp_path, tmp_path / "nope.jsonl") == 1
    assert "nope.jsonl: corpus file not found" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert _init(tmp_path, tmp_path / "empty.jsonl") == 1
    assert "corpus file is empty" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl", 5)
    lines = corpus.read_text().splitlines()
    lines[6] = lines[6][:-5]  # truncate line 7
    corpus.write_text("\n".join(lines) + "\n")
    assert _init(tmp_path, corpus) == 1
    assert f"{corpus}:7: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_duplicate_ids(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl", 5)
    lines = corpus.read_text().splitlines()
    lines.append(lines[2])
    corpus.write_text("\n".join(lines) + "\n")
    assert _init(tmp_path, corpus) == 1
    err = capsys.readouterr().err
    assert "duplicate record id 'tofu-0002'" in err and ":101:" in err and ":3" in err


@pytest.mark.parametrize("field", ["id", "author_id", "answer"])
def test_missing_field(tmp_path, capsys, field):
    corpus = write_corpus(tmp_path / "c.jsonl", 5)
    lines = corpus.read_text().splitlines()
    row = json.loads(lines[9])
    del row[field]
    lines[9] = json.dumps(row)
    corpus.write_text("\n".join(lines) + "\n")
    assert _init(tmp_path, corpus) == 1
    assert f"{corpus}:10: missing field '{field}'" in capsys.readouterr().err


def test_more_shards_than_owners(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl", 3)
    assert _init(tmp_path, corpus, "--shards", "5") == 1
    err = capsys.readouterr().err
    assert "sharding.shards = 5" in err and "only 3 owner(s)" in err
    assert not (tmp_path / "ws").exists()


def test_invalid_params_name_the_key_and_allowed_values(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl", 5)
    assert _init(tmp_path, corpus, "--shards", "2", "--slices", "2") == 0
    ws = tmp_path / "ws"
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["schedule"] = "weekly"
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli.main(["--workspace", str(ws), "shard"]) == 1
    err = capsys.readouterr().err
    assert "train.schedule = 'weekly'" in err and "incremental" in err and "cumulative" in err


def test_forget_needs_something_to_forget(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl", 5)
    assert _init(tmp_path, corpus, "--shards", "2", "--slices", "2") == 0
    assert cli.main(["--workspace", str(tmp_path / "ws"), "forget"]) == 2
    assert "forget needs --owner, --record or --file" in capsys.readouterr().err


def test_forget_unknown_record_and_bad_request_file(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl", 5)
    assert _init(tmp_path, corpus, "--shards", "2", "--slices", "2") == 0
    ws = tmp_path / "ws"
    assert cli.main(["--workspace", str(ws), "forget", "--record", "tofu-9999", "--no-run"]) == 1
    assert "unknown record(s): tofu-9999" in capsys.readouterr().err
    bad = tmp_path / "req.jsonl"
    bad.write_text('{"owner": "1"}\n{"owner": \n')
    assert cli.main(["--workspace", str(ws), "forget", "--file", str(bad), "--no-run"]) == 1
    assert f"{bad}:2: malformed JSON" in capsys.readouterr().err
    assert (ws / "deletions" / "ledger.jsonl").read_text() == ""


def test_not_a_workspace(tmp_path, capsys):
    assert cli.main(["--workspace", str(tmp_path), "status"]) == 1
    assert "is not a sisaflow workspace" in capsys.readouterr().err


def test_owners_that_hash_into_fewer_shards_than_asked(tmp_path, capsys):
    # TOFU authors 0 and 1 fall in the same one of two shards: one shard would be empty
    corpus = write_corpus(tmp_path / "c.jsonl", 2)
    assert _init(tmp_path, corpus, "--shards", "2") == 1
    assert "leaves shard(s) 1 empty" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("stage", ["prepare", "shard"])
def test_a_dvc_stage_command_waits_for_a_running_forget(tmp_path, capsys, stage):
    """`dvc repro` runs these commands; while a forget holds the workspace they wait instead of rewriting what the
    forget is rewriting."""
    import threading
    import time

    from sisaflow.core import lock
    from sisaflow.core.paths import Workspace

    assert _init(tmp_path, write_corpus(tmp_path / "c.jsonl", 6)) == 0
    ws = tmp_path / "ws"
    assert cli.main(["--workspace", str(ws), "prepare"]) == 0
    done: list[int] = []
    with lock.workspace_lock(Workspace(ws), "sisaflow forget"):
        worker = threading.Thread(target=lambda: done.append(cli.main(["--workspace", str(ws), stage])))
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive() and not done  # still waiting
    worker.join(timeout=120)
    assert done == [0]
    assert "waiting for the active sisaflow forget" in capsys.readouterr().out


def test_skip_invalid_imports_the_valid_records_and_names_the_others_by_file_and_line(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl", 5)
    lines = corpus.read_text().splitlines()
    broken = json.loads(lines[6])["question"]
    row = json.loads(lines[3])
    row["answer"] = "  "
    lines[3] = json.dumps(row)  # line 4: an empty field
    lines[6] = lines[6][:-5]  # line 7: malformed
    corpus.write_text("\n".join(lines) + "\n")
    # by default one invalid record refuses the corpus, and the message says how to skip it
    assert _init(tmp_path, corpus, "--shards", "2", "--slices", "2") == 1
    err = capsys.readouterr().err
    assert f"{corpus}:4: field 'answer' is empty" in err and "--skip-invalid" in err
    assert not (tmp_path / "ws").exists()
    assert _init(tmp_path, corpus, "--shards", "2", "--slices", "2", "--skip-invalid") == 0
    ws = tmp_path / "ws"
    out = capsys.readouterr().out
    assert "corpus: 98 records" in out and "2 invalid record(s) skipped" in out
    assert f"{corpus}:4: field 'answer' is empty" in out and f"{corpus}:7: malformed JSON" in out
    assert yaml.safe_load((ws / "params.yaml").read_text())["corpus"]["skip_invalid"] is True
    assert cli.main(["--workspace", str(ws), "prepare"]) == 0
    assert "2 invalid record(s) skipped" in capsys.readouterr().out
    assert cli.main(["--workspace", str(ws), "status", "--json"]) == 0
    st = json.loads(out := capsys.readouterr().out)
    assert st["imported"]["records"] == 98
    assert st["imported"]["skipped"] == [
        f"{corpus}:4: field 'answer' is empty",
        f"{corpus}:7: malformed JSON",
    ]
    assert cli.main(["--workspace", str(ws), "status"]) == 0
    out += capsys.readouterr().out
    assert f"{corpus}:7: malformed JSON" in out and broken not in out
