"""A checkpoint is the whole training state after a slice: weights, optimizer moments, counters, RNG.

Layout of models/shard-<n>/slice-<k>/ (safetensors only, never pickle):
  model.safetensors      the weights (the constituent served after slice k); for a LoRA constituent only the
                         adapter's (peft's adapter state dict): the frozen base is not part of any checkpoint
  optimizer.safetensors  AdamW moments and step per parameter, and the torch RNG state
  meta.json              counters, the chain hash that says which data and settings produced it, and the
                         environments (library versions, processor kind) that trained slices 0..k
  lineage.json           content hashes of the records of slice k (hashes only, never text)
Files carry no timestamps, so the same training gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sisaflow.core.fsio import atomic_dir, read_json, sha256_file, write_json

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
LINEAGE_FILE = "lineage.json"


@dataclass(frozen=True)
class CheckpointMeta:
    shard: int
    slice: int
    chain: str
    """Hash over the training identity and the data digests of slices 0..slice."""
    global_step: int
    tokens_seen: int
    examples_seen: int
    last_loss: float | None
    environments: list[dict[str, str]] = field(default_factory=list)
    """The environments that trained slices 0..slice, in order (one entry per change): what besides the
    settings and the data decides the bits. Not in the chain: a new library version does not retrain every shard,
    but a resume under another environment says so, and so does `verify --exact`."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


UNRECORDED = {
    "unrecorded": "an unrecorded environment (the checkpoint is older than sisaflow's recording of them)"
}


def describe_environment(env: dict[str, str]) -> str:
    """'torch 2.13.0, transformers 5.24.0, cpu AVX2' for the environment of numerics_environment()."""
    return ", ".join(v if k in ("device", "unrecorded") else f"{k} {v}" for k, v in env.items())


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: CheckpointMeta,
    lineage: list[str],
) -> None:
    """Write a complete checkpoint atomically (a crash leaves the previous state or this one)."""
    import torch
    from safetensors.torch import save_file, save_model

    from sisaflow.models.lora import adapter_state, is_lora

    params = [p for group in optimizer.param_groups for p in group["params"]]
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    for i, p in enumerate(params):
        state = optimizer.state.get(p, {})
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"param.{i}.{key}"] = t.detach().to("cpu").contiguous()
    with atomic_dir(directory) as tmp:
        if is_lora(model):
            save_file(adapter_state(model), str(tmp / MODEL_FILE))
        else:
            save_model(model, str(tmp / MODEL_FILE))
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        write_json(tmp / META_FILE, meta.to_dict())
        write_json(tmp / LINEAGE_FILE, sorted(lineage))


def read_meta(directory: Path) -> CheckpointMeta | None:
    """The meta of a complete checkpoint, or None if there is none."""
    path = Path(directory) / META_FILE
    if not path.is_file() or not (Path(directory) / MODEL_FILE).is_file():
        return None
    data = read_json(path)
    data.setdefault("environments", [UNRECORDED])
    return CheckpointMeta(**data)


def load_weights(directory: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into `model` (into its adapter, for a LoRA constituent)."""
    from safetensors.torch import load_file, load_model

    from sisaflow.models.lora import is_lora, load_adapter_state

    path = str(Path(directory) / MODEL_FILE)
    if is_lora(model):
        load_adapter_state(model, load_file(path))
    else:
        load_model(model, path, device=str(next(model.parameters()).device))


def load_training_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore weights, optimizer moments and RNG so training continues exactly as if never stopped."""
    import torch
    from safetensors.torch import load_file

    load_weights(directory, model)
    tensors = load_file(str(Path(directory) / OPTIMIZER_FILE))
    # a fused or capturable optimizer (CUDA) keeps its step counter on the parameter's device, others on CPU
    on_device = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        state = {
            key.split(".", 2)[2]: value.to(p.device) if on_device or key.split(".", 2)[2] != "step" else value
            for key, value in tensors.items()
            if key.startswith(f"param.{i}.")
        }
        if state:
            optimizer.state[p] = state
    torch.set_rng_state(tensors["rng.torch"])


def read_lineage(directory: Path) -> list[str]:
    """Content hashes of the records of this checkpoint's slice (empty if the checkpoint is missing)."""
    path = Path(directory) / LINEAGE_FILE
    return read_json(path) if path.is_file() else []


def weights_hash(directory: Path) -> str:
    """sha256 of a checkpoint's weight file (what certificates and status show)."""
    return sha256_file(Path(directory) / MODEL_FILE)
