"""The deletion commands of the `sisaflow` command line: forget, requests, verify, purge, certificate, keys.

Like sisaflow.cli.run, thin adapters over the library (and, for forget, the Prefect flows). Deleted text never
reaches the terminal: requests, findings and certificates are named by ids and content hashes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sisaflow.cli.run import NO_PREFECT, local_steps, prefect_env, print_run, workspace_arg
from sisaflow.core.errors import SisaflowError
from sisaflow.core.paths import Workspace


def cmd_forget(args) -> int:
    from sisaflow.deletion import requests

    ws = workspace_arg(args)
    owners, records = list(args.owner or []), list(args.record or [])
    if args.file:
        from sisaflow.deletion.requests import read_request_file

        o, r = read_request_file(Path(args.file))
        owners += o
        records += r
    req, new, warnings = requests.request_deletion(
        ws, owners, records, args.request_id, args.reason, args.note
    )
    for w in warnings:
        print(f"sisaflow: warning: {w}", file=sys.stderr)
    print(
        f"request {req.request_id} {'recorded' if new else 'already recorded'}: "
        f"{len(req.content_hashes)} record(s) of {len(req.owners)} owner(s), {len(req.records)} named record(s)"
    )
    if args.no_run:
        print("not applied now (--no-run): the drain flow or the next `sisaflow run` applies it")
        return 0
    if args.no_prefect:
        from sisaflow.core.progress import terminal_bars
        from sisaflow.pipeline.sequence import forget

        with terminal_bars():  # a Prefect run keeps its log lines only
            result = forget(str(ws.root), req.request_id, args.in_process, local_steps())
        print_run(result, "forget")
        return 0
    if os.environ.get("PREFECT_API_URL") and not args.here:
        # a Prefect server is configured: its forget deployment applies the request when the event arrives
        import yaml

        from sisaflow.flows.events import emit_deletion_requested
        from sisaflow.pipeline.create import workspace_name

        name = (yaml.safe_load(ws.prefect_file.read_text()) or {}).get("name", workspace_name(ws.root))
        event_id = emit_deletion_requested(name, req.request_id)
        if event_id:
            print(
                f"event sisaflow.deletion.requested sent to {os.environ['PREFECT_API_URL']}; "
                "the forget deployment applies the request (the drain deployment if no worker is up)"
            )
            return 0
        print("could not reach the Prefect server; applying the request here")
    prefect_env(ws)
    from sisaflow.flows.forget import forget_flow

    result = forget_flow(workspace=str(ws.root), request_id=req.request_id, in_process=args.in_process)
    print_run(result, "forget")
    return 0


def cmd_requests(args) -> int:
    from sisaflow.core import ledger

    ws = workspace_arg(args)
    states = ledger.states(ws.ledger_file)
    rows: list[dict] = []
    for r in ledger.read_ledger(ws.ledger_file):
        seq = states.get(r.request_id, [])
        rows.append(
            {
                "request_id": r.request_id,
                "owners": len(r.owners),
                "records": len(r.content_hashes),
                "reason": r.reason,
                "states": seq,
                "state": max((s["state"] for s in seq), key=ledger.STATES.index) if seq else "pending",
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no deletion requests")
    for row in rows:
        times = "  ".join(f"{s['state']} {s['at']}" for s in row["states"])
        print(
            f"{row['request_id']}: {row['state']:9s} {row['records']} record(s), {row['owners']} owner(s)  {times}"
        )
    return 0


def cmd_verify(args) -> int:
    from sisaflow.deletion.leftovers import scan_report, targets_from_ledger
    from sisaflow.pipeline import steps

    ws = workspace_arg(args)
    params = steps.load(ws)
    if args.exact:
        from sisaflow.core.progress import echo, terminal_bars
        from sisaflow.pipeline.exactness import verify_exact

        with terminal_bars():
            results = verify_exact(ws, params, args.shard, progress=echo if args.verbose else None)
        for r in results:
            verdict = "equal" if r.equal else "DIFFERENT"
            if not r.from_source:
                data = "data: the workspace's slice files (the corpus source is not readable)"
            elif r.same_data:
                data = "data: the source minus the deletion ledger, the workspace's own slices"
            else:
                data = "data: the source minus the ledger gives OTHER slices (source changed since the last run?)"
            print(
                f"shard {r.shard}: {verdict}  served {r.served[:16]}  from scratch {r.scratch[:16]}  {data}"
            )
            if not r.equal and r.environment_changed and r.environment is not None:
                from sisaflow.training.checkpoint import describe_environment

                print(
                    f"  the served weights were trained under "
                    f"{'; then '.join(describe_environment(e) for e in r.served_environments)}; this run under "
                    f"{describe_environment(r.environment)}: training repeats bit for bit within one environment "
                    "only"
                )
        return 0 if all(r.equal for r in results) else 1
    from sisaflow.scan.progress import terminal_bar

    targets = targets_from_ledger(ws, params, args.request or None)
    with terminal_bar("scan") as progress:  # a bar with the time left, on a terminal only
        rep = scan_report(ws, params, targets, progress=progress)
    print(
        f"scanned {rep.files_scanned} files ({rep.bytes_scanned / 2**20:.1f} MiB) and {rep.git_objects_scanned} git "
        "objects: the workspace, its git history, the DVC cache and remote, the Prefect home"
    )
    for note in rep.excluded:
        print(f"  not scanned: {note}")
    for note in rep.notes:
        if note.endswith("not searched"):  # a DVC remote or a Prefect place it could not reach or read
            print(f"  NOT SEARCHED: {note}")
    for note in rep.skipped:  # a file too large, unreadable, a link out of the tree
        print(f"  SKIPPED: {note}")
    for f in rep.findings:
        # where and what, with the request: never the text itself
        print(f"  FOUND {f.what} of request {f.request_id} in {f.where}")
    left_out = {k: v for k, v in rep.not_searched().items() if k not in ("corpus-source", "evaluation-input")}
    if not rep.clean:
        print(f"{len(rep.findings)} copies found")
    elif left_out:  # never "clean" while a place or file was left out
        print(
            "no copy found in what was searched, but not everything was: "
            + ", ".join(f"{n} {k}" for k, n in left_out.items())
            + " (above)"
        )
    else:
        print("clean: no copy of any deleted record")
    return 0 if rep.clean else 1


def cmd_purge(args) -> int:
    from sisaflow.core import lock
    from sisaflow.deletion.purge import purge
    from sisaflow.pipeline import steps

    ws = workspace_arg(args)
    with lock.workspace_lock(ws, "sisaflow purge", waiting=print):
        rep = purge(ws, steps.load(ws))
    for item in rep.removed:
        print(f"removed {item.kind}: {item.path} ({item.bytes} bytes)")
    for note in rep.notes:
        print(f"note: {note}")
    print(f"purged {rep.total_bytes} bytes")
    return 0


def cmd_certificate(args) -> int:
    from sisaflow.deletion.certificate import key_from_env, verify_file
    from sisaflow.deletion.signing import default_public_key, load_public_key

    if args.verify:
        # an auditor checks a certificate anywhere: a workspace only lends its public key when none is given
        public = (
            Path(args.public_key) if args.public_key else default_public_key(Workspace(Path(args.workspace)))
        )
        ok, message = verify_file(
            Path(args.verify), key_from_env(), load_public_key(public) if public is not None else None
        )
        if ok and public is not None and not args.public_key:
            message += f" (public key {public})"
        print(message)
        if ok and args.records:
            return _records_listed(workspace_arg(args), Path(args.verify), Path(args.records))
        return 0 if ok else 1
    if args.records:
        raise SisaflowError("--records checks records against a certificate: give it with --verify FILE")
    if args.public_key:
        raise SisaflowError("--public-key checks a certificate: give it with --verify FILE")
    if not args.request_id:
        raise SisaflowError("give a REQUEST_ID, or --verify FILE")
    from sisaflow.core import lock
    from sisaflow.deletion.certificate import certify

    ws = workspace_arg(args)
    key_file = Path(args.signing_key) if args.signing_key else None
    with lock.workspace_lock(ws, "sisaflow certificate", waiting=print):  # no forget changes what it reads
        json_path, html_path = certify(ws, args.request_id, key_file)
    print(f"certificate written: {json_path}\n                     {html_path}")
    return 0


def _records_listed(ws: Workspace, certificate: Path, records: Path) -> int:
    """Open a certificate for an auditor, with the operator: which of `records` (JSONL {"id", "text"}) it lists.
    0 when every one is listed."""
    import json

    from sisaflow.core.config import Params
    from sisaflow.core.hashing import workspace_hasher
    from sisaflow.data.corpus import content_hash

    hasher = workspace_hasher(ws, Params.load(ws.params_file).corpus)
    listed = set(json.loads(certificate.read_text(encoding="utf-8"))["content_hashes"])
    missing = 0
    for n, line in enumerate(records.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            rid, text = str(obj["id"]), str(obj["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SisaflowError(f'{records}:{n}: expected a JSON object with "id" and "text"') from None
        found = content_hash(rid, text, hasher) in listed
        missing += not found
        print(f"{rid}: {'listed' if found else 'NOT listed'}")
    return 0 if missing == 0 else 1


def _git_tracks(path: Path) -> Path | None:
    """The git work tree that would track `path` (inside it and not ignored), or None."""
    import subprocess

    where = path.parent
    while not where.is_dir():
        where = where.parent
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=where, capture_output=True, text=True, timeout=30
        )
        if top.returncode != 0:
            return None
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", "--no-index", str(path)], cwd=where, capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(top.stdout.strip()) if ignored.returncode == 1 else None


def cmd_keys(args) -> int:
    from sisaflow.deletion.signing import SigningKeyError, write_key_pair

    if args.keys_command != "init":
        raise SisaflowError("usage: sisaflow keys init [--out FILE] [--force]")
    out = Path(args.out).expanduser().absolute() if args.out else workspace_arg(args).signing_key_file
    repo = _git_tracks(out)
    if repo is not None:
        raise SigningKeyError(
            f"{out}: inside the git repository {repo} and not ignored: a private key must never be committed; "
            "choose a path outside it or one its .gitignore covers (the default, .sisaflow/keys/, is)"
        )
    private, public, fp = write_key_pair(out, force=args.force)
    print(f"private key: {private} (mode 0600: keep it there; certificates are signed with it)")
    print(
        f"public key:  {public} (hand it to auditors: `sisaflow certificate --verify FILE --public-key PUB`)"
    )
    print(f"fingerprint: {fp} (sha256 of the raw public key, as certificates name it)")
    if args.out:
        print(
            f"sign with it: export SISAFLOW_SIGNING_KEY={private}, or `sisaflow certificate ID --signing-key`"
        )
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """This group's subcommands, each with the function it calls."""
    s = sub.add_parser("forget", parents=[common], help="delete owners or records, exactly")
    what = s.add_argument_group("what to forget (one or more)")
    what.add_argument("--owner", action="append")
    what.add_argument("--record", action="append")
    what.add_argument("--file", help='JSONL ({"owner": ...} or {"record": ...} per line) or one id per line')
    s.add_argument("--request-id")
    from sisaflow.deletion.reasons import REASONS

    s.add_argument(
        "--reason",
        metavar="CODE",
        help="why, as a code the ledger and the certificate carry: " + ", ".join(REASONS),
    )
    s.add_argument(
        "--note",
        help="free text for the operator's file (.sisaflow/notes/): refused if it quotes one of the request's "
        "records; never in the ledger, git or a certificate",
    )
    s.add_argument("--no-run", action="store_true", help="only record the request")
    s.add_argument(
        "--here",
        action="store_true",
        help="apply it in this process even when PREFECT_API_URL names a server",
    )
    s.add_argument("--in-process", action="store_true")
    s.add_argument("--no-prefect", action="store_true", help=NO_PREFECT)
    s.set_defaults(func=cmd_forget)

    s = sub.add_parser("requests", parents=[common], help="deletion requests and their states, with times")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_requests)

    s = sub.add_parser("verify", parents=[common], help="scan everything for copies of deleted records")
    s.add_argument("--request", action="append", help="only these request ids (default: all)")
    s.add_argument(
        "--exact",
        action="store_true",
        help="instead, retrain shards from scratch elsewhere and compare the weights bitwise",
    )
    s.add_argument("--shard", type=int, action="append", help="with --exact: only these shards")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("purge", parents=[common], help="remove old copies (DVC cache and remote, temp files)")
    s.set_defaults(func=cmd_purge)

    s = sub.add_parser("certificate", parents=[common], help="write or check a deletion certificate")
    s.add_argument("request_id", nargs="?")
    s.add_argument(
        "--verify",
        metavar="FILE",
        help="check a certificate: its schema and its signature (Ed25519 with --public-key, or the workspace's "
        "public key; HMAC with SISAFLOW_CERTIFICATE_KEY)",
    )
    s.add_argument("--public-key", metavar="PUB", help="with --verify: the signer's Ed25519 public key (PEM)")
    s.add_argument(
        "--records",
        metavar="JSONL",
        help='with --verify, run by the operator in the workspace: for each {"id", "text"} line, whether the '
        "certificate lists that record (hashed under the workspace's hash key; prints ids, never text)",
    )
    s.add_argument(
        "--signing-key",
        metavar="FILE",
        help="sign with this Ed25519 private key (default: $SISAFLOW_SIGNING_KEY, else the workspace's key from "
        "`sisaflow keys init`, else HMAC with $SISAFLOW_CERTIFICATE_KEY)",
    )
    s.set_defaults(func=cmd_certificate)

    s = sub.add_parser("keys", parents=[common], help="the Ed25519 key pair that signs certificates")
    keys = s.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser(
        "init",
        parents=[common],
        help="write a key pair: the private key (mode 0600) in the workspace's .sisaflow/keys/ or at --out, "
        "the public key beside it",
    )
    k.add_argument("--out", metavar="FILE", help="the private key's path (the public key: FILE.pub.pem)")
    k.add_argument("--force", action="store_true", help="replace an existing key")
    k.set_defaults(func=cmd_keys)
