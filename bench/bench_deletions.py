"""Benchmark: deletion requests arriving at a fixed rate and drained on a schedule, against each applied alone.

Builds the demo's workspace (the repository's params.yaml and the shipped TOFU corpus, as `make demo` uses them;
--smoke: a few authors and a tiny model) in a temporary directory, trains it once and copies it. Then:
  batched       one request for a random owner every --interval seconds for --duration seconds, each recorded
                with `sisaflow forget --no-run` (a separate process, as a user or a service would), while the
                drain (`sisaflow.pipeline.sequence.drain`, what the drain deployment runs) is called every
                --drain-interval seconds (the deployment's schedule says 900 s), until every request is certified;
                a drain that comes due while one runs starts when it ends, as Prefect's queue would start it;
  one at a time on the copy, the same requests in the same order, each recorded and forgotten alone.
Reports requests certified per hour, the time from a request to `excluded` and to `certified` (median and worst,
from deletions/states.jsonl), and the training tokens spent per request (from runs/*-forget.json), with the
ratios of the two ways measured in this one run. One at a time runs back to back: its latency is given alone
(no queue) and under the same arrivals (a first-come-first-served queue over the measured forget times).
Writes <out>/deletions.json. Usage: python bench/bench_deletions.py [--smoke] [--duration S] [--interval S]
[--drain-interval S] [--in-process] [--keep DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOFU = REPO / "data" / "tofu" / "records.jsonl"


@dataclass(frozen=True)
class Setup:
    """What one bench run does: the arrivals, the drain's schedule and the workspace."""

    interval: float = 10.0
    """Seconds between two requests."""
    duration: float = 600.0
    """Seconds during which requests arrive (requests = duration / interval, at least one)."""
    drain_interval: float = 60.0
    """Seconds between two scheduled drains (the drain deployment's schedule says 900)."""
    max_wait: float = 7200.0
    """Seconds the drain may go on after the last arrival before the bench gives up on what is still open."""
    in_process: bool = False
    """Train in the bench's process instead of on Ray (the smoke does; the drain deployment uses Ray)."""
    seed: int = 0
    authors: int | None = None
    """The first `authors` TOFU authors only (None: the whole corpus, as the demo)."""
    shards: int | None = None
    slices: int | None = None
    tiny: bool = False
    """A tiny model and one epoch (the smoke), instead of the demo's params."""

    @property
    def requests(self) -> int:
        return max(1, int(self.duration // self.interval))


SMOKE = Setup(
    interval=2.0,
    duration=6.0,
    drain_interval=3.0,
    max_wait=120.0,
    in_process=True,
    authors=12,
    shards=2,
    slices=2,
    tiny=True,
)
TINY = {
    "model": {"hidden_size": 32, "layers": 2, "heads": 2, "intermediate_size": 64, "context_length": 128},
    "train": {"batch_size": 16, "epochs_per_slice": 1, "warmup_steps": 2, "log_every": 50},
    "ray": {"object_store_memory_mb": 200},
    "evaluate": {"before_after": False},
}


def _quiet_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.pop("PREFECT_API_URL", None)  # recording only: never hand the request to a server


def build_workspace(root: Path, setup: Setup):
    """A workspace made as `sisaflow init` makes one, with the demo's params (or the smoke's), trained fully."""
    import yaml

    from sisaflow.core.config import CorpusParams, Params, ShardingParams
    from sisaflow.pipeline import sequence
    from sisaflow.pipeline.create import init_workspace

    repo = Params.load(REPO / "params.yaml")
    corpus = TOFU
    if setup.authors is not None:
        corpus = root.parent / f"tofu-{setup.authors}-authors.jsonl"
        corpus.write_text("\n".join(TOFU.read_text().splitlines()[: setup.authors * 20]) + "\n")
    sharding = ShardingParams(setup.shards or repo.sharding.shards, setup.slices or repo.sharding.slices)
    cp = repo.corpus
    ws = init_workspace(root, corpus, CorpusParams(**{**cp.__dict__, "path": str(corpus)}), sharding)
    raw = yaml.safe_load(ws.params_file.read_text())
    demo = repo.to_dict()
    for section in ("model", "train", "ensemble", "ray", "unlearn", "evaluate"):
        raw[section] = demo[section]
    for key in ("holdout", "tofu_perturbed"):  # the demo's evaluation files, from wherever the workspace is
        if raw["evaluate"][key]:
            raw["evaluate"][key] = str((REPO / raw["evaluate"][key]).resolve())
    if setup.tiny:
        for section, values in TINY.items():
            raw[section].update(values)
        raw["evaluate"]["holdout"] = raw["evaluate"]["tofu_perturbed"] = None
    ws.params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    sequence.run_steps(str(ws.root), "run", setup.in_process, _runner(root.parent / f"{root.name}.log"))
    return ws


def copy_workspace(src: Path, dst: Path) -> None:
    """A second, independent copy of a trained workspace (its git repository, DVC cache and remote too)."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("workspace.lock"))
    # nothing may point back at the first copy: a purge there would collect the other's remote
    for path in dst.rglob("*"):
        if path.is_file() and path.stat().st_size < 1_000_000 and ".git" not in path.parts:
            if path.suffix in {".yaml", ".lock", ".json", ".jsonl"} or path.name == "config":
                if re.search(re.escape(str(src)) + r"(?![\w.-])", path.read_text(errors="replace")):
                    raise RuntimeError(f"{path} names {src}: the copy would not be independent")


def _runner(log_file: Path):
    """The run sequence's runner, its progress lines going to `log_file` (Ray workers still print theirs)."""
    from sisaflow.pipeline.sequence import StepRunner

    def write(kind: str):
        def say(message: str) -> None:
            with log_file.open("a", encoding="utf-8") as fh:
                fh.write(f"{datetime.now(UTC).isoformat(timespec='milliseconds')} {kind}{message}\n")

        return say

    return StepRunner(say=write(""), warn=write("warning: "), error=write("error: "))


def pick_owners(ws, n: int, seed: int) -> list[str]:
    """`n` distinct owners of the workspace's corpus, drawn at random (seeded)."""
    from sisaflow.data.corpus import read_table

    owners = sorted(set(read_table(ws.corpus_file).column("owner").to_pylist()))
    if n > len(owners):
        raise SystemExit(
            f"{n} requests but the corpus has {len(owners)} owners: lower --duration or raise --interval"
        )
    return random.Random(seed).sample(owners, n)


def record_request(root: Path, owner: str, request_id: str) -> dict:
    """`sisaflow forget --no-run` in its own process; when it was asked, how long it took, and its exit status."""
    asked = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "sisaflow.cli", "forget", "--no-run", "--owner", owner]
        + ["--request-id", request_id, "--reason", "test", "--workspace", str(root)],
        capture_output=True,
        text=True,
    )
    return {
        "request_id": request_id,
        "owner": owner,
        "asked": asked,
        "cli_seconds": time.time() - asked,
        "rc": done.returncode,
        "stderr": done.stderr[-2000:] if done.returncode else "",
    }


