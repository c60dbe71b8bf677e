"""certificate: counts and hashes only, a signature that any change breaks, a page that escapes everything."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from sisaflow import __version__
from sisaflow.deletion.certificate import (
    FORMAT,
    KEY_ENV,
    CertificateError,
    build_certificate,
    canonical_json,
    code_version,
    key_from_env,
    params_hash,
    sign,
    verify_file,
    verify_signature,
    write_certificate,
)
from sisaflow.deletion.certificate_schema import FORMAT_1, check_certificate

KEY = b"k" * 32
OWNER = "owner-alice-7731"
RECORD = "rec-secret-0042"
TEXT = "Question: Where was Alice born?\nAnswer: in a secret village"


def h(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def inputs(**over) -> dict:
    kw = {
        "request": {
            "request_id": "req-0123456789ab",
            "owners": [OWNER],
            "records": [RECORD],
            "content_hashes": [h(1)],
            "requested_at": "2025-01-02T03:04:05+00:00",
            "reason": f"GDPR Art. 17 request by {OWNER}",
            "text": TEXT,
        },
        "states": [
            {"state": "pending", "at": "2025-01-02T03:04:05+00:00"},
            {"state": "retrained", "at": "2025-01-02T03:10:00+00:00"},
            {"state": "certified", "at": "2025-01-02T03:11:00+00:00"},
        ],
        "content_hashes": [h(2), h(1)],
        "affected": [
            {"shard": 3, "from_slice": 2, "slices": [3, 2]},
            {"shard": 0, "from_slice": 0, "slices": [0]},
        ],
        "retired_checkpoints": {"shard-3/slice-2": h(10), "shard-3/slice-3": h(11)},
        "new_checkpoints": {"shard-3/slice-3": h(21), "shard-3/slice-2": h(20)},
        "purge_report": {"dvc_cache": 4096, "checkpoints": {"bytes": 1 << 20}, "paths": [f"/x/{OWNER}"]},
        "verify_result": {
            "clean": False,
            "findings": [
                {"location": "logs/run.log:12", "text": TEXT},
                {"location": {"kind": "corpus", "path": f"corpus/{RECORD}"}, "match": RECORD},
                {"location": "logs/other.log", "snippet": OWNER},
            ],
        },
        "code_version": "8ef2634aaaabbbbccccddddeeeeffff00001111-dirty",
        "params_hash": h(99),
        "ensemble_version": "a1b2c3d4e5f6",
        "issued_at": "2025-01-02T03:12:00+00:00",
    }
    kw.update(over)
    return kw


@pytest.fixture
def cert() -> dict:
    return build_certificate(**inputs())


def test_build_keeps_counts_and_hashes_sorted_and_is_unsigned(cert):
    assert cert["format"] == FORMAT and cert["signature"] is None
    assert cert["request"] == {
        "request_id": "req-0123456789ab",
        "owner_count": 1,
        "record_count": 1,
        "requested_at": "2025-01-02T03:04:05+00:00",
        "reason": "other",  # a free-text reason of an older request is never copied
    }
    assert cert["content_hashes"] == sorted([h(1), h(2)])
    assert [a["shard"] for a in cert["affected"]] == [0, 3] and cert["affected"][1]["slices"] == [2, 3]
    assert cert["purge_report"] == {"dvc_cache": 4096, "checkpoints": {"bytes": 1 << 20}}
    assert cert["verify_result"] == {
        "clean": False,
        "findings": 3,
        "findings_by_location": {"corpus": 1, "logs": 2},
    }


def test_no_raw_id_or_text_in_json_or_html(tmp_path, cert):
    json_path, html_path = write_certificate(tmp_path, sign(cert, KEY))
    for path in (json_path, html_path):
        body = path.read_text(encoding="utf-8")
        for secret in (OWNER, RECORD, "Alice", "secret village"):
            assert secret not in body, (path.name, secret)
    assert "GDPR Art. 17 request by" not in html_path.read_text(encoding="utf-8")


def test_a_reason_is_carried_as_its_code_only():
    """Issue 25, point 1. Mutant: copying the reason as free text (redacting ids, as before): the quote of the
    record stays in the certificate."""
    quoting = inputs(request={**inputs()["request"], "reason": "she said: I live in the secret village"})
    assert build_certificate(**quoting)["request"]["reason"] == "other"
    coded = inputs(request={**inputs()["request"], "reason": "consent-withdrawn"})
    assert build_certificate(**coded)["request"]["reason"] == "consent-withdrawn"
    assert (
        build_certificate(**inputs(request={**inputs()["request"], "reason": None}))["request"]["reason"]
        is None
    )


def test_the_scan_coverage_is_stated_and_signed(tmp_path):
    """Places the scan left out, and the records the user's source still holds, go into the certificate (counts
    only) and under its signature; a certificate from before they existed still verifies."""
    scan = {
        "clean": True,
        "findings": 0,
        "not_searched": {"corpus-source": 1, "dvc-remote": 1},
        "source_holds": 4,
    }
    cert = build_certificate(**inputs(verify_result=scan))
    assert cert["verify_result"] == {
        "clean": True,
        "findings": 0,
        "findings_by_location": {},
        "not_searched": {"corpus-source": 1, "dvc-remote": 1},
        "source_holds": 4,
    }
    json_path, html_path = write_certificate(tmp_path, sign(cert, KEY))
    page = html_path.read_text(encoding="utf-8")
    assert (
        "the DVC remote (it could not be reached, opened or listed): 1" in page
        and "still holds 4 of the request" in page
    )
    assert verify_file(json_path, KEY)[0]
    tampered = json.loads(json_path.read_text())
    tampered["verify_result"]["not_searched"] = {"corpus-source": 1}  # hiding the unsearched remote
    json_path.write_text(json.dumps(tampered))
    assert not verify_file(json_path, KEY)[0]
    old = sign(build_certificate(**inputs(verify_result={"clean": True, "findings": 0})), KEY)
    assert "not_searched" not in old["verify_result"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert verify_file(tmp_path / "old.json", KEY)[0]


def test_an_id_that_would_survive_is_refused():
    req = {**inputs()["request"], "request_id": OWNER}
    with pytest.raises(CertificateError, match="id"):
        build_certificate(**inputs(request=req))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"content_hashes": ["not-a-hash"]}, "content_hashes"),
        ({"states": [{"state": "done", "at": "2025-01-02T03:04:05+00:00"}]}, "states"),
        ({"states": [{"state": "pending", "at": "yesterday"}]}, "states"),
        ({"new_checkpoints": {"shard-3": h(1)}}, "new_checkpoints"),
        ({"affected": [{"shard": -1, "from_slice": 0, "slices": []}]}, "affected"),
        ({"issued_at": ""}, "issued_at"),
        (
            {"verify_result": {"clean": True, "findings": 0, "not_searched": {"dvc-remote": -1}}},
            "not_searched",
        ),
        ({"request": {**inputs()["request"], "request_id": "../../etc/x"}}, "request_id"),
    ],
)
def test_bad_input_is_refused_naming_the_field(change, match):
    with pytest.raises(CertificateError, match=match):
        build_certificate(**inputs(**change))


def test_sign_then_verify_round_trip(cert):
    signed = sign(cert, KEY)
    assert signed["signature"]["alg"] == "HMAC-SHA256" and len(signed["signature"]["value"]) == 64
    assert verify_signature(signed, KEY)
    assert cert["signature"] is None  # sign returns a copy


def _tamper_hash(c):
    c["content_hashes"][0] = h(3)


def _tamper_time(c):
    c["states"][1]["at"] = "2025-01-02T03:09:59+00:00"


def _tamper_count(c):
    c["request"]["owner_count"] = 0


def _tamper_checkpoint(c):
    c["new_checkpoints"]["shard-3/slice-3"] = h(11)


def _tamper_verify(c):
    c["verify_result"]["clean"] = True


def _tamper_signature(c):
    c["signature"]["value"] = "0" * 64


@pytest.mark.parametrize(
    "tamper",
    [_tamper_hash, _tamper_time, _tamper_count, _tamper_checkpoint, _tamper_verify, _tamper_signature],
)
def test_any_change_breaks_the_signature(tmp_path, cert, tamper):
    signed = sign(cert, KEY)
    changed = copy.deepcopy(signed)
    tamper(changed)
    assert changed != signed
    assert not verify_signature(changed, KEY)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(changed))
    assert verify_file(path, KEY) == (
        False,
        f"{path}: signature does not match: the certificate was changed or the key differs",
    )


def test_wrong_key_fails(tmp_path, cert):
    json_path, _ = write_certificate(tmp_path, sign(cert, KEY))
    assert not verify_signature(sign(cert, KEY), b"x" * 32)
    ok, msg = verify_file(json_path, b"x" * 32)
    assert not ok and msg.startswith(f"{json_path}: signature does not match")


def test_unsigned_certificate_says_unsigned(tmp_path, cert):
    json_path, _ = write_certificate(tmp_path, cert)
    for key in (KEY, None):
        ok, msg = verify_file(json_path, key)
        assert not ok and msg.startswith(f"{json_path}: unsigned")
    assert not verify_signature(cert, KEY)


def test_signed_certificate_without_a_key_is_not_called_valid(tmp_path, cert):
    json_path, _ = write_certificate(tmp_path, sign(cert, KEY))
    ok, msg = verify_file(json_path, None)
    assert not ok and KEY_ENV in msg


ENVS = {
    "shard-3": [
        {"torch": "2.12.0", "transformers": "5.24.0", "device": "cpu AVX2"},
        {"torch": "2.13.0", "transformers": "5.24.0", "device": "cpu AVX2"},
    ]
}


def test_the_training_environments_are_stated_and_signed(tmp_path):
    """Per retrained shard, the environments that trained its new checkpoints: in the JSON, on the page, under
    the signature; a certificate without them (made before they existed) stays valid."""
    cert = build_certificate(**inputs(training_environments=ENVS))
    assert cert["training_environments"] == ENVS
    json_path, html_path = write_certificate(tmp_path, sign(cert, KEY))
    page = html_path.read_text(encoding="utf-8")
    assert "Training environments" in page
    assert "torch 2.12.0, transformers 5.24.0, cpu AVX2; then torch 2.13.0" in page
    assert verify_file(json_path, KEY)[0]
    tampered = json.loads(json_path.read_text())
    tampered["training_environments"]["shard-3"].pop(0)  # hiding the older library
    json_path.write_text(json.dumps(tampered))
    assert not verify_file(json_path, KEY)[0]
    assert "training_environments" not in build_certificate(**inputs())


@pytest.mark.parametrize(
    "envs",
    [
        {"3": ENVS["shard-3"]},
        {"shard-3": []},
        {"shard-3": [{"torch": 2}]},
        {"shard-3": [{"bad key!": "x"}]},
        {"shard-3": ["torch 2.13.0"]},
    ],
)
def test_bad_training_environments_are_refused(envs):
    with pytest.raises(CertificateError, match="training_environments"):
        build_certificate(**inputs(training_environments=envs))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c.update(format="sisaflow-deletion-certificate/9"), "unknown format"),
        (lambda c: c.pop("content_hashes"), "missing field"),
        (lambda c: c.update(owners=[OWNER]), "unexpected field"),
        (lambda c: c["request"].update(owners=[OWNER]), "request"),
        (lambda c: c.update(signature={"alg": "MD5", "value": "00"}), "signature"),
    ],
)
def test_malformed_certificate_is_named(tmp_path, cert, mutate, match):
    signed = sign(cert, KEY)
    mutate(signed)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(signed))
    ok, msg = verify_file(path, KEY)
    assert not ok and msg.startswith(f"{path}: malformed certificate: ") and match in msg
    assert "\n" not in msg


def test_not_json_is_malformed(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    ok, msg = verify_file(path, KEY)
    assert not ok and msg.startswith(f"{path}: malformed certificate: not JSON")


def test_html_escapes_a_malicious_reason(tmp_path):
    """A certificate of an older sisaflow carries free text as its reason: the page still escapes it."""
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>&amp;'
    cert = build_certificate(**inputs())
    cert["request"]["reason"] = evil
    _, html_path = write_certificate(tmp_path, cert)
    page = html_path.read_text(encoding="utf-8")
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page and "&amp;amp;" in page


def test_canonical_json_does_not_depend_on_insertion_order(cert):
    reordered = {k: cert[k] for k in reversed(list(cert))}
    reordered["request"] = {k: cert["request"][k] for k in reversed(list(cert["request"]))}
    assert list(reordered) != list(cert)
    assert canonical_json(reordered) == canonical_json(cert)
    assert b" " not in canonical_json({"a": 1, "b": [1, 2]}) and canonical_json({"b": 1, "a": "\u00e9"}) == (
        '{"a":"\u00e9","b":1}'.encode()
    )
    assert sign(reordered, KEY)["signature"] == sign(cert, KEY)["signature"]


def test_write_certificate_files_round_trip_and_verify(tmp_path, cert):
    signed = sign(cert, KEY)
    json_path, html_path = write_certificate(tmp_path / "certificates", signed)
    assert json_path.name == "req-0123456789ab.json" and html_path.name == "req-0123456789ab.html"
    assert json.loads(json_path.read_text(encoding="utf-8")) == signed
    assert json_path.read_text(encoding="utf-8") == json.dumps(signed, indent=2, sort_keys=True) + "\n"
    assert verify_file(json_path, KEY) == (
        True,
        f"{json_path}: valid: HMAC-SHA256 signature matches; request req-0123456789ab",
    )
    page = html_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    for external in ("http://", "https://", "<link", "<script", "src="):
        assert external not in page
    assert h(1)[:12] in page and h(1) in page  # short form, and the full list in <details>
    assert h(10) in page and h(21) in page and "4096" in page and "corpus" in page
    assert sorted(p.name for p in json_path.parent.iterdir()) == [html_path.name, json_path.name]


def test_write_refuses_a_malformed_certificate(tmp_path, cert):
    bad = {**cert, "request": {**cert["request"], "request_id": "../escape"}}
    with pytest.raises(CertificateError):
        write_certificate(tmp_path, bad)
    assert not list(tmp_path.iterdir())


def test_key_from_env(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert key_from_env() is None
    monkeypatch.setenv(KEY_ENV, "")
    assert key_from_env() is None
    monkeypatch.setenv(KEY_ENV, "ab" * 32)
    assert key_from_env() == ("ab" * 32).encode()


def test_params_hash_is_of_the_loaded_params(tmp_path):
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text("sharding:\n  shards: 2\n")
    b.write_text("# defaults spelled out, other key order\nsharding:\n  slices: 4\n  shards: 2\ntrain: {}\n")
    c.write_text("sharding:\n  shards: 3\n")
    assert params_hash(a) == params_hash(b)
    assert params_hash(a) != params_hash(c)
    assert len(params_hash(a)) == 64


def test_code_version_is_the_commit_and_says_dirty(tmp_path):
    def git(*args):
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            cwd=tmp_path / "repo",
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    pkg = tmp_path / "repo" / "src" / "sisaflow"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "c")
    head = git("rev-parse", "HEAD")
    assert code_version(pkg) == head
    (tmp_path / "repo" / "notes.txt").write_text("outside src/ does not count\n")
    assert code_version(pkg) == head
    (pkg / "__init__.py").write_text("x = 2\n")
    assert code_version(pkg) == head + "-dirty"
    untracked = tmp_path / "repo" / "venv" / "sisaflow"
    untracked.mkdir(parents=True)
    assert code_version(untracked) == __version__  # inside a repository that does not track it
    outside = tmp_path / "plain"
    outside.mkdir()
    assert code_version(outside) == __version__


# ---- the format: a JSON Schema, format 2 with retired files, format 1 still read ----

DATA = Path(__file__).parent / "data"


def test_a_format_1_hmac_certificate_of_an_older_sisaflow_still_verifies(tmp_path):
    """data/format1-hmac.json was written by sisaflow before format 2 (signed with KEY): still valid, and still
    a check (a change breaks it)."""
    old = DATA / "format1-hmac.json"
    cert = json.loads(old.read_text())
    assert cert["format"] == FORMAT_1 and "retired_files" not in cert
    assert verify_file(old, KEY) == (
        True,
        f"{old}: valid: HMAC-SHA256 signature matches; request req-0123456789ab",
    )
    cert["retired_checkpoints"]["shard-3/slice-2"] = h(12)
    (tmp_path / "old.json").write_text(json.dumps(cert))
    assert verify_file(tmp_path / "old.json", KEY)[1].endswith(
        "signature does not match: the certificate was changed or the key differs"
    )
    assert "retired_files" in check_certificate({**cert, "retired_files": {}})  # not part of format 1


def test_retired_files_are_stated_default_to_the_weights_and_agree_with_them(tmp_path):
    files = {
        "shard-3/slice-3": {"optimizer.safetensors": h(13), "model.safetensors": h(11)},
        "shard-3/slice-2": {"optimizer.safetensors": h(12), "model.safetensors": h(10)},
    }
    cert = build_certificate(**inputs(retired_files=files))
    assert cert["format"] == FORMAT == "sisaflow-deletion-certificate/2"
    assert list(cert["retired_files"]) == ["shard-3/slice-2", "shard-3/slice-3"]
    assert cert["retired_files"]["shard-3/slice-2"] == {
        "model.safetensors": h(10),
        "optimizer.safetensors": h(12),
    }
    _, html_path = write_certificate(tmp_path, sign(cert, KEY))
    page = html_path.read_text()
    assert "Retired files" in page and h(13) in page and "optimizer.safetensors" in page
    # without them (a request applied before optimizer state was recorded): the weights alone
    assert build_certificate(**inputs())["retired_files"] == {
        "shard-3/slice-2": {"model.safetensors": h(10)},
        "shard-3/slice-3": {"model.safetensors": h(11)},
    }
    for bad in (
        {**files, "shard-3/slice-2": {"model.safetensors": h(99), "optimizer.safetensors": h(12)}},
        {"shard-3/slice-2": files["shard-3/slice-2"]},
        {**files, "shard-3/slice-3": {"optimizer.safetensors": h(13)}},
        {**files, "shard-3/slice-3": {"model.safetensors": h(11), "meta.json": h(5)}},
    ):
        with pytest.raises(CertificateError, match="retired_files"):
            build_certificate(**inputs(retired_files=bad))


def test_the_schema_is_published_and_shipped_with_the_package():
    """A valid draft 2020-12 schema in the package directory, which pyproject's package-data ships in a wheel."""
    import tomllib

    from jsonschema import Draft202012Validator

    from sisaflow.deletion import certificate_schema

    src = Path(certificate_schema.__file__).parent
    on_disk = json.loads((src / certificate_schema.SCHEMA_FILE).read_text())
    Draft202012Validator.check_schema(on_disk)
    assert certificate_schema.schema() == on_disk
    pyproject = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["sisaflow"]
    package = src.parent
    shipped = {p for g in globs for p in package.glob(g)}
    assert src / certificate_schema.SCHEMA_FILE in shipped
    deps = " ".join(pyproject["project"]["dependencies"])
    assert "jsonschema" in deps and "cryptography" in deps


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.pop("retired_files"),
        lambda c: c.update(format=FORMAT_1),  # format 1 has no retired_files
        lambda c: c["request"].update(owner_count=-1),
        lambda c: c["states"].append({"state": "forgotten", "at": c["issued_at"]}),
        lambda c: c["verify_result"].update(extra=1),
        lambda c: c.update(signature={"alg": "ed25519", "value": "ab" * 64}),  # no key fingerprint
        lambda c: c.update(signature={"alg": "HMAC-SHA256", "value": "ab" * 64}),
        lambda c: c["retired_files"]["shard-3/slice-2"].update({"lineage.json": h(1)}),
    ],
)
def test_what_the_schema_refuses_a_plain_validator_refuses_too(cert, mutate):
    """The published file is the definition: an outsider validating with jsonschema alone agrees with sisaflow."""
    from jsonschema import Draft202012Validator

    from sisaflow.deletion.certificate_schema import schema

    outsider = Draft202012Validator(schema())
    assert outsider.is_valid(cert) and check_certificate(cert) is None
    changed = copy.deepcopy(cert)
    mutate(changed)
    assert not outsider.is_valid(changed)
    assert check_certificate(changed) is not None


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c: c["request"].update(request_id="req-1\n"), "control character"),
        (lambda c: c["purge_report"].update(dvc_cache=float("nan")), "finite"),
        (
            lambda c: c["retired_files"]["shard-3/slice-2"].update({"model.safetensors": h(5)}),
            "retired_files",
        ),
    ],
)
def test_what_a_schema_cannot_say_is_checked_in_code(cert, mutate, match):
    changed = copy.deepcopy(cert)
    mutate(changed)
    assert match in (check_certificate(changed) or "")


def test_a_certificate_says_how_its_record_hashes_were_made():
    from sisaflow.deletion.certificate_schema import check_certificate

    assert build_certificate(**inputs())["record_hashes"] == {"alg": "sha256"}
    keyed = build_certificate(**inputs(), hash_key_id="hk-0123456789abcdef")
    assert keyed["record_hashes"] == {"alg": "hmac-sha256", "key_id": "hk-0123456789abcdef"}
    with pytest.raises(CertificateError, match="record_hashes"):
        build_certificate(**inputs(), hash_key_id="the key itself")
    older = {k: v for k, v in keyed.items() if k != "record_hashes"}
    assert check_certificate(older) is None  # certificates from before keyed hashes stay valid
