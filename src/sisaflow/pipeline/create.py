"""Creating a workspace: params.yaml, dvc.yaml, prefect.yaml, git and DVC, the imported corpus."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import yaml

from sisaflow.core import versioning
from sisaflow.core.config import CorpusParams, LoraParams, ModelParams, Params, ShardingParams
from sisaflow.core.errors import ShardingError, WorkspaceError
from sisaflow.core.fsio import write_text
from sisaflow.core.hashing import read_key, write_key, write_new_key
from sisaflow.core.paths import Workspace
from sisaflow.data.corpus import read_records

GITIGNORE = """\
.venv/
__pycache__/
/.sisaflow/
/runs/
/.dvc-remote/
/corpus/
/shards/
/models/
/registry/
/reports/
"""


def ensure_gitignore(directory: Path) -> None:
    """Every line of GITIGNORE in the directory's .gitignore: written whole where there is none, the missing lines
    appended to one that exists (a workspace inside an existing repository must not let git take its keys)."""
    gi = directory / ".gitignore"
    text = gi.read_text(encoding="utf-8") if gi.is_file() else ""
    have = {line.strip() for line in text.splitlines()}
    missing = [line for line in GITIGNORE.splitlines() if line not in have]
    if not missing:
        return
    if text and not text.endswith("\n"):
        text += "\n"
    write_text(
        gi, text + ("# sisaflow: keys, state and data outputs\n" if text else "") + "\n".join(missing) + "\n"
    )


def _prefect_template() -> Path:
    """The deployments' template, shipped in the flows package (found by path: the library never imports the
    flows, only the CLI does; the deployments name them by module, so a workspace holds no copy of them)."""
    return Path(__file__).resolve().parents[1] / "flows" / "prefect.template.yaml"


def workspace_name(directory: Path) -> str:
    """The name a workspace's deployments, work pool and events carry on a Prefect server: its directory's name,
    reduced to letters, digits, '.', '_' and '-' (Prefect names and event resource ids take those)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", directory.name).strip("-.") or "workspace"


def prefect_yaml(name: str) -> str:
    """prefect.yaml for a workspace, read from the flows package's template."""
    text = _prefect_template().read_text()
    return text.replace("{{NAME}}", name)


# LoRA over a pretrained base (`sisaflow init --base`): chosen by measurement on SmolLM2-135M-Instruct and TOFU
# (bench/lora_quality.py --sweep-lr; docs/lora.md has the figures): of 3e-4, 1e-3 and 3e-3 the learning rate
# that gave the lowest perplexity on the same authors' unseen questions (and on the sum of that and never-seen
# authors' log-perplexities), two epochs per slice, a short warm-up (a fixed step count weighs more on small
# shards), rank 8 on the attention's query and value projections (the LoRA paper's choice)
LORA_TRAIN = {"learning_rate": 3e-3, "epochs_per_slice": 2, "warmup_steps": 5, "batch_size": 8}
LORA_ENSEMBLE = {"combine": "posterior", "posterior": {"beta": 0.5, "floor": 0.5, "top_k": None}}
"""How `init --base` serves the adapters: weighted by the context, with the beta and floor that `make bench-lora`
chose on records no constituent trained on (the best sum of log-perplexities over S = 8 and S = 16; docs/lora.md):
owners' records better than the uniform mixture, never-seen ones as well as it."""
LORA_MODEL = {
    "context_length": 512,
    "lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
}


def _relative_or_absolute(path: Path, directory: Path) -> str:
    """As the corpus path: relative when inside the workspace (it moves with it), else absolute."""
    return str(path.relative_to(directory)) if path.is_relative_to(directory) else str(path)


def base_params(base: Path, directory: Path, raw: dict) -> dict:
    """`raw` params with LoRA over the pretrained `base` (tokenizer, context within the base's, adapters, the
    measured training defaults); ConfigError naming model.base if it is no usable causal LM."""
    from sisaflow.models.pretrained import base_context_limit, check_base

    base = Path(base).expanduser().resolve()
    model = {**raw["model"], **LORA_MODEL, "tokenizer": "base", "base": str(base)}
    limit = base_context_limit(str(base))
    if limit:
        model["context_length"] = min(model["context_length"], int(limit))
    check_base(ModelParams(**{**model, "lora": LoraParams(**model["lora"])}))
    model["base"] = _relative_or_absolute(base, directory)
    ensemble = {**raw.get("ensemble", {}), **LORA_ENSEMBLE}
    return {**raw, "model": model, "train": {**raw["train"], **LORA_TRAIN}, "ensemble": ensemble}


