"""A deletion request's whole life: read from a request file (`sisaflow forget --file`), checked against the
corpus and recorded in the ledger (`request_deletion`), then followed through its states (pending or excluded
-> retrained -> purged -> certified) by the questions a run asks: which requests are still open, which still
have records in the corpus, which a killed run left unfinished. The ledger itself (core.ledger) is the durable
store; this module is where a request's state is decided.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sisaflow.core import ledger
from sisaflow.core.config import Params
from sisaflow.core.errors import DeletionError
from sisaflow.core.hashing import workspace_hasher
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import from_table, read_table, text_hash
from sisaflow.deletion import reasons


def read_request_file(path: Path) -> tuple[list[str], list[str]]:
    """Owners and records named in a request file.

    Each non-empty line is either a JSON object with "owner" or "record" (a string or a list of strings), or a
    bare id, which is taken as an owner id. Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DeletionError(f"{path}: request file not found")
    owners: list[str] = []
    records: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("{"):
            owners.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DeletionError(f"{path}:{n}: malformed JSON ({exc.msg})") from None
        unknown = set(obj) - {"owner", "record"}
        if unknown or not obj:
            raise DeletionError(
                f'{path}:{n}: expected the key "owner" or "record", got {sorted(obj) or "none"}'
            )
        for key, target in (("owner", owners), ("record", records)):
            value = obj.get(key)
            if value is None:
                continue
            values = value if isinstance(value, list) else [value]
            if not values or not all(
                isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip() for v in values
            ):
                raise DeletionError(f'{path}:{n}: "{key}" must be a non-empty id or list of ids')
            target.extend(str(v) for v in values)
    if not owners and not records:
        raise DeletionError(f"{path}: names no owner or record")
    return owners, records


# ---- a request's life: recorded, applied (retrained), purged, certified ----


@dataclass(frozen=True)
class Resolved:
    """A request checked against the imported corpus."""

    owners: list[str]
    """The owners named that the corpus holds."""
    records: list[str]
    """The record ids named that the corpus holds."""
    content_hashes: list[str]
    """The records covered: those of the owners and records kept, and every other record with the same text
    (a deletion holds for the text, so those leave the corpus too and no constituent trained on them is
    served)."""
    text_hashes: list[str]
    """The covered records' text hashes: a later import leaves out any record with one of these texts."""
    warnings: list[str]


def resolve_request(ws: Workspace, owners: list[str], records: list[str], unknown: str = "error") -> Resolved:
    """Check the named owners and records against the imported corpus.

    With unknown="error" an unknown name refuses the whole request (nothing is recorded); with "warn" it is
    dropped with a warning.
    """
    if not owners and not records:
        raise DeletionError("a deletion request must name at least one owner or record")
    if not ws.corpus_file.is_file():
        raise DeletionError(f"{ws.corpus_file}: no imported corpus yet; run `sisaflow run` first")
    corpus = from_table(read_table(ws.corpus_file))
    known_owners = {r.owner for r in corpus}
    known_records = {r.record_id for r in corpus}
    bad_owners = sorted(set(owners) - known_owners)
    bad_records = sorted(set(records) - known_records)
    warnings = []
    if bad_owners or bad_records:
        parts = []
        if bad_owners:
            parts.append(f"unknown owner(s): {', '.join(bad_owners[:10])}")
        if bad_records:
            parts.append(f"unknown record(s): {', '.join(bad_records[:10])}")
        message = "; ".join(parts) + " (not in the current corpus; already forgotten or never present)"
        earlier = _earlier_requests(ws, set(bad_owners), set(bad_records))
        if earlier:
            message += "; already forgotten by " + ", ".join(earlier)
        if unknown == "error":
            raise DeletionError(message)
        warnings.append(message)
    owners = sorted(set(owners) & known_owners)
    records = sorted(set(records) & known_records)
    if not owners and not records:
        raise DeletionError("nothing to forget: " + "; ".join(warnings))
    hasher = workspace_hasher(ws, Params.load(ws.params_file).corpus)
    hashed = [(r, text_hash(r.text, hasher)) for r in corpus]
    named_owners, named_records = set(owners), set(records)
    texts = {t for r, t in hashed if r.owner in named_owners or r.record_id in named_records}
    covered = {r.content_hash for r, t in hashed if t in texts}
    return Resolved(owners, records, sorted(covered), sorted(texts), warnings)


def _earlier_requests(ws: Workspace, owners: set[str], records: set[str]) -> list[str]:
    """'request R (state)' for each recorded request that names one of `owners` or `records`, with its
    certificate's path once certified: the proof to hand over for the same person's later request."""
    state = ledger.current_state(ws.ledger_file)
    out = []
    for r in ledger.read_ledger(ws.ledger_file):
        if owners & set(r.owners) or records & set(r.records):
            s = state.get(r.request_id, "pending")
            cert = ws.certificates_dir / f"{r.request_id}.json"
            out.append(
                f"request {r.request_id} ({s}" + (f"; certificate {cert}" if cert.is_file() else "") + ")"
            )
    return out


