"""What a forget or drain flow run did, published as a Prefect markdown artifact, so the Prefect UI shows the
deletion's outcome beside the run: the requests and their states, the shards retrained and from which slice, the
cost against a full training and the cost model, the purge, the scan, and a link to each certificate.

The artifact carries request ids, counts and hashes only, like the run report it is made from: never an owner
id, a record id or a record's text. Its key names the workspace, so the artifact page lists one history per
workspace.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sisaflow.pipeline.report import RunResult


def artifact_key(workspace: str) -> str:
    """`sisaflow-deletions-<8 hex of the workspace's absolute path>` (Prefect keys: lowercase, digits, dashes)."""
    digest = hashlib.sha256(str(Path(workspace).resolve()).encode("utf-8")).hexdigest()[:8]
    return f"sisaflow-deletions-{digest}"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def deletion_markdown(result: RunResult) -> str:
    """The markdown of one forget run's outcome."""
    r = result.report
    lines = [
        f"# Deletion run {r.run_id}",
        "",
        f"Ensemble version `{r.ensemble_version or '-'}`; {r.orchestration}.",
    ]
    lines += ["", "## Requests", "", "| request | outcome | certificate |", "|---|---|---|"]
    for rid in r.requests or r.retrained_requests:
        paths = r.certificates.get(rid, [])
        if paths:
            outcome = "certified"
            links = " / ".join(f"[{Path(p).suffix[1:]}]({Path(p).resolve().as_uri()})" for p in paths)
        elif rid in r.retrained_requests:
            outcome, links = "retrained and purged, not certified (see the scan)", "-"
        else:
            outcome, links = "waits for the next run", "-"
        lines.append(f"| `{_cell(rid)}` | {outcome} | {links} |")
    lines += ["", "## Shards retrained", ""]
    if r.trained:
        lines += ["| shard | from slice | tokens | seconds |", "|---:|---:|---:|---:|"]
        for shard, t in sorted(r.trained.items()):
            lines.append(f"| {shard} | {t['from_slice']} | {t['tokens']:,} | {t['seconds']:.1f} |")
    else:
        lines.append("none")
    lines += ["", "## Cost", ""]
    if r.full_training_tokens:
        fraction = r.training_tokens / r.full_training_tokens
        lines.append(
            f"{r.training_tokens:,} training tokens, {fraction:.3f} of a full training "
            f"({r.full_training_tokens:,}); the cost model expects {result.cost_model:.3f} per deletion "
            f"({result.cost_model_formula})."
        )
    else:
        lines.append(f"{r.training_tokens:,} training tokens.")
    lines += ["", "## Purge and scan", ""]
    if r.purge is not None:
        kinds = ", ".join(f"{k} {v:,} B" for k, v in sorted(r.purge.bytes_by_kind().items())) or "nothing"
        lines.append(
            f"- purge removed {len(r.purge.removed)} item(s), {r.purge.total_bytes:,} bytes ({kinds})"
        )
        if r.purge.remote_not_collected:
            lines.append(
                "- the DVC remote could not be garbage-collected: no request is certified until it is"
            )
    else:
        lines.append("- no purge (no request applied)")
    if r.verify is not None:
        v = r.verify
        where = ", ".join(f"{k}: {n}" for k, n in sorted(v.findings_by_location.items()))
        lines.append(
            f"- scan: {'clean' if v.clean else f'{v.findings} copy(ies) found ({where})'}; "
            f"{v.files_scanned:,} files, {v.bytes_scanned:,} bytes, {v.git_objects_scanned:,} git objects"
        )
        if v.not_searched:
            lines.append(
                "- not searched: " + ", ".join(f"{k} ({n})" for k, n in sorted(v.not_searched.items()))
            )
    return "\n".join(lines) + "\n"


def publish(workspace: str, result: RunResult | None) -> str | None:
    """Create the artifact in the current flow run; returns its key (None when nothing ran)."""
    from prefect.artifacts import create_markdown_artifact

    if result is None:
        return None
    key = artifact_key(workspace)
    r = result.report
    create_markdown_artifact(
        markdown=deletion_markdown(result),
        key=key,
        description=f"{len(r.certificates)} request(s) certified, {len(r.trained)} shard(s) retrained",
    )
    return key
