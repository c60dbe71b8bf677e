"""fsio: atomic writes leave the old file or the new one, never half of one, and no temporary files."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import pytest

from sisaflow.core import fsio


class Boom(Exception):
    pass


def _listing(directory):
    return sorted(p.name for p in directory.iterdir())


def test_write_bytes_creates_file_and_parents(tmp_path):
    target = tmp_path / "a" / "b" / "f.bin"
    fsio.write_bytes(target, b"\x00\x01hello")
    assert target.read_bytes() == b"\x00\x01hello"
    assert _listing(target.parent) == ["f.bin"]


def test_write_replaces_existing_content(tmp_path):
    target = tmp_path / "f.txt"
    fsio.write_text(target, "old")
    fsio.write_text(target, "new ✓")
    assert target.read_text(encoding="utf-8") == "new ✓"
    assert _listing(tmp_path) == ["f.txt"]


def test_atomic_path_failing_writer_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old content")
    seen_tmp = []
    with pytest.raises(Boom):
        with fsio.atomic_path(target) as tmp:
            seen_tmp.append(tmp)
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_text("half of the new cont")
            raise Boom
    assert target.read_text() == "old content"
    assert not seen_tmp[0].exists()
    assert _listing(tmp_path) == ["f.txt"]


def test_atomic_path_failing_writer_with_no_old_file_creates_nothing(tmp_path):
    target = tmp_path / "new.txt"
    with pytest.raises(Boom):
        with fsio.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise Boom
    assert _listing(tmp_path) == []


def test_atomic_path_keyboard_interrupt_also_cleans_up(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with fsio.atomic_path(target) as tmp:
            tmp.write_text("x")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert _listing(tmp_path) == ["f.txt"]


def test_atomic_file_mode_follows_umask_not_mkstemp(tmp_path):
    target = tmp_path / "f.txt"
    fsio.write_text(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_atomic_dir_replaces_whole_directory(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "stale.txt").write_text("stale")
    with fsio.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("A")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("B")
    assert _listing(target) == ["a.txt", "sub"]
    assert (target / "sub" / "b.txt").read_text() == "B"
    assert _listing(tmp_path) == ["ckpt"]


def test_atomic_dir_failure_keeps_old_directory_and_leaves_no_temp(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "model.bin").write_bytes(b"old weights")
    with pytest.raises(Boom):
        with fsio.atomic_dir(target) as tmp:
            (tmp / "model.bin").write_bytes(b"new wei")
            raise Boom
    assert _listing(target) == ["model.bin"]
    assert (target / "model.bin").read_bytes() == b"old weights"
    assert _listing(tmp_path) == ["ckpt"]


def test_atomic_dir_failure_without_old_directory_creates_nothing(tmp_path):
    with pytest.raises(Boom):
        with fsio.atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "x").write_text("x")
            raise Boom
    assert _listing(tmp_path) == []


def test_write_json_is_canonical(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    fsio.write_json(a, {"b": 1, "a": [1, 2, {"z": None, "y": 1.5}]})
    fsio.write_json(b, {"a": [1, 2, {"y": 1.5, "z": None}], "b": 1})
    assert a.read_bytes() == b.read_bytes()
    assert a.read_text().endswith("\n")
    assert a.read_text().index('"a"') < a.read_text().index('"b"')
    assert fsio.read_json(a) == {"a": [1, 2, {"y": 1.5, "z": None}], "b": 1}
    assert json.loads(a.read_text()) == fsio.read_json(a)


def test_hashes_known_answers(tmp_path):
    assert fsio.sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    f = tmp_path / "big.bin"
    data = os.urandom((1 << 20) * 2 + 17)  # spans several read blocks
    f.write_bytes(data)
    assert fsio.sha256_file(f) == hashlib.sha256(data).hexdigest()


def test_digest_is_length_prefixed_and_order_sensitive():
    expected = hashlib.sha256()
    for part in ("ab", "c"):
        b = part.encode()
        expected.update(len(b).to_bytes(8, "big") + b)
    assert fsio.digest(["ab", "c"]) == expected.hexdigest()
    assert fsio.digest(["ab", "c"]) == fsio.digest(("ab", "c"))
    assert fsio.digest(["ab", "c"]) != fsio.digest(["a", "bc"])
    assert fsio.digest(["ab", "c"]) != fsio.digest(["c", "ab"])
    assert fsio.digest(["abc"]) != fsio.digest(["abc", ""])