def init_workspace(
    directory: Path,
    corpus: Path,
    corpus_params: CorpusParams,
    sharding: ShardingParams | None = None,
    base: Path | None = None,
    hash_key: Path | bool = True,
    signing_key: bool = True,
) -> Workspace:
    """Create a workspace in `directory` for `corpus`, with LoRA constituents over `base` if given. Validates the
    corpus and the base first; writes nothing on error.

    `hash_key`: True makes a new secret key the records' hashes are keyed with (core.hashing), a path reuses
    that key (another workspace of the same operator), False keeps plain sha256 hashes. `signing_key`: make the
    Ed25519 key pair certificates are signed with (.sisaflow/keys/, as `sisaflow keys init`), unless one is
    there; False leaves certificates unsigned until a key is given."""
    directory = Path(directory).expanduser().resolve()
    corpus = Path(corpus).expanduser().resolve()
    ws = Workspace(directory)
    if ws.params_file.exists():
        raise WorkspaceError(f"{ws.params_file} already exists: {directory} is already a workspace")
    sharding = sharding or ShardingParams()
    records = read_records(corpus, corpus_params)  # raises CorpusError naming file and line
    owners = len({r.owner for r in records})
    if owners < sharding.shards:
        raise ShardingError(
            f"sharding.shards = {sharding.shards} but the corpus has only {owners} owner(s): shards would be "
            f"empty; pass --shards {owners} or fewer"
        )
    from sisaflow.data.sharding import shard_of

    used = {shard_of(r.owner, sharding.shards) for r in records}
    empty = sorted(set(range(sharding.shards)) - used)
    if empty:
        raise ShardingError(
            f"sharding.shards = {sharding.shards} leaves shard(s) {', '.join(map(str, empty))} empty: owners are "
            f"placed by a hash, and {owners} owner(s) do not fill {sharding.shards} shards; pass fewer --shards"
        )
    try:
        rel = corpus.relative_to(directory)
        corpus_path = str(rel)
    except ValueError:
        corpus_path = str(corpus)
    key = (
        read_key(Path(hash_key)) if not isinstance(hash_key, bool) else None
    )  # a bad key file: nothing written
    raw = Params().to_dict()
    raw["corpus"] = {**corpus_params.__dict__, "path": corpus_path}
    raw["sharding"] = sharding.__dict__
    if base is not None:
        raw = base_params(base, directory, raw)
    written = Params.from_dict(raw)  # as params.yaml says it (a base inside the workspace stays relative)
    params = written.resolved(directory)

    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if hash_key is not False:
            key_id = write_key(ws.hash_key_file, key) if key is not None else write_new_key(ws.hash_key_file)
            written = Params.from_dict({**raw, "corpus": {**raw["corpus"], "hash_key": key_id}})
            params = written.resolved(directory)
        if signing_key and not ws.signing_key_file.exists():
            from sisaflow.deletion.signing import write_key_pair

            write_key_pair(ws.signing_key_file)
        write_text(
            ws.params_file,
            "# sisaflow parameters: one section per stage (see the docs/ pages of sisaflow)\n"
            + yaml.safe_dump(written.to_dict(), sort_keys=False),
        )
        versioning.write_dvc_yaml(ws, params)
        write_text(ws.prefect_file, prefect_yaml(workspace_name(directory)))
        ws.deletions_dir.mkdir(exist_ok=True)
        ws.ledger_file.touch()
        ensure_gitignore(directory)
        versioning.init_repo(ws, params)
        versioning.refuse_tracked_keys(ws)
        from sisaflow.pipeline import steps

        steps.prepare(ws, params)
        versioning.git_commit(
            ws,
            "sisaflow init: workspace configuration",
            [
                "params.yaml",
                "dvc.yaml",
                "prefect.yaml",
                "deletions",
                ".gitignore",
                ".dvc/config",
                ".dvc/.gitignore",
                ".dvcignore",
            ],
        )
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            for p in (ws.params_file, ws.dvc_file, ws.prefect_file, ws.hash_key_file):
                p.unlink(missing_ok=True)
            if signing_key:  # only ever the pair this call made: an existing one is left alone above
                for p in (ws.signing_key_file, ws.public_key_file):
                    p.unlink(missing_ok=True)
        raise
    return ws


def default_workspace() -> Path:
    """--workspace default: SISAFLOW_WORKSPACE or the current directory."""
    return Path(os.environ.get("SISAFLOW_WORKSPACE", ".")).resolve()
