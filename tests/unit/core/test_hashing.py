"""Keyed record hashes: what the ledger and certificates publish says nothing about a guessed text without the
workspace's key; a workspace whose key is missing or another refuses to import instead of hashing otherwise."""

from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest

from sisaflow.core.fsio import digest
from sisaflow.core.hashing import PLAIN, Hasher, HashKeyError, hasher_for, key_id, read_key, write_new_key


def test_plain_is_sha256_as_before_and_a_key_changes_every_hash():
    parts = ("sisaflow-record-v1", "r1", "Alice Smith, diagnosed with X")
    assert PLAIN(parts) == digest(parts)
    a, b = Hasher(b"a" * 32), Hasher(b"b" * 32)
    assert a(parts) == a(parts) and len(a(parts)) == 64
    assert len({PLAIN(parts), a(parts), b(parts)}) == 3
    # length-prefixed: moving a boundary between parts changes the hash
    assert a(("ab", "c")) != a(("a", "bc"))


def test_known_answers_pin_the_hash_format():
    """Issue 25, point 13: every ledger and certificate already written holds these hashes, so a change of the
    framing (prefix width or byte order, the encoding, HMAC for another MAC) would silently stop matching them.
    Known answers, each part framed as 8-byte big-endian length + UTF-8 bytes, checked also against one-shot
    hashlib/hmac over the framed bytes. Mutant: 4-byte prefixes (or little-endian): both answers differ."""
    import hashlib
    import hmac

    parts = ("sisaflow-record-v1", "r1", "Alice Smith, diagnosed with X")
    framed = b"".join(len(p.encode()).to_bytes(8, "big") + p.encode() for p in parts)
    key = bytes(range(32))
    assert digest(parts) == hashlib.sha256(framed).hexdigest()
    assert digest(parts) == "3d6e4e9fb337ca78843aa0bc38c991ec4315600c45e4be49f0c08b4c1fb95302"
    assert Hasher(key)(parts) == hmac.new(key, framed, hashlib.sha256).hexdigest()
    assert Hasher(key)(parts) == "195fb10da647c7b241cb986bbbd269fdcffbd5307000de856ad667af942c41da"


def test_a_key_file_is_private_and_named_by_an_id_that_does_not_reveal_it(tmp_path):
    path = tmp_path / "keys" / "hash-key"
    kid = write_new_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key(path)
    assert len(key) == 32 and kid == key_id(key) and kid.startswith("hk-") and key.hex()[:16] not in kid
    with pytest.raises(FileExistsError):
        write_new_key(path)  # never overwritten: the hashes of the ledger depend on it


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (None, 0o600, "no such hash key file"),
        ("zz" * 32, 0o600, "not a hash key"),
        ("ab" * 16, 0o600, "not a hash key"),
        ("ab" * 32, 0o644, "group or others may read"),
    ],
)
def test_a_bad_key_file_is_refused_naming_it(tmp_path, content, mode, message):
    path = tmp_path / "hash-key"
    if content is not None:
        path.write_text(content + "\n")
        os.chmod(path, mode)
    with pytest.raises(HashKeyError, match=rf"^{path}: .*{message}"):
        read_key(path)


def test_the_workspace_refuses_a_missing_or_another_key(tmp_path):
    path = tmp_path / "hash-key"
    assert hasher_for(path, None) is PLAIN  # a workspace without a key keeps plain hashes
    with pytest.raises(HashKeyError, match=r"missing.*hk-0123456789abcdef.*neither git nor DVC"):
        hasher_for(path, "hk-0123456789abcdef")
    kid = write_new_key(path)
    assert hasher_for(path, kid).key_id == kid
    with pytest.raises(HashKeyError, match=rf"the key {kid}, but params.yaml corpus.hash_key names hk-0000"):
        hasher_for(path, "hk-0000000000000000")


def test_a_keyed_corpus_read_with_the_plain_hasher_is_refused(tmp_path):
    from sisaflow.core.config import CorpusParams
    from sisaflow.core.errors import CorpusError
    from sisaflow.data.corpus import read_records

    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps({"id": "r1", "author_id": "a", "text": "t"}) + "\n")
    cp = CorpusParams(path=str(src), text_field="text", text_template=None, hash_key="hk-0123456789abcdef")
    with pytest.raises(CorpusError, match="did not pass the workspace's hasher"):
        read_records(src, cp)


def _git(root, *args):
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def test_init_keys_the_hashes_and_a_published_ledger_does_not_confirm_a_guess(tmp_path, capsys):
    from sisaflow import cli
    from sisaflow.core import ledger
    from sisaflow.core.config import Params
    from sisaflow.core.paths import Workspace
    from sisaflow.data.corpus import content_hash, text_hash

    rows = [
        {"id": f"r{i}", "author_id": f"p{i % 3}", "text": f"patient {i}: diagnosis {i * 7}"} for i in range(9)
    ]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "ws"
    assert (
        cli.main(
            [
                "init",
                str(root),
                "--corpus",
                str(src),
                "--owner-field",
                "author_id",
                "--text-field",
                "text",
                "--shards",
                "2",
            ]
        )
        == 0
    )
    ws = Workspace(root)
    params = Params.load(ws.params_file)
    kid = params.corpus.hash_key
    assert kid and kid == key_id(read_key(ws.hash_key_file))
    assert stat.S_IMODE(ws.hash_key_file.stat().st_mode) == 0o600
    assert _git(root, "check-ignore", "-q", str(ws.hash_key_file)).returncode == 0  # never in git
    assert (
        cli.main(["--workspace", str(root), "forget", "--owner", "p1", "--request-id", "req-1", "--no-run"])
        == 0
    )
    (req,) = ledger.read_ledger(ws.ledger_file)
    guessed = [r for r in rows if r["author_id"] == "p1"]
    plain = {content_hash(r["id"], r["text"]) for r in guessed} | {text_hash(r["text"]) for r in guessed}
    published = set(req.content_hashes) | set(req.text_hashes)
    assert (
        len(req.content_hashes) == 3 and not plain & published
    )  # a guess hashed in the open matches nothing
    keyed = Hasher(read_key(ws.hash_key_file))
    assert {content_hash(r["id"], r["text"], keyed) for r in guessed} == set(req.content_hashes)
    assert (
        kid in (root / "params.yaml").read_text()
        and read_key(ws.hash_key_file).hex()
        not in ledger.states_path(ws.ledger_file).read_text() + ws.ledger_file.read_text()
    )


