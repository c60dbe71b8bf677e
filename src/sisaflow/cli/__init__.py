"""The `sisaflow` command line: main() and the top-level parser. Each group of commands lives in its own module
with its parsers beside the functions they call: `run` (init, base, run and its DVC stages, status, evaluate,
push), `deletion` (forget, requests, verify, purge, certificate, keys), `serving` (generate, score, classify). The
CLI is the only package that imports the Prefect flows (`sisaflow.flows`); it may import every package."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from sisaflow.cli import deletion, run, serving
from sisaflow.core.errors import SisaflowError


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

    run.add_commands(sub, common)
    deletion.add_commands(sub, common)
    serving.add_commands(sub, common)
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
