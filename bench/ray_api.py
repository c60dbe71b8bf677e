"""What one shard training costs through a plain Ray task versus Ray Train's TorchTrainer (one worker).

    python bench/ray_api.py [--reps 3] [--workspace DIR] [--out results.json]

Builds (once) a workspace from the default TOFU corpus with the repository's params.yaml (4 shards x 4 slices,
byte tokenizer, hidden 128), prepares and shards it, then measures shard 0 trained from scratch five ways, each
in a fresh Python process with a fresh local Ray (started as sisaflow.training.ray_launcher.connect starts it):

  inprocess     sisaflow.training.loop.train_shard in the driver (no Ray): the training itself
  task-noop     a Ray task that does nothing: the fixed cost of the task path
  task          sisaflow.training.ray_launcher.train_shards(ws, params, [0]): exactly what `sisaflow run` does
  trainer-noop  TorchTrainer(ScalingConfig(num_workers=1)).fit() with a loop that only reports
  trainer       the same with a loop that calls train_shard

For each: wall time of the call (Ray already started; `ray.init` and `ray.shutdown` are timed apart), CPU
seconds used by the whole process tree during the call (less sensitive than wall time to other load on the
machine), peak RSS of the process that trained (the driver, or the largest Ray worker) and peak total RSS and
PSS of the driver plus every Ray process (GCS, raylet, agents, workers, Train's controller), sampled every 0.1 s,
minus the same tree idle just after `ray.init`. The runs are interleaved (one of each per repetition) and the
median is reported; the weights of every run that trained must be bitwise equal.

Needs ray[train] (pandas, tensorboardX on top of ray[default]); without it the trainer rows are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ["inprocess", "task-noop", "task", "trainer-noop", "trainer"]
SHARD = 0


# ---------------------------------------------------------------- measuring one run (in its own process)


class Sampler(threading.Thread):
    """Samples RSS/PSS and CPU time of this process and all its descendants every `period` seconds."""

    def __init__(self, period: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.period = period
        self.stop_event = threading.Event()
        self.peak_total_rss = 0
        self.peak_total_pss = 0
        self.peak_rss: dict[int, tuple[int, str]] = {}  # pid -> (peak rss, name)
        self.cpu_first: dict[int, float] = {}
        self.cpu_last: dict[int, float] = {}

    def tree(self):
        try:
            return [self.me, *self.me.children(recursive=True)]
        except self.psutil.Error:
            return [self.me]

    def snapshot(self) -> tuple[int, int]:
        rss_sum = pss_sum = 0
        for p in self.tree():
            try:
                with p.oneshot():
                    mem = p.memory_full_info()
                    cpu = p.cpu_times()
                    name = " ".join(p.cmdline()[:1]) or p.name()
                    if name.endswith("python3") or name.endswith("python"):
                        name = p.name()
            except self.psutil.Error:
                continue
            rss_sum += mem.rss
            pss_sum += getattr(mem, "pss", mem.rss)
            peak, peak_name = self.peak_rss.get(p.pid, (0, name))
            if name == "ray::IDLE":  # a worker back in the pool keeps the name of the task that grew it
                name = peak_name
            if mem.rss > peak:
                self.peak_rss[p.pid] = (mem.rss, name)
            total_cpu = cpu.user + cpu.system
            self.cpu_first.setdefault(p.pid, total_cpu)
            self.cpu_last[p.pid] = total_cpu
        return rss_sum, pss_sum

    def run(self) -> None:
        while not self.stop_event.is_set():
            rss, pss = self.snapshot()
            self.peak_total_rss = max(self.peak_total_rss, rss)
            self.peak_total_pss = max(self.peak_total_pss, pss)
            self.stop_event.wait(self.period)

    def start_measuring(self) -> None:
        self.base_rss, self.base_pss = self.snapshot()
        self.peak_rss.clear()
        self.base_cpu = dict(self.cpu_last)
        self.start()

    def finish(self) -> dict:
        self.stop_event.set()
        self.join()
        self.snapshot()
        cpu = sum(last - self.base_cpu.get(pid, 0.0) for pid, last in self.cpu_last.items())
        top_pid, (top_rss, top_name) = max(self.peak_rss.items(), key=lambda kv: kv[1][0])
        workers = {
            pid: v for pid, v in self.peak_rss.items() if v[1].startswith("ray::") and "Agent" not in v[1]
        }
        return {
            "cpu_seconds": round(cpu, 2),
            "idle_tree_rss_mb": round(self.base_rss / 2**20),
            "idle_tree_pss_mb": round(self.base_pss / 2**20),
            "peak_tree_rss_mb": round(self.peak_total_rss / 2**20),
            "peak_tree_pss_mb": round(self.peak_total_pss / 2**20),
            "added_rss_mb": round((self.peak_total_rss - self.base_rss) / 2**20),
            "added_pss_mb": round((self.peak_total_pss - self.base_pss) / 2**20),
            "largest_process": top_name,
            "largest_process_rss_mb": round(top_rss / 2**20),
            "ray_workers": {v[1]: round(v[0] / 2**20) for v in sorted(workers.values(), key=lambda v: -v[0])},
        }


def _weights_hash(ws) -> str | None:
    from sisaflow.core.config import Params

    params = Params.load(ws.params_file)
    f = ws.checkpoint_dir(SHARD, params.sharding.slices - 1) / "model.safetensors"
    return hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None


def _noop_task() -> int:
    return os.getpid()


def _trainer_loop(config: dict) -> None:
    import ray.train

    if config["noop"]:
        ray.train.report({"tokens": 0})
        return
    from sisaflow.core.config import Params
    from sisaflow.core.paths import Workspace
    from sisaflow.training.loop import train_shard

    report = train_shard(Workspace(config["root"]), config["shard"], Params.from_dict(config["params"]))
    # Train v2 keeps reported metrics only with a checkpoint (Result.metrics is None otherwise): pass the
    # shard report back through a file; the checkpoints themselves are sisaflow's, in the workspace
    Path(config["report_file"]).write_text(json.dumps(report.to_dict()))
    ray.train.report({"tokens": report.tokens})


def measure_one(method: str, root: Path, storage: Path) -> dict:
    """Run `method` once in this process; return its figures."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    out: dict = {"method": method, "load_avg_1m": round(os.getloadavg()[0], 2)}
    t = time.perf_counter()
    from sisaflow.core.config import Params
    from sisaflow.core.paths import Workspace

    ws = Workspace(root)
    params = Params.load(ws.params_file)
    storage.mkdir(parents=True, exist_ok=True)
    sampler = Sampler()

    if method == "inprocess":
        from sisaflow.training.loop import train_shard

        out["import_seconds"] = round(time.perf_counter() - t, 2)
        sampler.start_measuring()
        t0 = time.perf_counter()
        rep = train_shard(ws, SHARD, params)
        out["call_seconds"] = round(time.perf_counter() - t0, 2)
        out["train_seconds"] = round(rep.seconds, 2)
        out["tokens"] = rep.tokens
        out.update(sampler.finish())
        out["weights"] = _weights_hash(ws)
        return out

    import ray

    from sisaflow.training import ray_launcher

    if method.startswith("trainer"):
        import ray.train
        from ray.train.torch import TorchTrainer
    out["import_seconds"] = round(time.perf_counter() - t, 2)

    t0 = time.perf_counter()
    assert ray_launcher.connect(ws, params.ray), "a Ray session was already connected"
    out["ray_init_seconds"] = round(time.perf_counter() - t0, 2)
    time.sleep(2.0)  # let Ray's prestarted workers settle so the idle tree is idle
    sampler.start_measuring()
    t0 = time.perf_counter()
    try:
        if method == "task-noop":
            ray.get(ray.remote(num_cpus=params.ray.num_cpus_per_shard)(_noop_task).remote())
        elif method == "task":
            rep = ray_launcher.train_shards(ws, params, [SHARD], progress=lambda s: None)
            out["train_seconds"] = round(rep.shards[0].seconds, 2)
            out["tokens"] = rep.shards[0].tokens
        else:
            trainer = TorchTrainer(
                _trainer_loop,
                train_loop_config={
                    "noop": method == "trainer-noop",
                    "root": str(ws.root),
                    "shard": SHARD,
                    "params": params.to_dict(),
                    "report_file": str(storage / f"report-{os.getpid()}.json"),
                },
                scaling_config=ray.train.ScalingConfig(
                    num_workers=1, use_gpu=False, resources_per_worker={"CPU": params.ray.num_cpus_per_shard}
                ),
                run_config=ray.train.RunConfig(name=f"{method}-{os.getpid()}", storage_path=str(storage)),
            )
            result = trainer.fit()
            if result.error:
                raise result.error
            if method == "trainer":
                shard_report = json.loads((storage / f"report-{os.getpid()}.json").read_text())
                out["train_seconds"] = round(shard_report["seconds"], 2)
                out["tokens"] = shard_report["tokens"]
        out["call_seconds"] = round(time.perf_counter() - t0, 2)
        out.update(sampler.finish())
    finally:
        t1 = time.perf_counter()
        ray.shutdown()
        out["ray_shutdown_seconds"] = round(time.perf_counter() - t1, 2)
    if method in ("task", "trainer"):
        out["weights"] = _weights_hash(ws)
    return out


