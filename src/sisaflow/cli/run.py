"""The commands of the `sisaflow` command line, one function per subcommand (cmd_<name>(args) -> exit status).

Each is a thin adapter: it reads the workspace, calls the library (for run and forget, the Prefect flows over
the library's run sequence, or with --no-prefect that sequence directly) and prints what happened. Deleted text
never reaches the terminal: requests, findings and certificates are named by ids and content hashes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sisaflow.errors import SisaflowError
from sisaflow.paths import Workspace


def workspace_arg(args: argparse.Namespace) -> Workspace:
    ws = Workspace(Path(args.workspace))
    if args.command != "init" and not ws.params_file.is_file():
        raise SisaflowError(
            f"{ws.root} is not a sisaflow workspace (no params.yaml); run `sisaflow init` first"
        )
    return ws


def prefect_env(ws: Workspace) -> None:
    """Local defaults for Prefect: a workspace-local home, no analytics; a configured server wins."""
    if "PREFECT_HOME" not in os.environ:
        ws.prefect_home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(ws.prefect_home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def cmd_init(args) -> int:
    from sisaflow.config import CorpusParams, ShardingParams
    from sisaflow.workspace import init_workspace

    # a template typed in a shell carries "\n" literally: read the common escapes
    template = args.text_template.replace("\\n", "\n").replace("\\t", "\t") if args.text_template else None
    if args.text_field is None and template is None and args.format != "txt":
        template = None
        text_field = "text"
    else:
        text_field = args.text_field
    cp = CorpusParams(
        path=str(Path(args.corpus).resolve()),
        format=args.format,
        id_field=args.id_field or None,
        owner_field=args.owner_field or None,
        text_field=text_field,
        text_template=template,
        label_field=args.label_field,
        labels=[c.strip() for c in args.labels.split(",")] if args.labels else None,
    )
    base = Path(args.base) if args.base else None
    ws = init_workspace(
        Path(args.directory), Path(args.corpus), cp, ShardingParams(args.shards, args.slices), base=base
    )
    kind = f"LoRA adapters over {args.base}" if base else "small models trained from scratch"
    print(f"workspace ready in {ws.root} ({kind})\nnext: cd {ws.root} && sisaflow run")
    return 0


def cmd_base(args) -> int:
    from sisaflow.base_setup import setup_base

    out = setup_base(Path(args.out), Path(args.downloads), progress=lambda m: print(m, flush=True))
    print(f"model.base: {out}   (sisaflow init DIR --corpus FILE --base {out})")
    return 0


def print_run(result: dict, kind: str) -> None:
    rep = result["report"]
    imp = rep["imported"]
    print(f"\n== {kind} ==")
    print(f"corpus: {imp.get('records')} records ({imp.get('excluded', 0)} left out by deletion requests)")
    if rep["slices_rewritten"]:
        print(
            "slice files rewritten: " + ", ".join(f"shard {s} slice {k}" for s, k in rep["slices_rewritten"])
        )
    if not rep["trained"]:
        print("nothing to train: every constituent is up to date")
    for shard, t in sorted(rep["trained"].items(), key=lambda x: int(x[0])):
        print(
            f"trained shard {shard} from slice {t['from_slice']}: {t['tokens']} tokens in {t['seconds']:.1f}s"
        )
    before, after = result["checkpoints_before"], result["checkpoints_after"]
    if kind == "forget":
        print("checkpoint hashes (weights, after the last slice):")
        for shard in sorted(after, key=int):
            b = before.get(shard, {})
            a = after[shard]
            last = max(a) if a else None
            same = b == a
            tag = "unchanged" if same else "retrained"
            print(f"  shard {shard}: {tag:9s} {(b.get(last) or '-')[:16]} -> {(a.get(last) or '-')[:16]}")
        full = rep["full_training_tokens"] or 1
        print(
            f"cost: forget trained {rep['training_tokens']} tokens; full training {full} tokens; "
            f"ratio {rep['training_tokens'] / full:.3f}; cost model "
            f"{result.get('cost_model_formula', '(1/S)(R+1)/(2R)')} = {result['cost_model']:.3f}"
        )
    if rep.get("purge"):
        by_kind = rep["purge"].get("bytes_by_kind", {})
        print(
            f"purged {rep['purge'].get('total_bytes', 0) / 2**20:.1f} MiB of old copies ("
            + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in by_kind.items())
            + ")"
        )
        if rep["purge"].get("remote_not_collected"):
            print(
                "  the DVC remote could not be garbage-collected: not certified until a later run collects it"
            )
    if rep.get("verify"):
        v = rep["verify"]
        print(
            f"scan for copies of the deleted records: {v['files_scanned']} files, {v['git_objects_scanned']} git "
            f"objects: {'none found' if v['clean'] else str(v['findings']) + ' FOUND (sisaflow verify)'}"
        )
        if v.get("not_searched", {}).get("dvc-remote"):
            print(
                "  not searched: the DVC remote, which is not a local directory (purge's notes say whether DVC collected it)"
            )
        if v.get("source_holds"):
            print(
                f"  the corpus source still holds {v['source_holds']} of the deleted records: sisaflow never writes "
                "it (re-imports leave them out); erase them there"
            )
    for rid, paths in rep.get("certificates", {}).items():
        print(f"certificate for {rid}: {', '.join(paths)}")
    secs = rep["seconds"]
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in secs.items()))
    print(f"dvc.lock entries changed: {', '.join(rep['lock_changed']) or 'none'}")
    print(
        f"ensemble version {rep['ensemble_version']}; dvc status {'clean' if rep['dvc_clean'] else 'NOT clean'}"
    )


def local_steps():
    """The run sequence's steps without Prefect (--no-prefect): progress on stdout, problems on stderr."""
    from sisaflow.sequence import Steps

    return Steps(
        say=print,
        warn=lambda m: print(f"sisaflow: warning: {m}", file=sys.stderr),
        error=lambda m: print(f"sisaflow: error: {m}", file=sys.stderr),
    )