def submit_at_rate(root: Path, owners: list[str], interval: float, t0: float, out: list[dict]) -> None:
    """Request `owners[i]` at t0 + i * interval (a thread: the drain runs meanwhile)."""
    for i, owner in enumerate(owners):
        time.sleep(max(0.0, t0 + i * interval - time.time()))
        out.append(record_request(root, owner, f"bench-{i + 1:03d}"))


def drain_on_schedule(
    root: Path, setup: Setup, t0: float, arrivals: threading.Thread, log_file: Path
) -> list[dict]:
    """Call the drain at t0 + k * drain_interval (k >= 1) until the arrivals are over and nothing is open; a
    drain that came due while one ran starts as soon as it ends. One entry per drain that ran the steps."""
    from sisaflow.core.paths import Workspace
    from sisaflow.deletion.requests import open_requests
    from sisaflow.pipeline import sequence

    ws = Workspace(root)
    runs: list[dict] = []
    tick = t0 + setup.drain_interval
    arrivals_over: float | None = None
    while True:
        time.sleep(max(0.0, tick - time.time()))
        started = time.time()
        error = None
        try:
            result = sequence.drain(str(root), setup.in_process, _runner(log_file))
        except Exception as exc:  # the schedule goes on, as the deployment's next run would
            result, error = None, f"{type(exc).__name__}: {exc}"
        if result is not None or error:
            runs.append(
                {
                    "started": started,
                    "seconds": time.time() - started,
                    "run_id": result.report.run_id if result else None,
                    "requests": list(result.report.retrained_requests) if result else [],
                    "error": error,
                }
            )
        # the first tick after this drain's start: passed already if it came due while the drain ran
        tick = t0 + (math.floor((started - t0) / setup.drain_interval) + 1) * setup.drain_interval
        if not arrivals.is_alive():
            arrivals_over = arrivals_over or time.time()
            if not open_requests(ws) or time.time() - arrivals_over > setup.max_wait:
                return runs


