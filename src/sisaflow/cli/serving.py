"""The serving commands of the `sisaflow` command line: generate, score, classify.

Like sisaflow.cli.run, thin adapters over the library. They write ids, classes and numbers, never a record's
text; a JSONL output file appears whole or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from sisaflow.cli.run import workspace_arg
from sisaflow.core.config import CLASSIFY_RULES
from sisaflow.core.errors import ConfigError
from sisaflow.core.fsio import atomic_path
from sisaflow.core.paths import Workspace

PROGRESS_EVERY_S = 10.0
"""How often a long classify says how far it is (on stderr)."""


@contextlib.contextmanager
def jsonl_output(path: str | None) -> Iterator[TextIO]:
    """Standard output, or a file written to a temporary name and renamed into place when complete."""
    if path is None:
        yield sys.stdout
        return
    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        yield fh


def cmd_generate(args) -> int:
    prompts = [_unescape(p) for p in args.prompt]
    if args.prompts_file:
        prompts += _prompts_from(Path(args.prompts_file))
    if not prompts:
        raise ConfigError("generate needs a prompt, or --prompts-file with one prompt per line")
    batches = _batches(prompts, args.batch_size)
    decoding = _decoding_options(args)
    ens = load_served(args)
    generate = ens.generate if decoding is None else _transformers_generate(ens, decoding)
    for start, batch in batches:
        for i, (prompt, text) in enumerate(
            zip(batch, generate(batch, args.max_new_tokens, args.temperature, args.seed)), start
        ):
            if i:
                print()  # a blank line between generations
            if args.show_routing:
                print(routing_line(ens, prompt), file=sys.stderr, flush=True)
            print(prompt + text, flush=True)
    return 0


def routing_line(ens, prompt: str) -> str:
    """Where the ensemble routes what follows `prompt`: each served shard's weight, the heaviest marked."""
    weights = ens.routing_weights(prompt)
    top = max(range(len(weights)), key=weights.__getitem__)
    parts = [
        f"{'*' if i == top else ''}shard {s} {w:.3f}" for i, (s, w) in enumerate(zip(ens.shards, weights))
    ]
    rule = "posterior" if ens.combine == "posterior" else f"{ens.combine} (fixed weights)"
    return f"routing ({rule}): " + ", ".join(parts)


def _decoding_options(args) -> dict | None:
    """transformers' `generate` options for --top-k, --top-p, --num-beams, --repetition-penalty; None when
    none is given (then `Ensemble.generate` decodes). Checked before any model is loaded."""
    given = {
        "top_k": args.top_k,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "repetition_penalty": args.repetition_penalty,
    }
    options = {k: v for k, v in given.items() if v is not None}
    if not options:
        return None
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, not {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], not {args.top_p}")
    if args.num_beams is not None and args.num_beams < 1:
        raise ConfigError(f"--num-beams must be at least 1, not {args.num_beams}")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise ConfigError(f"--repetition-penalty must be above 0, not {args.repetition_penalty}")
    if args.temperature <= 0 and ("top_k" in options or "top_p" in options):
        raise ConfigError("--top-k and --top-p choose among sampled tokens: give --temperature above 0 too")
    return options


def _transformers_generate(ens, options: dict):
    """A function like `Ensemble.generate` (prompts, max_new_tokens, temperature, seed) -> texts that decodes
    with transformers' `generate` over the same ensemble (`sisaflow.inference.hf`). Sampling draws from torch's generator
    seeded by `seed` once per batch, so the same command gives the same output."""
    import torch

    from sisaflow.inference.hf import EnsembleForCausalLM

    model = EnsembleForCausalLM(ens)

    def generate(prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        batch = model.encode(prompts, max_new_tokens)
        sampling = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        torch.manual_seed(seed)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, **sampling, **options)
        return model.decode(out, batch["input_ids"].shape[1])

    return generate


