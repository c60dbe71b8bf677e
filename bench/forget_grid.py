"""One (S, R) layout of the benchmark: full training, utility, single deletions and a batch of K, all measured.

Uses the library as the pipeline does, without Prefect, Ray or DVC (those are measured apart, in overhead.py):
import the corpus minus the deleted owners (corpus.import_corpus, what `prepare` does with the ledger), re-shard
(slice files rewritten only where their content changed), retrain the stale shards (steps.stale_shards) with
train_shard in this process, one shard after another, then register the ensemble.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cost_accounting as ca
import yaml

from sisaflow.core.config import Params, ShardingParams
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import Exclusions, Record, from_table, import_corpus, read_table
from sisaflow.data.sharding import read_shard_manifest, shard_corpus
from sisaflow.evaluation.metrics import perplexity
from sisaflow.inference.ensemble import Ensemble
from sisaflow.inference.registry import build_registry
from sisaflow.models.tokenizer import load_tokenizer
from sisaflow.pipeline import steps
from sisaflow.training.loop import train_shard

SINGLES = 2  # single deletions measured per layout (the expectation over all owners is computed exactly)


def quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Setup:
    """What every layout shares: the corpus subset, the settings, the deletions and the evaluation records."""

    source: Path
    """The corpus subset, written once as JSONL."""
    params: Params
    """Settings of every layout but `sharding`."""
    k: int
    seed: int
    holdout: list[Record]
    members: list[Record]


def workspace(
    root: Path, setup: Setup, shards: int, slices: int, dvc: bool = False
) -> tuple[Workspace, Params]:
    """A workspace for one layout with the corpus imported: a bare directory, or with dvc=True a real one
    (`sisaflow init`: git, DVC, dvc.yaml) for measuring DVC."""
    params = dataclasses.replace(setup.params, sharding=ShardingParams(shards, slices))
    if dvc:
        from sisaflow.pipeline.create import init_workspace

        ws = init_workspace(root, setup.source, params.corpus, params.sharding, hash_key=False)
    else:
        ws = Workspace(root)
        ws.root.mkdir(parents=True)
        import_corpus(setup.source, params.corpus, ws.corpus_file, Exclusions())
    ws.params_file.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
    return ws, params


def train(ws: Workspace, params: Params, shards: list[int]) -> dict:
    """Train `shards` one after another in this process; per-slice tokens and seconds, and wall time."""
    work_tokens = [[0.0] * params.sharding.slices for _ in params.sharding.shard_ids]
    work_seconds = [[0.0] * params.sharding.slices for _ in params.sharding.shard_ids]
    starts, wall = {}, {}
    for s in shards:
        t0 = time.perf_counter()
        rep = train_shard(ws, s, params, progress=quiet)
        wall[s] = time.perf_counter() - t0
        starts[s] = rep.start_slice
        for sl in rep.slices:
            work_tokens[s][sl.slice] = sl.tokens
            work_seconds[s][sl.slice] = sl.seconds
    return {
        "tokens": ca.total(work_tokens),
        "seconds": ca.total(work_seconds),
        "wall_seconds": sum(wall.values()),
        "start_slice": starts,
        "work_tokens": work_tokens,
        "work_seconds": work_seconds,
    }


def placement(ws: Workspace, params: Params) -> dict[str, tuple[int, int]]:
    """owner -> (shard, slice), read from the slice files."""
    out = {}
    for s in params.sharding.shard_ids:
        for k in range(params.sharding.slices):
            for r in from_table(read_table(ws.slice_file(s, k))):
                out[r.owner] = (s, k)
    return out


def own_tokens(ws: Workspace, params: Params) -> dict[str, float]:
    """Tokens each owner's records add to a full training: their encoded length (cut at the context) per epoch,
    as train_shard counts them (with the base's own tokenizer for LoRA constituents)."""
    tok = load_tokenizer(params.model.tokenizer, params.model.base)
    out: dict[str, float] = {}
    for r in from_table(read_table(ws.corpus_file)):
        n = min(len(tok.encode(r.text)) + 1, params.model.context_length)
        out[r.owner] = out.get(r.owner, 0.0) + n * params.train.epochs_per_slice
    return out


def utility(ws: Workspace, setup: Setup) -> dict:
    """Perplexity of the served ensemble (the batched path) on never-seen and on training records."""
    ens = Ensemble.load(ws)
    out: dict = {"batched": ens.batched}
    for name, records in (("holdout", setup.holdout), ("train", setup.members)):
        t0 = time.perf_counter()
        ll, n = 0.0, 0
        for r in records:
            sc = ens.score(r.text)
            ll, n = ll + sc["log_likelihood"], n + sc["tokens"]
        out[name] = {"perplexity": perplexity(ll, n), "tokens": n, "records": len(records)}
        out[name]["seconds"] = time.perf_counter() - t0
    return out


def forget(
    ws: Workspace, params: Params, setup: Setup, owners: list[str], place: dict, full: dict, own: dict
) -> dict:
    """Delete `owners` and retrain what is stale; the measured cost, and the cost predicted from `place`, the
    full training's per-slice tokens and the owners' own tokens (equal when the accounting is right)."""
    t0 = time.perf_counter()
    import_corpus(setup.source, params.corpus, ws.corpus_file, Exclusions(owners=frozenset(owners)))
    rep = shard_corpus(ws, params.sharding, allow_empty=True)
    stale = steps.stale_shards(ws, params)
    expected_stale: dict[int, int] = {}
    for o in owners:
        s, k = place[o]
        expected_stale[s] = min(k, expected_stale.get(s, k))
    if stale != expected_stale:
        raise RuntimeError(f"stale shards {stale} differ from the deleted owners' placement {expected_stale}")
    prep = time.perf_counter() - t0
    retrained = train(ws, params, sorted(stale))
    build_registry(ws, params)
    predicted = ca.retrain_cost(full["work_tokens"], place, owners, own)
    return {
        "owners": sorted(owners),
        "placement": {o: list(place[o]) for o in sorted(owners)},
        "stale": {str(s): k for s, k in sorted(stale.items())},
        "slice_files_rewritten": len(rep.slices_written),
        "slice_files": params.sharding.shards * params.sharding.slices,
        "tokens": retrained["tokens"],
        "seconds": retrained["seconds"],
        "wall_seconds": retrained["wall_seconds"],
        "prepare_shard_seconds": prep,
        "predicted_tokens": predicted,
        "tokens_ratio": retrained["tokens"] / full["tokens"],
        "seconds_ratio": retrained["seconds"] / full["seconds"],
        "wall_ratio": retrained["wall_seconds"] / full["wall_seconds"],
    }


def clone(ws: Workspace, target: Path) -> Workspace:
    """A copy of the training state (params, corpus, shards, models) to apply another deletion to."""
    target.mkdir(parents=True)
    shutil.copy2(ws.params_file, target / ws.params_file.name)
    for d in (ws.corpus_dir, ws.shards_dir, ws.models_dir):
        shutil.copytree(d, target / d.name)
    return Workspace(target)


def run_layout(root: Path, setup: Setup, shards: int, slices: int, dvc_timer=None) -> dict:
    """Everything measured for one layout. `dvc_timer(ws, when)` (only for the DVC workspace) is called after
    the full training and after the single deletion."""
    t_start = time.perf_counter()
    ws, params = workspace(root / "ws", setup, shards, slices, dvc=dvc_timer is not None)
    workspace_seconds = time.perf_counter() - t_start
    shard_corpus(ws, params.sharding)
    full = train(ws, params, params.sharding.shard_ids)
    build_registry(ws, params)
    place = placement(ws, params)
    own = own_tokens(ws, params)
    manifest = [read_shard_manifest(ws, s) for s in params.sharding.shard_ids]
    full["shard_records"] = [m["records"] for m in manifest]
    full["slice_records"] = [[x["records"] for x in m["slices"]] for m in manifest]
    out: dict = {"shards": shards, "slices": slices, "owners": len(place), "full": full}
    out["workspace_seconds"] = workspace_seconds
    out["utility"] = utility(ws, setup)
    if dvc_timer:
        out["dvc"] = {"after_full": dvc_timer(ws, "after_full")}

    secs_rate = {
        o: full["work_seconds"][s][k] / full["work_tokens"][s][k] if full["work_tokens"][s][k] else 0.0
        for o, (s, k) in place.items()
    }
    own_secs = {o: own[o] * secs_rate[o] for o in place}
    out["expected"] = {
        "single": {
            "tokens": ca.expected_single(full["work_tokens"], place, own),
            "seconds": ca.expected_single(full["work_seconds"], place, own_secs),
            "model": ca.cost_model(shards, slices, 1, params.train.schedule),
        },
        "batch": {
            "tokens": ca.expected_batch(full["work_tokens"], place, setup.k, own),
            "seconds": ca.expected_batch(full["work_seconds"], place, setup.k, own_secs),
            "model": ca.cost_model(shards, slices, setup.k, params.train.schedule),
        },
    }
    owners = sorted(place)
    singles = random.Random(setup.seed).sample(owners, SINGLES)
    batch = random.Random(setup.seed + 1).sample(owners, setup.k)
    copies = [clone(ws, root / f"copy-{i}") for i in range(SINGLES)]  # the trained state, for the others
    out["singles"] = [forget(ws, params, setup, [singles[0]], place, full, own)]
    if dvc_timer:
        out["dvc"]["after_forget"] = dvc_timer(ws, "after_forget")
    for other, owner in zip(copies[1:], singles[1:]):
        out["singles"].append(forget(other, params, setup, [owner], place, full, own))
    out["batch"] = forget(copies[0], params, setup, batch, place, full, own)
    out["wall_seconds"] = time.perf_counter() - t_start
    shutil.rmtree(root, ignore_errors=True)
    return out
