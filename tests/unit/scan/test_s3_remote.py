"""The scan searches a DVC remote in an object store (S3, a real S3-compatible server: moto's) like a local one,
and names it as not searched when it cannot reach it."""

from __future__ import annotations

import io
import json

import pyarrow.parquet as pq
import pytest

from sisaflow.data.corpus import to_table
from sisaflow.scan import places
from tests.s3_server import BUCKET, S3Server, use_as_dvc_remote
from tests.unit.scan.test_places import DELETED_OWNER, _base, _records, _targets


@pytest.fixture(scope="module")
def s3():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3Server.env().items():
            mp.setenv(k, v)
        server = S3Server().start()
        server.make_bucket()
        yield server
        server.stop()


def _parquet(records) -> bytes:
    buf = io.BytesIO()
    pq.write_table(to_table(records), buf, compression="zstd")
    return buf.getvalue()


def test_objects_of_an_s3_remote_are_searched(tmp_path, s3):
    ws, params = _base(tmp_path / "ws", tmp_path / "unused")
    use_as_dvc_remote(ws.root, s3, f"s3://{BUCKET}/searched")
    recs = {r.record_id: r for r in _records()}
    r1, kept = recs["rec-0001"], [r for r in _records() if r.owner != DELETED_OWNER]
    put = s3.client().put_object
    put(Bucket=BUCKET, Key="searched/files/md5/ab/" + "c" * 30, Body=_parquet([r1]))  # an old slice file
    lineage = json.dumps(sorted([r1.content_hash, recs["rec-0010"].content_hash]))  # an old lineage.json
    put(Bucket=BUCKET, Key="searched/files/md5/cd/" + "e" * 30, Body=lineage.encode())
    put(
        Bucket=BUCKET, Key="searched/files/md5/ef/" + "1" * 30, Body=_parquet(kept)
    )  # current: nothing deleted
    put(Bucket=BUCKET, Key="elsewhere/" + "2" * 32, Body=r1.text.encode())  # outside the remote's prefix

    rep = places.scan_report(ws, params, _targets(ws, params))
    found = {(f.where, f.what, f.record_id) for f in rep.findings}
    assert found == {
        *(
            (f"dvc-remote:files/md5/ab/{'c' * 30}", w, "rec-0001")
            for w in ("text", "content_hash", "record_id")
        ),
        (f"dvc-remote:files/md5/cd/{'e' * 30}", "content_hash", "rec-0001"),
    }
    assert rep.not_searched() == {"corpus-source": 1}
    assert rep.findings_by_location()["dvc-remote"] == 4


def test_an_s3_remote_whose_server_is_stopped_is_named_not_searched(tmp_path, s3):
    ws, params = _base(tmp_path / "ws", tmp_path / "unused")
    gone = S3Server().start()
    gone.stop()  # a port where an S3 server was: nothing answers there now
    use_as_dvc_remote(ws.root, gone, f"s3://{BUCKET}/searched")
    rep = places.scan_report(ws, params, _targets(ws, params))
    assert rep.findings == []
    assert rep.not_searched() == {"corpus-source": 1, "dvc-remote": 1}
    note = next(n for n in rep.notes if n.startswith("DVC remote 'storage'"))
    assert f"s3://{BUCKET}/searched" in note and note.endswith("not searched")
