"""Training one constituent: shard by shard, slice by slice, a full checkpoint after each slice.

Retraining after a deletion and training from scratch without the deleted records run the same computation:
every random choice is seeded from (seed, shard, slice, epoch), the data order is a function of the records
present (sorted by plain content hash, then a seeded permutation), the learning rate depends only on the step count
(linear warm-up, then constant), and nothing in slice k looks at later slices. On CPU, with a fixed thread count
and deterministic algorithms, the weights are bitwise equal.

A constituent is either a small Llama built from scratch or, with model.base set, a LoRA adapter over that
frozen pretrained base (sisaflow.models.lora): then only the adapter trains and is checkpointed. On CUDA, training runs
under bf16 autocast with a fused AdamW (and torch.compile with train.compile). With train.deterministic (the
default) it also uses torch's strict deterministic algorithms and cuBLAS's fixed workspace, so a GPU run repeats
bit for bit on the same device and software (two eager trainings on an H200 gave equal weights; bench/gpu.py
records it, and the `gpu` tests check forgetting against training from scratch there); CPU, eager and float32,
is the computation the exactness guarantee is stated for and CI tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from sisaflow.core.config import ModelParams, Params, TrainParams
from sisaflow.core.paths import Workspace
from sisaflow.core.progress import meter
from sisaflow.data.corpus import Record, content_hash
from sisaflow.data.sharding import read_shard_manifest, read_slice, slice_digests
from sisaflow.models.scratch import build_model
from sisaflow.models.tokenizer import load_tokenizer
from sisaflow.training.checkpoint import (
    CheckpointMeta,
    describe_environment,
    load_training_state,
    read_meta,
    save_checkpoint,
)
from sisaflow.training.lineage import chain_hashes, first_stale_slice

log = logging.getLogger("sisaflow.training.loop")


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the base seed and a purpose (shard, slice, epoch ...)."""
    h = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


@dataclass
class SliceReport:
    slice: int
    examples: int
    tokens: int
    steps: int
    seconds: float
    loss: float | None


@dataclass
class ShardTrainReport:
    shard: int
    start_slice: int
    """The first slice trained (== slices when nothing was stale)."""
    slices: list[SliceReport] = field(default_factory=list)
    device: str = "cpu"
    environments: list[dict[str, str]] = field(default_factory=list)
    """The environments that trained the shard's last checkpoint (its meta's); empty when nothing trained."""

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.slices)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.slices)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens"], d["seconds"] = self.tokens, self.seconds
        return d


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _batches(examples: list[list[int]], batch_size: int, eos_id: int, device: torch.device):
    """(input ids, labels, attention mask, real tokens) per batch, right-padded to the batch's longest record.

    Built on the CPU and copied without blocking, so a GPU never waits on the host between steps."""
    cuda = device.type == "cuda"
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        width = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), width), eos_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):
            ids[row, : len(e)] = torch.tensor(e)
            labels[row, : len(e)] = torch.tensor(e)
            mask[row, : len(e)] = 1
        if cuda:
            ids, labels, mask = (t.pin_memory().to(device, non_blocking=True) for t in (ids, labels, mask))
        yield ids, labels, mask, sum(len(e) for e in chunk)


def _tokenizer(mp: ModelParams):
    return load_tokenizer(mp.tokenizer, mp.base)


def _encode(records: list[Record], model_params: ModelParams) -> list[list[int]]:
    tok = _tokenizer(model_params)
    # a function of the records present only; the plain hash, so the order (and the weights) do not depend on the
    # workspace's hash key (core.hashing): two workspaces of the same records train the same models
    ordered = sorted(records, key=lambda r: content_hash(r.record_id, r.text))
    return [(tok.encode(r.text) + [tok.eos_id])[: model_params.context_length] for r in ordered]


