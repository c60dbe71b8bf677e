"""The deletion commands of the `sisaflow` command line: forget, requests, verify, purge, certificate.

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


def cmd_forget(args) -> int:
    from sisaflow.deletion import requests

    ws = workspace_arg(args)
    owners, records = list(args.owner or []), list(args.record or [])
    if args.file:
        from sisaflow.deletion.requests import read_request_file

        o, r = read_request_file(Path(args.file))
        owners += o
        records += r
    req, new, warnings = requests.request_deletion(ws, owners, records, args.request_id, args.reason)
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
        from sisaflow.pipeline.sequence import forget

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
        from sisaflow.pipeline.exactness import verify_exact

        results = verify_exact(ws, params, args.shard, progress=print if args.verbose else None)
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
    rep = scan_report(ws, params, targets_from_ledger(ws, params, args.request or None))
    print(
        f"scanned {rep.files_scanned} files ({rep.bytes_scanned / 2**20:.1f} MiB) and {rep.git_objects_scanned} git "
        "objects: the workspace, its git history, the DVC cache and remote, the Prefect home"
    )
    for note in rep.excluded:
        print(f"  not scanned: {note}")
    for f in rep.findings:
        # where and what, with the request: never the text itself
        print(f"  FOUND {f.what} of request {f.request_id} in {f.where}")
    print("clean: no copy of any deleted record" if rep.clean else f"{len(rep.findings)} copies found")
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

    if args.verify:
        ok, message = verify_file(Path(args.verify), key_from_env())
        print(message)
        return 0 if ok else 1
    if not args.request_id:
        raise SisaflowError("give a REQUEST_ID, or --verify FILE")
    from sisaflow.core import lock
    from sisaflow.deletion.certificate import certify

    ws = workspace_arg(args)
    with lock.workspace_lock(ws, "sisaflow certificate", waiting=print):  # no forget changes what it reads
        json_path, html_path = certify(ws, args.request_id)
    print(f"certificate written: {json_path}\n                     {html_path}")
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """This group's subcommands, each with the function it calls."""
    s = sub.add_parser("forget", parents=[common], help="delete owners or records, exactly")
    what = s.add_argument_group("what to forget (one or more)")
    what.add_argument("--owner", action="append")
    what.add_argument("--record", action="append")
    what.add_argument("--file", help='JSONL ({"owner": ...} or {"record": ...} per line) or one id per line')
    s.add_argument("--request-id")
    s.add_argument("--reason")
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
        "--verify", metavar="FILE", help="check a certificate (signature with SISAFLOW_CERTIFICATE_KEY)"
    )
    s.set_defaults(func=cmd_certificate)
