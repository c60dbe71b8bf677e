"""Fixed costs of the orchestration, apart from training: Ray, Prefect, DVC, each in seconds.

    python bench/overhead.py --prefect-probe   (used by report.py: prints one JSON line)

- Ray: `sisaflow.training.ray_launcher.connect` (a local Ray, started as `sisaflow run` starts it), a no-op task's round
  trip on a fresh worker and then on a warm one, and `ray.shutdown()`; only the Ray this process started.
- Prefect: a trivial flow in a fresh Python process with an ephemeral server (PREFECT_HOME in a temporary
  directory, no PREFECT_API_URL): the import, the first call (which starts Prefect's temporary server) and a
  second call, each from call to return. The process ends its own server when it exits.
- DVC: `dvc commit` and `dvc status` on a real workspace (`sisaflow init`: git + DVC), timed by `dvc_timer`.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _noop() -> int:
    return os.getpid()


def ray_overhead(warm_repeats: int = 5) -> dict:
    """Seconds: Ray start, a no-op task on a fresh worker, the median warm round trip, shutdown."""
    import ray

    from sisaflow.core.config import RayParams
    from sisaflow.core.paths import Workspace
    from sisaflow.training.ray_launcher import connect

    tmp = Path(tempfile.mkdtemp(prefix="sisaflow-bench-ray-"))
    ws = Workspace(tmp)
    out: dict = {}
    try:
        t0 = time.perf_counter()
        started = connect(ws, RayParams())
        out["start"] = time.perf_counter() - t0
        if not started:
            raise RuntimeError(
                "a Ray session was already connected in this process; measure with a fresh one"
            )
        try:
            task = ray.remote(num_cpus=1)(_noop)
            t0 = time.perf_counter()
            ray.get(task.remote())
            out["first_task"] = time.perf_counter() - t0
            warm = []
            for _ in range(warm_repeats):
                t0 = time.perf_counter()
                ray.get(task.remote())
                warm.append(time.perf_counter() - t0)
            out["warm_task"] = statistics.median(warm)
        finally:
            t0 = time.perf_counter()
            ray.shutdown()
            out["shutdown"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(ws.ray_tmp_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def prefect_probe() -> dict:
    """In this (fresh) process: import Prefect, call a trivial flow twice. Seconds."""
    t0 = time.perf_counter()
    from prefect import flow

    @flow(name="sisaflow-bench-noop")
    def noop() -> int:
        return 1

    out = {"import": time.perf_counter() - t0}
    for name in ("first_flow", "second_flow"):
        t0 = time.perf_counter()
        if noop() != 1:
            raise RuntimeError("the trivial flow returned something else")
        out[name] = time.perf_counter() - t0
    return out


def prefect_overhead(timeout: float = 300) -> dict:
    """Run `prefect_probe` in a fresh process with an ephemeral server; its seconds, and the process's."""
    home = Path(tempfile.mkdtemp(prefix="sisaflow-bench-prefect-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--prefect-probe"],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        process = time.perf_counter() - t0
    finally:
        shutil.rmtree(home, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"the Prefect probe failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1]), "process": process}


def dvc_timer(ws, when: str) -> dict:
    """Seconds of `dvc commit` and then `dvc status` of the training stages on `ws` (as `sisaflow run` records
    them; `sisaflow evaluate` records its own stage); status must then be clean."""
    from sisaflow.core import versioning
    from sisaflow.core.config import Params

    stages = versioning.stage_names(Params.load(ws.params_file))
    t0 = time.perf_counter()
    versioning.commit(ws, stages)
    commit = time.perf_counter() - t0
    t0 = time.perf_counter()
    status = versioning.status(ws, stages)
    return {"commit": commit, "status": time.perf_counter() - t0, "clean": not status, "stages": len(stages)}


if __name__ == "__main__":
    if sys.argv[1:] == ["--prefect-probe"]:
        print(json.dumps(prefect_probe()), flush=True)
    else:
        print(__doc__)
        raise SystemExit(2)
