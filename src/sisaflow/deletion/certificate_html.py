"""A deletion certificate as one self-contained HTML page for people; the JSON file stays the record.

No external assets (styles inline, no scripts), and every value is HTML-escaped: a request's reason is free text.
"""

from __future__ import annotations

import html
from typing import Any


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table(head: tuple[str, ...], rows: list[tuple[Any, ...]], empty: str = "none") -> str:
    if not rows:
        return f"<p class=muted>{_e(empty)}</p>"
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _flat(report: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in sorted(report.items()):
        name = f"{prefix}{key}"
        rows += _flat(value, name + ".") if isinstance(value, dict) else [(name, value)]
    return rows


UNSEARCHED = {
    "corpus-source": "the corpus source named in params (the user's input, which sisaflow never writes)",
    "evaluation-input": "evaluation inputs named in params (the user's files, never written)",
    "dvc-remote": "the DVC remote (it could not be reached, opened or listed)",
    "prefect-home": "a Prefect home or result storage on this machine that could not be read",
    "prefect-server": "the Prefect server PREFECT_API_URL names, on another machine (its database)",
    "prefect-database": "Prefect's database (a database server, not a file here)",
    "prefect-result-storage": "Prefect's default result storage block (a bucket or remote file system)",
    "skipped-file": "files skipped (unreadable, or over the size limit)",
}


def _coverage(verify: dict) -> str:
    """What the scan did not search, and what is left in the user's own source."""
    out = ""
    unsearched = verify.get("not_searched")
    if unsearched:
        items = "".join(f"<li>{_e(UNSEARCHED.get(k, k))}: {n}</li>" for k, n in unsearched.items())
        out += f"<p>Not searched:</p><ul>{items}</ul>"
    holds = verify.get("source_holds")
    if holds:
        out += (
            f"<p class=bad>The corpus source still holds {holds} of the request's records. sisaflow never "
            "writes it, and re-imports leave them out; erase them there.</p>"
        )
    elif holds == 0:
        out += (
            "<p class=ok>The corpus source no longer holds any of the request's records (so the scan had no "
            "text to look for: it searched by content hash).</p>"
        )
    return out


def _per_shard(retired: dict[str, str], new: dict[str, str]) -> list[tuple[Any, ...]]:
    def order(name: str) -> tuple[int, int]:
        shard, _, slice_ = name.partition("/")
        return int(shard.removeprefix("shard-")), int(slice_.removeprefix("slice-"))

    return [
        (name.split("/")[0], name.split("/")[1], retired.get(name, "-"), new.get(name, "-"))
        for name in sorted(set(retired) | set(new), key=order)
    ]


def _retired_files(files: dict | None) -> list[str]:
    """Every retired file (weights and optimizer state) with its sha256, if the certificate records them."""
    if not files:
        return []
    rows = [(ckpt, name, digest) for ckpt, by_name in files.items() for name, digest in by_name.items()]
    return [
        "<h2>Retired files (sha256)</h2>",
        "<p>Every file of the retired checkpoints that holds what training learnt from the records: the weights, "
        "and the optimizer state (its moments are running sums of their gradients). A copy of any of them is a "
        "copy of the records; the scan looked for each, byte for byte.</p>",
        _table(("checkpoint", "file", "sha256"), rows),
    ]


def _environments(envs: dict | None) -> list[str]:
    """The environments that retrained each shard, if the certificate records them."""
    if not envs:
        return []
    from sisaflow.training.checkpoint import describe_environment

    rows = [(shard, "; then ".join(describe_environment(e) for e in v)) for shard, v in sorted(envs.items())]
    return [
        "<h2>Training environments</h2>",
        "<p>Retraining repeats bit for bit within one environment: check the new checkpoints under this one.</p>",
        _table(("shard", "library versions, processor"), rows),
    ]


_CSS = (
    "body{font:14px/1.45 system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.4em 0 1em}th,td{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:left;vertical-align:top}th{background:#f3f3f3}td{font-family:ui-monospace,monospace}"
    ".muted{color:#777}.ok{color:#060}.bad{color:#a00}code{word-break:break-all}"
)


def _hashing(scheme: dict | None) -> str:
    if scheme and scheme.get("alg") == "hmac-sha256":
        return f"HMAC-SHA256 under the workspace's secret key {scheme.get('key_id')}: they match no guessed record"
    return "plain sha256"


def render_html(cert: dict) -> str:
    """One self-contained page (no external assets) showing a certificate; every value is HTML-escaped."""
    req, hashes = cert["request"], cert["content_hashes"]
    sig = cert["signature"]
    if not sig:
        sig_line = "<p class=bad>unsigned: nothing shows this certificate is unchanged.</p>"
    elif sig.get("public_key_sha256"):
        sig_line = (
            f"<p class=ok>signed ({_e(sig['alg'])}) by the key whose public key has sha256 "
            f"<code>{_e(sig['public_key_sha256'])}</code>: <code>{_e(sig['value'])}</code>. Check it with "
            f"<code>sisaflow certificate --verify {_e(req['request_id'])}.json --public-key PUB</code>, or with "
            "the few lines of Python in sisaflow's docs/deletion.md, holding the operator's public key only.</p>"
        )
    else:
        sig_line = (
            f"<p class=ok>signed ({_e(sig['alg'])}): <code>{_e(sig['value'])}</code>. Check it with "
            f"<code>sisaflow certificate --verify {_e(req['request_id'])}.json</code> and the shared key.</p>"
        )
    verify = cert["verify_result"]
    if verify is None:
        verify_html = "<p class=muted>no scan recorded</p>"
    else:
        verdict = "clean" if verify["clean"] else f"{verify['findings']} finding(s)"
        verify_html = (
            f"<p class={'ok' if verify['clean'] else 'bad'}>{_e(verdict)}</p>"
            + _table(
                ("location kind", "findings"), list(verify["findings_by_location"].items()), "no findings"
            )
            + _coverage(verify)
        )
    purge = cert["purge_report"]
    purge_html = (
        "<p class=muted>no purge recorded</p>"
        if purge is None
        else _table(("kind", "bytes / value"), _flat(purge), "nothing purged")
    )
    short = " ".join(f"<code>{_e(h[:12])}</code>" for h in hashes)
    full = "".join(f"<li><code>{_e(h)}</code></li>" for h in hashes)
    sections = [
        f"<h1>Deletion certificate <code>{_e(req['request_id'])}</code></h1>",
        f"<p>Issued {_e(cert['issued_at'])}. Format {_e(cert['format'])}. The JSON file is the record; "
        "this page shows it.</p>",
        "<h2>Request</h2>",
        _table(
            ("field", "value"),
            [
                ("request id", req["request_id"]),
                ("requested at", req["requested_at"]),
                ("owners named", req["owner_count"]),
                ("records named by id", req["record_count"]),
                ("records removed (content hashes)", len(hashes)),
                ("record hashes", _hashing(cert.get("record_hashes"))),
                ("reason", req["reason"] if req["reason"] is not None else "-"),
            ],
        ),
        "<h2>Timeline</h2>",
        _table(("state", "at"), [(s["state"], s["at"]) for s in cert["states"]]),
        f"<h2>Content hashes removed ({len(hashes)})</h2>",
        f"<p>{short or '<span class=muted>none</span>'}</p>",
        f"<details><summary>full list</summary><ul>{full}</ul></details>",
        "<h2>Affected shards</h2>",
        _table(
            ("shard", "retrained from slice", "slices"),
            [(a["shard"], a["from_slice"], ", ".join(map(str, a["slices"]))) for a in cert["affected"]],
        ),
        "<h2>Checkpoints: retired &rarr; new (sha256 of weights)</h2>",
        _table(
            ("shard", "slice", "retired", "new"),
            _per_shard(cert["retired_checkpoints"], cert["new_checkpoints"]),
        ),
        *_retired_files(cert.get("retired_files")),
        *_environments(cert.get("training_environments")),
        "<h2>Purge</h2>",
        purge_html,
        "<h2>Post-deletion scan</h2>",
        verify_html,
        "<h2>Provenance</h2>",
        _table(
            ("field", "value"),
            [
                ("code version", cert["code_version"]),
                ("params hash", cert["params_hash"]),
                ("ensemble version", cert["ensemble_version"]),
            ],
        ),
        "<h2>Signature</h2>",
        sig_line,
    ]
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>Deletion certificate {_e(req['request_id'])}</title><style>{_CSS}</style></head>\n"
        "<body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