def one_at_a_time(root: Path, owners: list[str], setup: Setup, log_file: Path) -> list[dict]:
    """Each request recorded, then forgotten alone, back to back: when it was asked and its forget's times."""
    from sisaflow.pipeline import sequence

    out = []
    for i, owner in enumerate(owners):
        req = record_request(root, owner, f"bench-{i + 1:03d}")
        started = time.time()
        error = None
        try:
            result = sequence.forget(str(root), req["request_id"], setup.in_process, _runner(log_file))
            run_id = result.report.run_id
        except Exception as exc:
            run_id, error = None, f"{type(exc).__name__}: {exc}"
        out.append(
            {
                **req,
                "forget_started": started,
                "forget_seconds": time.time() - started,
                "run_id": run_id,
                "error": error,
            }
        )
    return out


# ---- what the ledger and the run reports say ----


def _epoch(at: str) -> float:
    return datetime.fromisoformat(at).timestamp()


def request_times(ws, asked: dict[str, float]) -> dict[str, dict]:
    """Per request: seconds from being asked to each state it reached (deletions/states.jsonl)."""
    from sisaflow.core import ledger

    states = ledger.states(ws.ledger_file)
    out = {}
    for rid, t in asked.items():
        reached = {s["state"]: _epoch(s["at"]) - t for s in states.get(rid, [])}
        out[rid] = {state: reached.get(state) for state in ledger.STATES}
    return out


def forget_runs(ws, since: float) -> list[dict]:
    """The forget runs' reports written after `since` (runs/*-forget.json), oldest first."""
    out = []
    for path in sorted(ws.runs_dir.glob("*-forget.json")):
        rep = json.loads(path.read_text())
        if _epoch(rep["started_at"]) >= math.floor(since):
            out.append(rep)
    return out


def _spread(values: list[float | None]) -> dict:
    got = [v for v in values if v is not None]
    if not got:
        return {"median": None, "worst": None, "n": 0}
    return {"median": statistics.median(got), "worst": max(got), "n": len(got)}


def fifo_latencies(arrivals: list[float], ready: list[float], service: list[float]) -> list[float]:
    """Latency of each request under one-at-a-time service in arrival order: request i can start once it is
    recorded (arrival + ready[i]) and the previous one is done, and takes service[i]."""
    out, free = [], -math.inf
    for a, r, s in zip(arrivals, ready, service, strict=True):
        start = max(a + r, free)
        free = start + s
        out.append(free - a)
    return out


def summarise(setup: Setup, batched: dict, alone: dict) -> dict:
    """The figures of both ways and their ratios (batched over one at a time)."""
    n = setup.requests
    b_times, a_times = batched["times"], alone["times"]
    b_cert = [t["certified"] for t in b_times.values()]
    a_cert = [t["certified"] for t in a_times.values()]
    # batched: from the first request to the last certificate; one at a time: the same arrivals, queued
    asked = sorted(batched["asked"].values())
    b_span = max(
        (batched["asked"][r] + c for r, c in zip(b_times, b_cert, strict=True) if c is not None), default=None
    )
    arrivals = [i * setup.interval for i in range(len(alone["forgets"]))]
    ready = [f["cli_seconds"] for f in alone["forgets"]]
    service = [f["forget_seconds"] for f in alone["forgets"]]
    queued = fifo_latencies(arrivals, ready, service)
    a_span = max((a + q for a, q in zip(arrivals, queued, strict=True)), default=None)
    b_tokens = sum(r["training_tokens"] for r in batched["runs"])
    a_tokens = sum(r["training_tokens"] for r in alone["runs"])
    full = batched["full_training_tokens"]

    def per_hour(certified: int, span: float | None) -> float | None:
        return 3600.0 * certified / span if span else None

    b_done = sum(c is not None for c in b_cert)
    a_done = sum(c is not None for c in a_cert)
    out = {
        "requests": n,
        "batched": {
            "certified": b_done,
            "drains": len(batched["drains"]),
            "drains_that_failed": sum(bool(d["error"]) for d in batched["drains"]),
            "certified_per_hour": per_hour(b_done, b_span - asked[0] if b_span and asked else None),
            "to_excluded_s": _spread([t["excluded"] for t in b_times.values()]),
            "to_certified_s": _spread(b_cert),
            "training_tokens": b_tokens,
            "tokens_per_request": b_tokens / n,
            "runs": len(batched["runs"]),
        },
        "one_at_a_time": {
            "certified": a_done,
            "forgets_that_failed": sum(bool(f["error"]) for f in alone["forgets"]),
            "certified_per_hour": per_hour(a_done, a_span),
            "certified_per_hour_back_to_back": per_hour(a_done, sum(service) + sum(ready)),
            "to_excluded_s": _spread([t["excluded"] for t in a_times.values()]),
            "to_certified_s_alone": _spread(a_cert),
            "to_certified_s_same_arrivals": _spread(queued),
            "training_tokens": a_tokens,
            "tokens_per_request": a_tokens / n,
            "runs": len(alone["runs"]),
        },
        "full_training_tokens": full,
    }
    b, a = out["batched"], out["one_at_a_time"]

    def ratio(x, y):
        return x / y if x is not None and y else None

    out["ratios"] = {
        "certified_per_hour": ratio(b["certified_per_hour"], a["certified_per_hour"]),
        "tokens_per_request": ratio(b["tokens_per_request"], a["tokens_per_request"]),
        "median_to_certified": ratio(
            b["to_certified_s"]["median"], a["to_certified_s_same_arrivals"]["median"]
        ),
        "worst_to_certified": ratio(b["to_certified_s"]["worst"], a["to_certified_s_same_arrivals"]["worst"]),
    }
    return out