# ---------------------------------------------------------------- the driver of the benchmark


def build_workspace(root: Path) -> None:
    """A workspace over the full TOFU corpus with the repository's params.yaml; prepared and sharded."""
    import yaml

    from sisaflow.core.config import CorpusParams, Params
    from sisaflow.pipeline import steps
    from sisaflow.pipeline.create import init_workspace

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["corpus"]["path"] = str(REPO / raw["corpus"]["path"])
    params = Params.from_dict(raw)
    cp = CorpusParams(**{**params.corpus.__dict__})
    ws = init_workspace(root, Path(raw["corpus"]["path"]), cp, params.sharding, hash_key=False)
    ws.params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    params = steps.load(ws)
    steps.prepare(ws, params)
    steps.shard(ws, params)


def have_ray_train() -> bool:
    try:
        import ray.train.torch  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workspace", type=Path, help="reuse or create the workspace here (default: a temp dir)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, help="write every run's figures as JSON here")
    ap.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--storage", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        print("RESULT " + json.dumps(measure_one(args.one, args.workspace, args.storage)), flush=True)
        return 0

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    tmp = Path(tempfile.mkdtemp(prefix="sfbench-", dir="/tmp"))
    root = args.workspace or tmp / "ws"
    if not (root / "params.yaml").is_file():
        t = time.perf_counter()
        build_workspace(root)
        print(f"workspace {root} built in {time.perf_counter() - t:.1f}s", flush=True)
    methods = args.methods.split(",")
    if not have_ray_train():
        print("ray.train is not importable (pip install 'ray[train]'): skipping the trainer rows", flush=True)
        methods = [m for m in methods if not m.startswith("trainer")]

    runs: list[dict] = []
    try:
        for rep in range(args.reps):
            for method in methods:
                shutil.rmtree(root / "models", ignore_errors=True)  # every run trains shard 0 from scratch
                t = time.perf_counter()
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--one",
                        method,
                        "--workspace",
                        str(root),
                        "--storage",
                        str(tmp / "ray_results"),
                    ],
                    capture_output=True,
                    text=True,
                )
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
                    raise SystemExit(f"{method}: run failed with exit code {proc.returncode}")
                r = json.loads(lines[-1][len("RESULT ") :])
                r["process_seconds"] = round(time.perf_counter() - t, 2)
                r["rep"] = rep
                runs.append(r)
                print(
                    f"rep {rep} {method:13s} call {r['call_seconds']:6.2f}s  cpu {r['cpu_seconds']:6.2f}s  "
                    f"process {r['process_seconds']:6.2f}s  added RSS {r['added_rss_mb']:5d} MB  "
                    f"PSS {r['added_pss_mb']:5d} MB  largest {r['largest_process']} "
                    f"{r['largest_process_rss_mb']} MB  load {r['load_avg_1m']}",
                    flush=True,
                )
    finally:
        if args.out:
            args.out.write_text(json.dumps(runs, indent=1))
        shutil.rmtree(tmp, ignore_errors=True)  # Train's storage, and the workspace unless --workspace

    hashes = {r["weights"] for r in runs if r.get("weights")}
    print(
        f"weights of shard {SHARD}: {'all equal' if len(hashes) == 1 else f'{len(hashes)} DIFFERENT hashes'}"
    )
    print(summary(runs, methods))
    return 0 if len(hashes) <= 1 else 1


def summary(runs: list[dict], methods: list[str]) -> str:
    keys = [
        ("call_seconds", "call s"),
        ("train_seconds", "train s"),
        ("cpu_seconds", "CPU s"),
        ("ray_init_seconds", "ray.init s"),
        ("ray_shutdown_seconds", "shutdown s"),
        ("process_seconds", "process s"),
        ("added_rss_mb", "+RSS MB"),
        ("added_pss_mb", "+PSS MB"),
        ("largest_process_rss_mb", "largest proc RSS MB"),
        ("peak_tree_rss_mb", "tree RSS MB"),
    ]
    head = "| method | " + " | ".join(k[1] for k in keys) + " |"
    lines = [head, "|" + " --- |" * (len(keys) + 1)]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        cells = []
        for k, _ in keys:
            vals = [r[k] for r in rs if r.get(k) is not None]
            cells.append(f"{statistics.median(vals):.1f}" if vals else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