def train_shard(
    ws: Workspace,
    shard: int,
    params: Params,
    progress: Callable[[str], None] | None = None,
) -> ShardTrainReport:
    """Bring shard `shard`'s checkpoints up to date with its slice files; train only from the first stale slice.

    Resumable: a crash leaves complete checkpoints only, and the next call continues after the last one.
    """
    say = progress or log.info
    tp, mp = params.train, params.model
    manifest = read_shard_manifest(ws, shard)
    digests = slice_digests(manifest)
    chain = chain_hashes(params.training_identity(), digests)
    start = first_stale_slice(ws, shard, chain)
    device = resolve_device(tp.device)
    report = ShardTrainReport(shard=shard, start_slice=start, device=str(device))
    env = numerics_environment(device, mp.base is not None)
    if start == len(chain):
        say(f"shard {shard}: up to date ({len(chain)} slices), nothing to train")
        return report
    if mp.base is not None:
        from sisaflow.models.pretrained import check_base

        check_base(mp)  # a bad base or LoRA setting fails here, before a checkpoint is removed or written

    for k in range(start, params.sharding.slices + 64):
        stale = ws.checkpoint_dir(shard, k)
        if stale.exists():
            shutil.rmtree(stale)
    for leftover in ws.model_dir(shard).glob(".slice-*"):
        shutil.rmtree(leftover, ignore_errors=True)

    with _process_settings(tp, device, say):
        model = _build_constituent(mp, derive_seed(tp.seed, "init", shard), device)
        optimizer = _optimizer(model, tp.learning_rate, tp.weight_decay, device)
        forward = _forward_fn(model, tp.compile, device)  # once per shard: compiling is not free
        meta = CheckpointMeta(shard, -1, params.training_identity(), 0, 0, 0, None, [env])
        if start > 0:
            prev_dir = ws.checkpoint_dir(shard, start - 1)
            load_training_state(prev_dir, model, optimizer)
            resumed = read_meta(prev_dir)
            if resumed is None:  # first_stale_slice only returns k when checkpoint k-1 is complete
                raise RuntimeError(f"{prev_dir}: checkpoint vanished while resuming")
            meta = resumed
            say(f"shard {shard}: resuming from the checkpoint after slice {start - 1}")
            if resumed.environments[-1:] != [env]:
                meta = replace(resumed, environments=[*resumed.environments, env])
                before = describe_environment(resumed.environments[-1]) if resumed.environments else "unknown"
                say(
                    f"shard {shard}: note: the checkpoint after slice {start - 1} was made under {before}; this "
                    f"process runs {describe_environment(env)}. Training is bit for bit repeatable within one "
                    "environment, so the result will not be the bits that training from scratch gives under "
                    f"either (verify --exact says DIFFERENT). Remove {ws.model_dir(shard)} and run again to "
                    "retrain the shard from its first slice here"
                )
        with meter(f"shard {shard}", planned_steps(manifest, start, tp), "step") as steps:
            for k in range(start, len(chain)):
                rep, meta = _train_slice(
                    ws, shard, k, chain[k], params, model, optimizer, meta, device, say, forward, steps
                )
                report.slices.append(rep)
    report.environments = meta.environments
    return report


def planned_steps(manifest: dict, start: int, tp: TrainParams) -> int:
    """The optimizer steps that training a shard from slice `start` takes, from its manifest's slice sizes."""
    sizes = [s["records"] for s in sorted(manifest["slices"], key=lambda s: s["slice"])]
    total = 0
    for k in range(start, len(sizes)):
        examples = sum(sizes[: k + 1]) if tp.schedule == "cumulative" else sizes[k]
        total += math.ceil(examples / tp.batch_size) * tp.epochs_per_slice
    return total


def numerics_environment(device: torch.device, lora: bool) -> dict[str, str]:
    """What besides settings and data decides a checkpoint's bits: the versions of the libraries that compute it
    and the kind of processor their kernels were chosen for (the CPU's instruction set, or the GPU's name)."""
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__}
    if lora:
        import peft

        env["peft"] = peft.__version__
    if device.type == "cuda":
        env["device"] = f"cuda {torch.cuda.get_device_name(device)}"
    else:
        env["device"] = f"cpu {torch.backends.cpu.get_cpu_capability()}"
    return env


CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")
"""The values of CUBLAS_WORKSPACE_CONFIG under which cuBLAS's matmuls are deterministic (NVIDIA's docs)."""


@contextlib.contextmanager
def _process_settings(tp: TrainParams, device: torch.device, say: Callable[[str], None]):
    """The process-wide settings training needs, put back afterwards, so that a caller's own work (a benchmark's
    loop, inference) runs as it would have without train_shard."""
    threads = torch.get_num_threads()
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    torch.set_num_threads(tp.threads)
    strict = False
    if device.type == "cuda":
        # deterministic mode also fills every new tensor with NaN, a guard against reading uninitialised memory
        # (no op here does); on a GPU that is a kernel per allocation, so it is off there
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
        # warn-only mode leaves the attention kernels' backward (flash, memory-efficient, cuDNN) on their
        # non-deterministic algorithms: only the strict mode picks the deterministic ones (measured on an H200:
        # two warn-only runs gave different weights); strict needs cuBLAS's fixed workspace
        strict = tp.deterministic and _deterministic_cublas(say)
    torch.use_deterministic_algorithms(tp.deterministic, warn_only=not strict)
    padding = contextlib.nullcontext()
    if strict and _compiles(tp.compile, device):
        import torch._inductor.config as inductor_config

        # deterministic algorithms also put inductor in its deterministic mode, which skips the on-device
        # benchmark that decides whether to pad a misaligned matmul, so it never pads (torch 2.11): the output
        # projection over GPT-2's 50,257 tokens then runs misaligned. Always padding is a fixed choice, so
        # just as deterministic (compiled, an H200 ran the library at 0.81x the bare loop without it)
        padding = inductor_config.patch(force_shape_pad=True)
    try:
        with padding:
            yield
    except RuntimeError as exc:
        if strict and "deterministic" in str(exc):
            raise RuntimeError(
                f"{exc}\ntrain.deterministic asks torch for deterministic algorithms on CUDA, and this operation "
                "has none: set train.deterministic: false in params.yaml to train anyway (a GPU run then does not "
                "repeat bit for bit, and the training identity changes)"
            ) from exc
        raise
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]


def _deterministic_cublas(say: Callable[[str], None]) -> bool:
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG when this process first multiplies on the GPU: set it before then (a
    Ray worker trains first thing), or say that the user must export it. True when cuBLAS is deterministic."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") in CUBLAS_DETERMINISTIC:
        return True
    if torch.cuda.is_initialized():
        say(
            f"CUDA was in use in this process before training, with CUBLAS_WORKSPACE_CONFIG not one of "
            f"{', '.join(CUBLAS_DETERMINISTIC)}: cuBLAS may not be deterministic; export "
            f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_DETERMINISTIC[0]} before starting, or set train.deterministic false"
        )
        return False
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC[0]
    return True


def _build_constituent(mp: ModelParams, seed: int, device: torch.device) -> torch.nn.Module:
    """A fresh constituent whose trainable weights depend only on `seed`: from scratch, or an adapter."""
    if mp.base is not None:
        from sisaflow.models.lora import build_lora_model

        return build_lora_model(mp, seed, device)
    tok = _tokenizer(mp)
    model = build_model(mp, tok.vocab_size, tok.eos_id, seed)
    model.to(device)  # type: ignore[arg-type]  # in place; transformers types .to oddly
    return model


def _optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    # only what trains (all of a from-scratch model, the adapter of a LoRA one); the order is the model's, so
    # a checkpoint's optimizer state lines up with the parameters when resumed
    trainable = [p for p in model.parameters() if p.requires_grad]
    if device.type == "cuda":
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, fused=True)
    # the single-tensor CPU path, as every existing checkpoint was trained with it
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, foreach=False)


