"""Ray: where shard trainings run. The only module that imports Ray.

Each stale shard becomes one Ray task (`num_cpus` from params; `num_gpus` when the cluster has GPUs), running the
same `train_shard` as the in-process path. Plain tasks rather than Ray Train's TorchTrainer: a shard here is one
small single-worker training, and a TorchTrainer fit adds 12-17 s, +1.7 GB RSS (+1.0 GB PSS) and 7 processes on
this class of machine (bench/ray_api.md), about half of a default shard's training; a shard that must train
data-parallel across several GPUs or nodes is the case for it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sisaflow.core.config import Params, RayParams
from sisaflow.core.errors import ExternalToolError
from sisaflow.core.paths import Workspace
from sisaflow.core.progress import bars_on, meter, terminal_bars
from sisaflow.training.loop import ShardTrainReport, SliceReport, train_shard

# read by Ray when it is imported, so set before any `import ray`
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # per-shard progress lines look alike; show them all

log = logging.getLogger("sisaflow.training.ray_launcher")


@dataclass
class ParallelReport:
    shards: list[ShardTrainReport] = field(default_factory=list)
    ray_start_seconds: float = 0.0
    wall_seconds: float = 0.0
    address: str = ""
    gpus: float = 0.0


def _train_task(root: str, shard: int, params_dict: dict, bars: bool = False) -> dict:
    """Runs inside a Ray worker: the same training function as in-process. With `bars`, the shard's steps go to
    the driver as Ray's distributed tqdm, which draws them there with the driver's own bar."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    with terminal_bars(bars, factory=_ray_bar):
        report = train_shard(Workspace(Path(root)), shard, Params.from_dict(params_dict), progress=print)
    return report.to_dict()


def _ray_bar(desc: str, total: int, unit: str):
    """A bar drawn by the driver (`ray.experimental.tqdm_ray`): Ray hides it while it prints a worker's lines,
    so the lines and the bars do not run through each other."""
    from ray.experimental import tqdm_ray

    bar = tqdm_ray.tqdm(desc=desc, total=total, unit=unit)
    bar.refresh()  # drawn from the start, not at its first update
    return bar


def _settle_ray_bars(timeout: float = 3.0) -> None:
    """Ray forwards a worker's last bar update with its log lines, a moment after the task has returned: wait
    for those briefly, then close any bar still open (the driver would draw it again after every later line)."""
    from ray.experimental import tqdm_ray

    manager = tqdm_ray.instance()
    # the manager is Ray's experimental code: tidy up only while it still looks as it does in Ray 2.60
    groups = getattr(manager, "bar_groups", None)
    if not isinstance(groups, dict):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(getattr(g, "bars_by_uuid", None) for g in groups.values()):
        time.sleep(0.1)
    with manager.lock:
        for group in groups.values():
            bars = getattr(group, "bars_by_uuid", {})
            for bar in bars.values():
                bar.close()
            bars.clear()


def _report_from_dict(d: dict) -> ShardTrainReport:
    slices = [SliceReport(**s) for s in d["slices"]]
    return ShardTrainReport(
        shard=d["shard"],
        start_slice=d["start_slice"],
        slices=slices,
        device=d["device"],
        environments=d.get("environments", []),
    )


def connect(ws: Workspace, rp: RayParams) -> bool:
    """Connect to the cluster in params, or start a local Ray; return True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if rp.address:
        try:
            ray.init(address=rp.address, log_to_driver=True, logging_level=logging.WARNING)
        except ConnectionError as exc:
            raise ExternalToolError(
                f"ray.address = {rp.address}: cannot connect to the Ray cluster ({exc}). If it uses token "
                "authentication (Ray >= 2.59 turns it on for `ray start` whenever ~/.ray/auth_token exists; "
                "a local Ray, e.g. an earlier `sisaflow run` without ray.address, creates that file), run "
                "sisaflow with RAY_AUTH_MODE=token (token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                "~/.ray/auth_token), or start the cluster with RAY_AUTH_MODE=disabled on a trusted network"
            ) from exc
    else:
        ws.ray_tmp_dir.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("RAY_TMPDIR", str(ws.ray_tmp_dir))
        ray.init(
            num_cpus=os.cpu_count(),
            object_store_memory=rp.object_store_memory_mb * 1024 * 1024,
            include_dashboard=False,
            _temp_dir=str(ws.ray_tmp_dir),
            log_to_driver=True,
            logging_level=logging.WARNING,
        )
    return True


def train_shards(
    ws: Workspace, params: Params, shards: list[int], progress: Callable[[str], None] | None = None
) -> ParallelReport:
    """Train `shards` in parallel on Ray, as many at once as resources allow; return per-shard reports."""
    say = progress or log.info
    report = ParallelReport(address=params.ray.address or "local")
    if not shards:
        return report
    import ray

    t0 = time.perf_counter()
    started = connect(ws, params.ray)
    report.ray_start_seconds = time.perf_counter() - t0
    try:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        report.gpus = gpus
        num_gpus = params.ray.num_gpus_per_shard if gpus and params.train.device != "cpu" else 0
        task = ray.remote(num_cpus=params.ray.num_cpus_per_shard, num_gpus=num_gpus, max_retries=2)(
            _train_task
        )
        say(
            f"training shard(s) {', '.join(map(str, shards))} on Ray ({report.address}, "
            f"{ray.cluster_resources().get('CPU', 0):.0f} CPU, {gpus:.0f} GPU)"
        )
        pending: dict = {}
        queue = list(shards)
        limit = params.ray.max_parallel or len(shards)
        t1 = time.perf_counter()
        # in a terminal, each worker's steps and the shards done here, as bars the driver draws
        bars = bars_on()
        with (
            terminal_bars(bars, factory=_ray_bar),
            meter("shards trained", len(shards), "shard") as finished,
        ):
            while queue or pending:
                while queue and len(pending) < limit:
                    shard = queue.pop(0)
                    pending[task.remote(str(ws.root), shard, params.to_dict(), bars)] = shard
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    shard = pending.pop(ref)
                    result = _report_from_dict(ray.get(ref))
                    report.shards.append(result)
                    say(f"shard {shard}: done ({result.tokens} tokens in {result.seconds:.1f}s)")
                    finished.advance()
        if bars:
            _settle_ray_bars()
        report.wall_seconds = time.perf_counter() - t1
    finally:
        if started:
            ray.shutdown()
    report.shards.sort(key=lambda r: r.shard)
    return report
