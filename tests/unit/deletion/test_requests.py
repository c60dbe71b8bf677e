"""requests: request files of JSON lines or bare owner ids; errors name the line."""

from __future__ import annotations

import pytest

from sisaflow.core.errors import DeletionError
from sisaflow.deletion.requests import read_request_file


def write(tmp_path, text):
    p = tmp_path / "forget.txt"
    p.write_text(text, encoding="utf-8")
    return p


def test_json_lines(tmp_path):
    p = write(
        tmp_path, '{"owner": "alice"}\n{"record": ["r1", "r2"]}\n{"owner": ["bob", 7], "record": "r3"}\n'
    )
    assert read_request_file(p) == (["alice", "bob", "7"], ["r1", "r2", "r3"])


def test_bare_ids_are_owners_and_comments_blanks_skipped(tmp_path):
    p = write(tmp_path, "# people to forget\nalice\n\n   bob  \n# carol\n")
    assert read_request_file(p) == (["alice", "bob"], [])


def test_mixed(tmp_path):
    p = write(tmp_path, 'alice\n{"record": "r1"}\n')
    assert read_request_file(p) == (["alice"], ["r1"])


def test_malformed_line_names_the_line(tmp_path):
    p = write(tmp_path, 'alice\n{"owner": "bob"}\n{"owner": "carol"\n')
    with pytest.raises(DeletionError) as e:
        read_request_file(p)
    assert f"{p}:3" in str(e.value) and "malformed JSON" in str(e.value)


@pytest.mark.parametrize(
    "line",
    [
        '{"user": "x"}',
        "{}",
        '{"owner": []}',
        '{"owner": ""}',
        '{"record": [null]}',
        '{"owner": {"a": 1}}',
        '{"owner": "a", "extra": 1}',
    ],
)
def test_invalid_objects_name_the_line(tmp_path, line):
    p = write(tmp_path, "alice\n" + line + "\n")
    with pytest.raises(DeletionError) as e:
        read_request_file(p)
    assert f"{p}:2" in str(e.value)


def test_empty_file(tmp_path):
    with pytest.raises(DeletionError, match="names no owner or record"):
        read_request_file(write(tmp_path, ""))
    with pytest.raises(DeletionError, match="names no owner or record"):
        read_request_file(write(tmp_path, "\n# only a comment\n\n"))


def test_missing_file(tmp_path):
    with pytest.raises(DeletionError, match="not found"):
        read_request_file(tmp_path / "nope.txt")


@pytest.mark.parametrize("line", ['{"owner": true}', '{"record": [false]}'])
def test_boolean_ids_are_refused(tmp_path, line):
    p = write(tmp_path, line + "\n")
    with pytest.raises(DeletionError, match=":1"):
        read_request_file(p)