def test_init_can_reuse_a_key_or_keep_plain_hashes(tmp_path):
    from sisaflow import cli
    from sisaflow.core.config import Params

    src = tmp_path / "c.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"r{i}", "author_id": f"p{i}", "text": f"t{i}"}) + "\n" for i in range(4))
    )
    common = ["--corpus", str(src), "--owner-field", "author_id", "--text-field", "text", "--shards", "2"]
    key = tmp_path / "shared" / "hash-key"
    kid = write_new_key(key)
    assert cli.main(["init", str(tmp_path / "a"), *common, "--hash-key", str(key)]) == 0
    assert Params.load(tmp_path / "a" / "params.yaml").corpus.hash_key == kid
    assert cli.main(["init", str(tmp_path / "b"), *common, "--plain-hashes"]) == 0
    assert Params.load(tmp_path / "b" / "params.yaml").corpus.hash_key is None
    assert not (tmp_path / "b" / ".sisaflow" / "keys" / "hash-key").exists()
    os.chmod(key, 0o644)
    assert cli.main(["init", str(tmp_path / "c"), *common, "--hash-key", str(key)]) != 0
    assert not (tmp_path / "c").exists()  # nothing written


def test_init_in_an_existing_repository_keeps_the_keys_out_of_git(tmp_path):
    """Issue 25, point 8. In a repository whose .gitignore knows nothing of sisaflow, `init` adds its lines, so
    `git add -A` cannot take the hash key; and once a key file is tracked anyway (`git add -f`), every command that
    commits refuses, naming it. Mutants: `init` writing .gitignore only when none exists (the key is then added),
    or `git_commit` without `refuse_tracked_keys` (the commit goes through)."""
    from sisaflow import cli
    from sisaflow.core import versioning
    from sisaflow.core.errors import WorkspaceError
    from sisaflow.core.paths import Workspace

    repo = tmp_path / "project"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    (repo / ".gitignore").write_text("*.log")  # the user's own, without a final newline
    rows = [{"id": f"r{i}", "author_id": f"p{i % 2}", "text": f"note {i}"} for i in range(6)]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--corpus", str(src), "--owner-field", "author_id", "--text-field", "text", "--shards", "2"]
    assert cli.main(["init", str(repo), *common]) == 0
    ws = Workspace(repo)
    assert ws.hash_key_file.is_file()
    lines = (repo / ".gitignore").read_text().splitlines()
    assert lines[0] == "*.log" and "/.sisaflow/" in lines  # the user's line kept, sisaflow's added
    git("add", "-A")
    assert ".sisaflow" not in git("ls-files").stdout
    git("add", "-f", ".sisaflow/keys/hash-key")
    with pytest.raises(WorkspaceError, match=r"git tracks \.sisaflow/keys/hash-key: .*git rm --cached -r"):
        versioning.git_commit(ws, "anything", ["params.yaml"])


def test_a_request_keyed_otherwise_than_the_workspace_stops_the_import(tmp_path):
    """Issue 25, point 6: a request's `hash_key` is compared at import. After the workspace's key changes, its
    content hashes match nothing, so a deleted record that came back under another id would be imported again;
    the import refuses instead, naming the request and both keys, and goes on once the key is restored.
    Mutant: `prepare` without `ledger.require_hash_key`: the import goes through."""
    from sisaflow import cli
    from sisaflow.core.config import Params
    from sisaflow.core.errors import DeletionError
    from sisaflow.core.paths import Workspace
    from sisaflow.pipeline import steps

    rows = [{"id": f"r{i}", "author_id": f"p{i % 2}", "text": f"note {i}"} for i in range(6)]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "ws"
    common = ["--corpus", str(src), "--owner-field", "author_id", "--text-field", "text", "--shards", "2"]
    assert cli.main(["init", str(root), *common]) == 0
    ws = Workspace(root)
    assert (
        cli.main(["--workspace", str(root), "forget", "--owner", "p1", "--request-id", "req-k", "--no-run"])
        == 0
    )
    old_key, old_id = ws.hash_key_file.read_bytes(), Params.load(ws.params_file).corpus.hash_key
    ws.hash_key_file.unlink()
    new_id = write_new_key(ws.hash_key_file)
    text = ws.params_file.read_text()
    ws.params_file.write_text(text.replace(old_id, new_id))
    with pytest.raises(DeletionError, match=rf"corpus.hash_key \({new_id}\): req-k \({old_id}\)"):
        steps.prepare(ws, Params.load(ws.params_file).resolved(root))
    ws.hash_key_file.write_bytes(old_key)  # the key restored: the import goes on
    ws.params_file.write_text(text)
    report = steps.prepare(ws, Params.load(ws.params_file).resolved(root))
    assert report is not None