def request_deletion(
    ws: Workspace,
    owners: list[str],
    records: list[str],
    request_id: str | None = None,
    reason: str | None = None,
    note: str | None = None,
) -> tuple[ledger.DeletionRequest, bool, list[str]]:
    """Validate and durably record a deletion request. Returns (request, newly_recorded, warnings).

    `reason` is a code of `reasons.REASONS` (the ledger, git and certificates carry it); `note`, free text, is
    checked against the request's own records first (`reasons.check_note`: refused if it quotes one) and kept
    in .sisaflow/notes/ only.

    The same request id with the same owners and records as given changes nothing, even after it was applied
    (with unlearn.unknown: warn too, where the ledger keeps only the known ones); the same id with other
    contents is refused. In unlearn.mode exclude, the request is marked excluded at once: from then on no
    generate or score call uses a constituent trained on its records.
    """
    params = Params.load(ws.params_file)
    reasons.check_reason(reason)
    if request_id:
        for existing in ledger.read_ledger(ws.ledger_file):
            if existing.request_id == request_id:
                if not existing.same_input(owners, records):
                    raise DeletionError(f"request id {request_id!r} is already used by a different request")
                return existing, False, []
    given = ledger.input_hash(owners, records)
    resolved = resolve_request(ws, owners, records, params.unlearn.unknown)
    if note:
        covered = set(resolved.content_hashes)
        own = [r for r in from_table(read_table(ws.corpus_file)) if r.content_hash in covered]
        reasons.check_note(note, own, params.corpus.text_template)
    req = ledger.DeletionRequest(
        request_id=request_id or ledger.new_request_id(),
        owners=resolved.owners,
        records=resolved.records,
        content_hashes=resolved.content_hashes,
        text_hashes=resolved.text_hashes,
        input_hash=given,
        reason=reason,
        hash_key=params.corpus.hash_key,
    )
    new = ledger.append_request(ws.ledger_file, req)
    if new and note:
        reasons.write_note(ws, req.request_id, note)
    if new and params.unlearn.mode == "exclude":
        ledger.mark(ws.ledger_file, [req.request_id], "excluded")
    return req, new, resolved.warnings


def mark_applied(ws: Workspace, among: Iterable[str] | None = None) -> list[str]:
    """After a promotion: every request not yet retrained whose records are gone is now retrained. `among`: only
    those requests (a run's, read when it started): one recorded meanwhile has no impact record of this run,
    even when its records are gone (an earlier request took them), so it waits for the next run."""
    still = {r.request_id for r in pending_requests(ws)}
    state = ledger.current_state(ws.ledger_file)
    limit = None if among is None else set(among)
    done = [
        r.request_id
        for r in ledger.read_ledger(ws.ledger_file)
        if r.request_id not in still
        and state.get(r.request_id, "pending") in ("pending", "excluded")
        and (limit is None or r.request_id in limit)
    ]
    return ledger.mark(ws.ledger_file, done, "retrained")


def unfinished_requests(ws: Workspace, among: Iterable[str] | None = None) -> list[str]:
    """Requests retrained or purged but not certified (a forget killed after its promotion left them so);
    `among`: only those."""
    state = ledger.current_state(ws.ledger_file)
    limit = None if among is None else set(among)
    return [
        r.request_id
        for r in ledger.read_ledger(ws.ledger_file)
        if state.get(r.request_id) in ("retrained", "purged") and (limit is None or r.request_id in limit)
    ]


def open_requests(ws: Workspace) -> list[str]:
    """Requests not yet certified, in ledger order: what a drain or forget run has to finish. This includes
    requests whose records a killed run already removed from the corpus but whose shards are not retrained."""
    state = ledger.current_state(ws.ledger_file)
    return [
        r.request_id for r in ledger.read_ledger(ws.ledger_file) if state.get(r.request_id) != "certified"
    ]


def pending_requests(ws: Workspace) -> list[ledger.DeletionRequest]:
    """Requests whose records are still in the imported corpus or in a shard's placement."""
    reqs = ledger.read_ledger(ws.ledger_file)
    if not reqs:
        return []
    present_owners: set[str] = set()
    present_records: set[str] = set()
    if ws.corpus_file.is_file():
        t = read_table(ws.corpus_file).select(["record_id", "owner"]).to_pydict()
        present_owners, present_records = set(t["owner"]), set(t["record_id"])
    if ws.placement_file.is_file():
        present_records |= set(read_table(ws.placement_file).column("record_id").to_pylist())
    return [r for r in reqs if set(r.owners) & present_owners or set(r.records) & present_records]


def mark_purged(ws: Workspace, request_ids: list[str]) -> list[str]:
    """After purge removed every old copy of their records: the requests are purged (not yet certified)."""
    return ledger.mark(ws.ledger_file, request_ids, "purged")