def render(setup: Setup, res: dict, env: dict) -> str:
    """The summary as printed."""
    b, a, r = res["batched"], res["one_at_a_time"], res["ratios"]

    def s(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    def spread(d):
        return f"median {s(d['median'])} s, worst {s(d['worst'])} s"

    full = res["full_training_tokens"] or 1
    return "\n".join(
        [
            f"sisaflow deletions at a rate: {res['requests']} requests, one every {setup.interval:g} s for "
            f"{setup.duration:g} s; drain every {setup.drain_interval:g} s; "
            f"{'in-process training' if setup.in_process else 'training on Ray'}; {env['workspace']}; "
            f"{env['cpus']} CPU; mean load average: "
            + ", ".join(f"{k} {v}" for k, v in env.get("load_average", {}).items()),
            "",
            f"batched (drain on schedule): {b['certified']}/{res['requests']} certified in {b['runs']} run(s)"
            f" ({b['drains_that_failed']} drain(s) failed)",
            f"  certified per hour {s(b['certified_per_hour'])}",
            f"  request -> excluded  {spread(b['to_excluded_s'])}",
            f"  request -> certified {spread(b['to_certified_s'])}",
            f"  training tokens per request {b['tokens_per_request']:.0f} "
            f"({b['tokens_per_request'] / full:.3f} of a full training)",
            f"one at a time: {a['certified']}/{res['requests']} certified in {a['runs']} run(s)"
            f" ({a['forgets_that_failed']} forget(s) failed)",
            f"  certified per hour {s(a['certified_per_hour'])} under the same arrivals "
            f"({s(a['certified_per_hour_back_to_back'])} back to back)",
            f"  request -> excluded  {spread(a['to_excluded_s'])}",
            f"  request -> certified {spread(a['to_certified_s_same_arrivals'])} under the same arrivals; "
            f"alone {spread(a['to_certified_s_alone'])}",
            f"  training tokens per request {a['tokens_per_request']:.0f} "
            f"({a['tokens_per_request'] / full:.3f} of a full training)",
            "",
            f"batched / one at a time: certified per hour {s(r['certified_per_hour'], '{:.2f}')}x, "
            f"tokens per request {s(r['tokens_per_request'], '{:.2f}')}x, "
            f"median to certified {s(r['median_to_certified'], '{:.2f}')}x, "
            f"worst to certified {s(r['worst_to_certified'], '{:.2f}')}x",
            "the served weights are the same both ways: "
            + ("yes (bitwise)" if res.get("same_weights_both_ways") else "NO"),
        ]
    )


def environment(ws) -> dict:
    """What ran: versions, processor, the workspace's size."""
    from importlib.metadata import version

    from sisaflow.core.config import Params

    p = Params.load(ws.params_file)
    return {
        "date": datetime.now(UTC).date().isoformat(),
        "sisaflow": version("sisaflow"),
        "torch": version("torch"),
        "ray": version("ray"),
        "dvc": version("dvc"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "workspace": f"S={p.sharding.shards}, R={p.sharding.slices}, model {p.model.tokenizer} "
        f"h{p.model.hidden_size} x{p.model.layers}, {p.train.epochs_per_slice} epoch(s) per slice",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="a few requests seconds apart on a tiny workspace")
    ap.add_argument("--interval", type=float, help="seconds between two requests (default 10)")
    ap.add_argument("--duration", type=float, help="seconds during which requests arrive (default 600)")
    ap.add_argument("--drain-interval", type=float, help="seconds between two drains (default 60)")
    ap.add_argument("--max-wait", type=float, help="seconds the drain may go on after the last request")
    ap.add_argument("--in-process", action="store_true", help="train in this process instead of on Ray")
    ap.add_argument("--seed", type=int, help="picks the owners (default 0)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="where deletions.json goes")
    ap.add_argument("--keep", help="build the workspaces here and keep them (default: a temporary directory)")
    args = ap.parse_args(argv)
    setup = SMOKE if args.smoke else Setup()
    given = {
        "interval": args.interval,
        "duration": args.duration,
        "drain_interval": args.drain_interval,
        "max_wait": args.max_wait,
        "seed": args.seed,
    }
    setup = dataclasses.replace(setup, **{k: v for k, v in given.items() if v is not None})
    if args.in_process:
        setup = dataclasses.replace(setup, in_process=True)

    _quiet_env()
    base = (
        Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="sisaflow-bench-deletions-"))
    )
    base.mkdir(parents=True, exist_ok=True)
    for name in ("batched", "alone"):
        shutil.rmtree(base / name, ignore_errors=True)
    try:
        res = run(setup, base)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deletions.json").write_text(json.dumps(res, indent=2) + "\n")
    print(res["text"])
    print(f"\nwrote {out / 'deletions.json'}")
    ok = (
        res["summary"]["batched"]["certified"]
        == res["summary"]["one_at_a_time"]["certified"]
        == setup.requests
    )
    return 0 if ok else 1


class LoadSampler(threading.Thread):
    """The machine's 1-minute load average every `every` seconds, by phase: the two ways run one after the
    other, so a busier machine during one of them shows here."""

    def __init__(self, every: float = 15.0):
        super().__init__(daemon=True)
        self.every, self.phase, self.samples = every, "build", {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every):
            self.samples.setdefault(self.phase, []).append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._halt.set()
        return {k: round(statistics.mean(v), 2) for k, v in self.samples.items()}


def run(setup: Setup, base: Path) -> dict:
    """Build, copy, run both ways; everything deletions.json holds."""
    from sisaflow.core.paths import Workspace
    from sisaflow.pipeline import steps

    load = LoadSampler(every=min(15.0, setup.interval))
    load.start()
    t = time.perf_counter()
    ws_b = build_workspace(base / "batched", setup)
    build_seconds = time.perf_counter() - t
    params = steps.load(ws_b)
    full = steps.full_training_tokens(ws_b, params)
    copy_workspace(ws_b.root, base / "alone")
    ws_a = Workspace(base / "alone")
    owners = pick_owners(ws_b, setup.requests, setup.seed)

    submitted: list[dict] = []
    load.phase = "batched"
    t0 = time.time() + 1.0
    arrivals = threading.Thread(
        target=submit_at_rate, args=(ws_b.root, owners, setup.interval, t0, submitted)
    )
    arrivals.start()
    drains = drain_on_schedule(ws_b.root, setup, t0, arrivals, base / "batched.log")
    arrivals.join()
    batched = {
        "asked": {s["request_id"]: s["asked"] for s in submitted},
        "drains": drains,
        "runs": forget_runs(ws_b, t0),
        "full_training_tokens": full,
    }
    batched["times"] = request_times(ws_b, batched["asked"])

    load.phase = "one_at_a_time"
    t1 = time.time()
    forgets = one_at_a_time(ws_a.root, owners, setup, base / "alone.log")
    alone = {"forgets": forgets, "runs": forget_runs(ws_a, t1)}
    alone["times"] = request_times(ws_a, {f["request_id"]: f["asked"] for f in forgets})

    env = {**environment(ws_b), "load_average": load.stop()}
    summary = summarise(setup, batched, alone)
    # exact unlearning: however the requests were batched, the served weights are the same bits
    summary["same_weights_both_ways"] = steps.checkpoint_hashes(ws_b, params) == steps.checkpoint_hashes(
        ws_a, params
    )
    return {
        "setup": dataclasses.asdict(setup),
        "environment": env,
        "build_seconds": build_seconds,
        "summary": summary,
        "text": render(setup, summary, env),
        "requests": {
            "submitted": submitted,
            "batched": batched["times"],
            "one_at_a_time": alone["times"],
        },
        "drains": drains,
        "forgets": forgets,
        "runs": {
            "batched": [_run_row(r) for r in batched["runs"]],
            "one_at_a_time": [_run_row(r) for r in alone["runs"]],
        },
    }


def _run_row(rep: dict) -> dict:
    return {
        "run_id": rep["run_id"],
        "requests": rep.get("retrained_requests", []),
        "training_tokens": rep["training_tokens"],
        "trained": {
            s: {"from_slice": t["from_slice"], "tokens": t["tokens"]} for s, t in rep["trained"].items()
        },
        "seconds": rep["seconds"],
    }


if __name__ == "__main__":
    sys.exit(main())