def cmd_run(args) -> int:
    ws = workspace_arg(args)
    if args.no_prefect:
        from sisaflow.sequence import run_steps

        result = run_steps(str(ws.root), "run", args.in_process, local_steps())
    else:
        prefect_env(ws)
        from sisaflow_flows.training import training_flow

        result = training_flow(workspace=str(ws.root), in_process=args.in_process)
    print_run(result, "run")
    return 0


def cmd_prepare(args) -> int:
    from sisaflow import pipeline

    ws = workspace_arg(args)
    with pipeline.workspace_lock(ws, "sisaflow prepare", waiting=print):
        info = pipeline.prepare(ws, pipeline.load(ws))
    print(f"imported {info['records']} records ({info['excluded']} left out by deletion requests)")
    return 0


def cmd_shard(args) -> int:
    from sisaflow import pipeline

    ws = workspace_arg(args)
    with pipeline.workspace_lock(ws, "sisaflow shard", waiting=print):
        rep = pipeline.shard(ws, pipeline.load(ws))
    print(
        f"{rep.records} records placed; rewrote {len(rep.slices_written)} slice file(s) in shard(s) "
        f"{', '.join(map(str, rep.shards_written)) or 'none'}"
    )
    return 0


def cmd_train(args) -> int:
    from sisaflow import pipeline

    ws = workspace_arg(args)
    params = pipeline.load(ws)
    shards = args.shard if args.shard else params.sharding.shard_ids
    bad = [s for s in shards if s not in params.sharding.shard_ids]
    if bad:
        raise SisaflowError(
            f"unknown shard(s) {bad}; this workspace has shards 0..{params.sharding.shards - 1}"
        )
    with pipeline.workspace_lock(ws, "sisaflow train", waiting=print):  # a forget may be rewriting the shards
        stale = pipeline.stale_shards(ws, params)
        todo = [s for s in shards if s in stale]
        if not todo:
            print("every requested shard is up to date: nothing to train")
            return 0
        rep = pipeline.train(ws, params, todo, progress=print, in_process=args.in_process)
    for r in rep.shards:
        print(f"shard {r.shard}: trained from slice {r.start_slice}, {r.tokens} tokens, {r.seconds:.1f}s")
    return 0


def cmd_ensemble(args) -> int:
    from sisaflow import pipeline

    ws = workspace_arg(args)
    with pipeline.workspace_lock(ws, "sisaflow ensemble", waiting=print):
        reg = pipeline.ensemble(ws, pipeline.load(ws))
    print(
        f"ensemble version {reg['version']}: shards {', '.join(str(c['shard']) for c in reg['constituents'])}"
    )
    return 0


def cmd_status(args) -> int:
    from sisaflow.status import workspace_status

    st = workspace_status(workspace_arg(args))
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    from sisaflow.status import format_status

    print(format_status(st))
    return 0


def cmd_evaluate(args) -> int:
    from sisaflow import pipeline, versioning
    from sisaflow.evaluation import evaluate
    from sisaflow.evaluation_report import write_reports

    ws = workspace_arg(args)
    params = pipeline.load(ws)
    result = evaluate(ws, params, baseline=False if args.no_baseline else None, progress=print)
    for path in write_reports(ws, result):
        print(f"wrote {path.relative_to(ws.root)}")
    if not args.no_dvc and (ws.root / ".dvc").is_dir():
        versioning.write_dvc_yaml(ws, params)
        versioning.commit(ws, ["evaluate"])
    u, f = result["utility"], result["forgetting"]
    print(
        f"ensemble perplexity: retained {u['ensemble']['retained']}, never-seen {u['ensemble']['never_seen']}"
    )
    gone = f["attacks_forgotten_vs_never_seen"]
    if gone:
        print(
            "membership AUC, forgotten vs never-seen: "
            + ", ".join(f"{k} {v['auc']:.3f}" for k, v in gone.items())
        )
    return 0


def cmd_push(args) -> int:
    from sisaflow import pipeline, versioning

    ws = workspace_arg(args)
    versioning.ensure_remote(ws, pipeline.load(ws))  # params' dvc.remote, even if it changed since init
    versioning.push(ws)
    print("pushed shards and checkpoints to the DVC remote")
    return 0