def _batches(items: list, size: int) -> list[tuple[int, list]]:
    """(offset, items) per batch of `size`; a size below 1 is refused (before any model is loaded)."""
    if size < 1:
        raise ConfigError(f"--batch-size must be at least 1, not {size}")
    return [(i, items[i : i + size]) for i in range(0, len(items), size)]


def load_served(args: argparse.Namespace, ws: Workspace | None = None):
    """The served ensemble on --device in --dtype; a device torch cannot use is named."""
    import torch

    from sisaflow.inference.ensemble import Ensemble

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"--device {args.device!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: torch sees no CUDA device here")
    dtype = None if args.dtype == "float32" else getattr(torch, args.dtype)
    return Ensemble.load(ws or workspace_arg(args), device=args.device, dtype=dtype)


def _unescape(prompt: str) -> str:
    """`\\n` (backslash, n) stands for a new line; nothing else changes (non-ASCII text included)."""
    return prompt.replace("\\n", "\n")


def _prompts_from(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such prompts file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    prompts = [_unescape(line) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{path}: holds no prompt (one per line)")
    return prompts


def cmd_score(args) -> int:
    from sisaflow.core.hashing import workspace_hasher
    from sisaflow.data.corpus import read_records
    from sisaflow.pipeline import steps

    ws = workspace_arg(args)
    cp = steps.load(ws).corpus
    if args.text_field:
        cp = dataclasses.replace(
            cp,
            owner_field=None,
            text_field=args.text_field,
            text_template=None,
            label_field=None,
            labels=None,
        )
    # hashed as the workspace hashes its records, so a score's content_hash matches the ledger's and lineage's
    records = read_records(Path(args.file), cp, workspace_hasher(ws, cp))
    ens = load_served(args, ws)
    with jsonl_output(args.out) as out:
        for r in records:
            s = ens.score(r.text)
            out.write(json.dumps({"id": r.record_id, "content_hash": r.content_hash, **s}) + "\n")
    return 0


def cmd_classify(args) -> int:
    from sisaflow.inference.classify import classify, read_inputs, require_classes
    from sisaflow.pipeline import steps

    ws = workspace_arg(args)
    params = steps.load(ws)
    labels = require_classes(params.corpus)
    inputs = read_inputs(Path(args.file), params.corpus)
    batches = _batches(inputs, args.batch_size)
    ens = load_served(args, ws)
    rule = args.rule or params.ensemble.classify
    right = judged = 0
    last = time.monotonic()
    with jsonl_output(args.out) as out:
        for i, batch in batches:
            for x, p in zip(batch, classify(ens, [x.prompt for x in batch], labels, rule), strict=True):
                row = {
                    "id": x.record_id,
                    "label": p.label,
                    "probabilities": p.probabilities,
                    "votes": p.votes,
                }
                if x.gold is not None:
                    row["gold"] = x.gold
                    judged += 1
                    right += p.label == x.gold
                out.write(json.dumps(row) + "\n")
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                print(f"classified {i + len(batch)}/{len(inputs)} records", file=sys.stderr, flush=True)
    summary = f"{len(inputs)} record(s) classified ({rule} of {len(ens.shards)} constituent(s))"
    if judged:
        summary += f"; accuracy {right / judged:.4f} on the {judged} with a class in field {params.corpus.label_field!r}"
    print(summary, file=sys.stderr if not args.out else sys.stdout)
    return 0


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


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """This group's subcommands, each with the function it calls."""
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
    s.add_argument(
        "--show-routing",
        action="store_true",
        help="print each prompt's weight per shard before its text, on stderr (ensemble.combine: posterior)",
    )
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
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("score", parents=[common], help="log-likelihood and perplexity per record (JSONL)")
    s.add_argument("file")
    s.add_argument("--text-field")
    s.add_argument("--out")
    serving_options(s)
    s.set_defaults(func=cmd_score)

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
    s.set_defaults(func=cmd_classify)
