"""The markdown a forget flow run publishes: every request with its outcome, retrained shards, cost, purge, scan."""

from __future__ import annotations

from sisaflow.deletion.leftovers import ScanSummary
from sisaflow.deletion.purge import PurgeReport, Removed
from sisaflow.flows.artifacts import artifact_key, deletion_markdown
from sisaflow.pipeline.report import RunReport, RunResult


def _result(**report) -> RunResult:
    return RunResult(
        RunReport(kind="forget", **report), {}, {}, cost_model=0.125, cost_model_formula="(1/S)(R+1)/(2R)"
    )


def test_each_request_shows_its_outcome_and_certificate_links(tmp_path):
    cert = tmp_path / "certificates" / "req-a.json"
    r = _result(
        requests=["req-a", "req-b", "req-c"],
        retrained_requests=["req-a", "req-b"],
        certificates={"req-a": [str(cert), str(cert.with_suffix(".html"))]},
        trained={2: {"from_slice": 1, "tokens": 1500, "seconds": 3.25, "environments": []}},
        training_tokens=1500,
        full_training_tokens=12000,
        purge=PurgeReport(removed=[Removed("dvc-cache", "/x", 300), Removed("dvc-remote", "/y", 200)]),
        verify=ScanSummary(
            clean=False, findings=2, findings_by_location={"dvc-cache": 2}, not_searched={"s3": 1}
        ),
    )
    md = deletion_markdown(r)
    assert (
        f"| `req-a` | certified | [json]({cert.as_uri()}) / [html]({cert.with_suffix('.html').as_uri()}) |"
        in md
    )
    assert "| `req-b` | retrained and purged, not certified (see the scan) | - |" in md
    assert "| `req-c` | waits for the next run | - |" in md
    assert "| 2 | 1 | 1,500 | 3.2 |" in md
    assert "1,500 training tokens, 0.125 of a full training (12,000); the cost model expects 0.125" in md
    assert "purge removed 2 item(s), 500 bytes (dvc-cache 300 B, dvc-remote 200 B)" in md
    assert "scan: 2 copy(ies) found (dvc-cache: 2)" in md and "not searched: s3 (1)" in md


def test_a_run_that_applied_nothing_says_so():
    md = deletion_markdown(_result())
    assert "## Shards retrained\n\nnone" in md and "no purge (no request applied)" in md


def test_the_key_is_one_per_workspace_and_valid_for_prefect(tmp_path):
    import re

    a, b = artifact_key(str(tmp_path / "a")), artifact_key(str(tmp_path / "b"))
    assert a != b and a == artifact_key(str(tmp_path / "x" / ".." / "a"))
    assert re.fullmatch(r"[a-z0-9-]+", a)