COMPILE_BACKEND: Any = "inductor"
"""torch.compile's backend for train.compile (tests swap in a counting one)."""


def _compiles(compile_: bool, device: torch.device) -> bool:
    return compile_ and device.type == "cuda"  # CPU stays eager: it is the exact reference


def _forward_fn(model: torch.nn.Module, compile_: bool, device: torch.device):
    """What computes the loss: the model, or on CUDA with train.compile its torch.compile'd forward.

    Compilation is paid once per process and architecture, not per shard or slice: dynamo caches the compiled
    code on the forward's code object and guards on shapes and dtypes, not on which model instance (a later
    shard's fresh model reuses it; tests/unit/inference/test_gpu_path.py counts the compilations). The first batch width
    compiles a static graph and a second width one dynamic graph for all the rest. Across processes (one Ray
    worker per shard) inductor's on-disk caches make the recompilation a warm one. The compiled wrapper shares
    the model's parameters, so checkpoints still save `model` itself."""
    if _compiles(compile_, device):
        return torch.compile(model, backend=COMPILE_BACKEND)
    return model


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_slice(
    ws, shard, k, chain_k, params, model, optimizer, meta, device, say, forward=None, steps=None
):
    tp, mp = params.train, params.model
    forward = model if forward is None else forward  # not `or`: a compiled module has no truth value
    slice_records = read_slice(ws, shard, k)
    if tp.schedule == "cumulative":
        records = [r for j in range(k + 1) for r in (slice_records if j == k else read_slice(ws, shard, j))]
    else:
        records = slice_records
    examples = _encode(records, mp)
    eos = _tokenizer(mp).eos_id
    t0 = time.perf_counter()
    step, tokens, last_loss, n_steps = meta.global_step, 0, meta.last_loss, 0
    model.train()
    for epoch in range(tp.epochs_per_slice):
        torch.manual_seed(derive_seed(tp.seed, "train", shard, k, epoch))
        order = torch.randperm(len(examples)).tolist() if examples else []
        shuffled = [examples[i] for i in order]
        total = math.ceil(len(shuffled) / tp.batch_size)
        window: list[torch.Tensor] = []  # losses stay on the device: reading one every step would stall a GPU
        for b, (ids, labels, mask, n_tokens) in enumerate(_batches(shuffled, tp.batch_size, eos, device), 1):
            lr = (
                tp.learning_rate * min(1.0, (step + 1) / tp.warmup_steps)
                if tp.warmup_steps
                else tp.learning_rate
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(device):
                loss = forward(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tp.grad_clip:
                # frozen base weights have no gradient and do not count, so this is the adapter's norm
                torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
            optimizer.step()
            step += 1
            n_steps += 1
            tokens += n_tokens
            if steps is not None:
                steps.advance()
            window.append(loss.detach())
            if b % tp.log_every == 0 or b == total:
                losses = torch.stack(window).float().tolist()  # one host sync per log line
                last_loss = losses[-1]
                say(
                    f"shard {shard} slice {k + 1}/{params.sharding.slices} epoch {epoch + 1}/{tp.epochs_per_slice} "
                    f"step {b}/{total} loss {sum(losses) / len(losses):.3f}"
                )
                window = []
    seconds = time.perf_counter() - t0
    new_meta = CheckpointMeta(
        shard,
        k,
        chain_k,
        step,
        meta.tokens_seen + tokens,
        meta.examples_seen + len(examples) * tp.epochs_per_slice,
        last_loss,
        meta.environments,  # train_shard's entry for this process is the last one
    )
    save_checkpoint(
        ws.checkpoint_dir(shard, k), model, optimizer, new_meta, [r.content_hash for r in slice_records]
    )
    say(
        f"shard {shard} slice {k + 1}/{params.sharding.slices}: {len(examples)} records, {tokens} tokens, "
        f"{seconds:.1f}s, checkpoint written"
    )
    return SliceReport(k, len(examples), tokens, n_steps, seconds, last_loss), new_meta
