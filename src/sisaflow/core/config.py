"""params.yaml, loaded once into typed, frozen dataclasses that validate themselves.

Each section is one dataclass; components receive the section they need, never the whole config.
An invalid value fails with a message naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from sisaflow.core.config_parse import build, check_choice, check_positive
from sisaflow.core.errors import ConfigError
from sisaflow.core.fsio import sha256_bytes


@dataclass(frozen=True)
class CorpusParams:
    """Where the corpus comes from and how a record is read from it."""

    path: str = "data/tofu/records.jsonl"
    """Source file, relative to the workspace or absolute."""
    format: Literal["jsonl", "parquet", "csv", "txt"] = "jsonl"
    id_field: str | None = "id"
    """Field holding a stable record id; null derives each record's id from its text ('sha-' and 16 hex digits
    of its text hash, '-2', '-3' ... for repeats), never from its position."""
    owner_field: str | None = "author_id"
    """Field naming who can ask for removal; null makes each record its own owner."""
    text_field: str | None = None
    text_template: str | None = "Question: {question}\nAnswer: {answer}"
    """Python format string over the record's fields; used when text_field is null."""
    label_field: str | None = None
    """A classification corpus: the field holding each record's class. text_template must end with it (e.g.
    "Message: {text}\nClass: {label}"), so each constituent learns the class as the text's continuation and
    the ensemble classifies by the likelihood of each class after the rest (`sisaflow classify`)."""
    labels: list[str] | None = None
    """The classes, fixed here: never taken from the data, which deletions change."""
    skip_invalid: bool = False
    """An empty or malformed record: refuse the whole corpus (false), or import the valid records and report
    the others by file and line, never their text, in the run report and `sisaflow status` (true)."""
    hash_key: str | None = None
    """The id ("hk-...") of the secret key the records' content and text hashes are keyed with (the key itself is
    in .sisaflow/keys/hash-key, never in git or DVC); null: plain sha256, as workspaces made before keys."""

    def __post_init__(self) -> None:
        check_choice("corpus.format", self.format, ("jsonl", "parquet", "csv", "txt"))
        if not self.path:
            raise ConfigError("params: corpus.path is empty; give the corpus file")
        if (self.text_field is None) == (self.text_template is None) and self.format != "txt":
            raise ConfigError("params: set exactly one of corpus.text_field and corpus.text_template")
        if self.label_field is None and self.labels is None:
            return
        if not self.label_field or not self.labels:
            raise ConfigError(
                "params: corpus.label_field and corpus.labels go together: the field holding each record's class, "
                "and the list of classes"
            )
        if len(set(self.labels)) != len(self.labels) or not all(c.strip() for c in self.labels):
            raise ConfigError(
                f"params: corpus.labels = {self.labels!r}: the classes must be distinct and non-empty"
            )
        slot = "{" + self.label_field + "}"
        if self.format == "txt" or not self.text_template or not self.text_template.endswith(slot):
            raise ConfigError(
                f"params: corpus.label_field {self.label_field!r} needs a corpus.text_template that ends with {slot} "
                "(e.g. 'Message: {text}\\nClass: "
                + slot
                + "'): the class is what follows the rest of the text"
            )
        if self.text_template.count(slot) != 1 or not self.prompt_template:
            raise ConfigError(
                f"params: corpus.text_template must hold {slot} once, at its end, after some text to classify"
            )

    @property
    def prompt_template(self) -> str:
        """text_template up to the class: what a constituent reads before the class (classification only)."""
        return (
            (self.text_template or "")[: -len("{" + (self.label_field or "") + "}")]
            if self.label_field
            else ""
        )


@dataclass(frozen=True)
class ShardingParams:
    """How many shards (constituents) and slices (checkpoints per shard)."""

    shards: int = 4
    slices: int = 4

    def __post_init__(self) -> None:
        check_positive("sharding.shards", self.shards)
        check_positive("sharding.slices", self.slices)
        if self.shards > 256:
            raise ConfigError(f"params: sharding.shards = {self.shards} is not allowed; it must be 1..256")

    @property
    def shard_ids(self) -> list[int]:
        return list(range(self.shards))


@dataclass(frozen=True)
class LoraParams:
    """LoRA adapters over a frozen pretrained base (used only when model.base is set)."""

    r: int = 8
    """Rank of each adapter."""
    alpha: float = 16.0
    """Scaling numerator: an adapter adds (alpha / r) * B A x."""
    dropout: float = 0.0
    """Dropout on the adapter input. Seeded like every other random choice, so any value keeps CPU retraining
    bitwise exact; 0 (the default) also keeps the batched ensemble free of train/eval differences."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Names of the base's linear layers that get an adapter (e.g. q_proj k_proj v_proj o_proj gate_proj)."""

    def __post_init__(self) -> None:
        check_positive("model.lora.r", self.r)
        check_positive("model.lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(
                f"params: model.lora.dropout = {self.dropout!r} is not allowed; it must be >= 0 and < 1"
            )
        if (
            not isinstance(self.target_modules, list)
            or not self.target_modules
            or not all(isinstance(t, str) and t for t in self.target_modules)
        ):
            raise ConfigError(
                f"params: model.lora.target_modules = {self.target_modules!r} is not allowed; it must be a "
                "non-empty list of layer names, e.g. [q_proj, v_proj]"
            )


# settings that shape a from-scratch model; with a pretrained base, the base's own config decides them
ARCHITECTURE_KEYS = ("hidden_size", "layers", "heads", "intermediate_size", "tie_embeddings")


@dataclass(frozen=True)
class ModelParams:
    """The constituent: a small Llama-style causal LM built from scratch (model.base null), or LoRA adapters over
    a frozen pretrained base (model.base a path); and its tokenizer."""

    tokenizer: Literal["gpt2", "byte", "base"] = "byte"
    """byte | gpt2 (fixed vocabularies, from scratch only) | base (the base model's own; needs model.base)."""
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 384
    context_length: int = 512
    """Longest record in tokens (longer ones are cut); with a base, at most its max_position_embeddings."""
    tie_embeddings: bool = True
    base: str | None = None
    """null: train from scratch. Otherwise a pretrained causal LM (transformers directory, GGUF file, or
    package:NAME), relative to the workspace or absolute; only LoRA adapters are trained over it."""
    lora: LoraParams = field(default_factory=LoraParams)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # as read back from registry/ensemble.json
            object.__setattr__(self, "lora", LoraParams(**self.lora))
        check_choice("model.tokenizer", self.tokenizer, ("gpt2", "byte", "base"))
        for key in ("hidden_size", "layers", "heads", "intermediate_size", "context_length"):
            check_positive(f"model.{key}", getattr(self, key))
        if self.hidden_size % self.heads:
            raise ConfigError(
                f"params: model.hidden_size = {self.hidden_size} must be divisible by model.heads = {self.heads}"
            )
        if self.base is not None and not self.base.strip():
            raise ConfigError("params: model.base is empty; give the pretrained model's path, or null")
        if self.base is not None and self.tokenizer != "base":
            raise ConfigError(
                f"params: model.tokenizer = {self.tokenizer!r} cannot be used with model.base: the base's "
                "embeddings index its own vocabulary; set model.tokenizer: base"
            )
        if self.base is None and self.tokenizer == "base":
            raise ConfigError(
                "params: model.tokenizer = 'base' needs model.base (a pretrained model); set model.base, or "
                "choose byte or gpt2"
            )

    def identity(self) -> dict[str, Any]:
        """What of the model section decides a constituent's weights (the base by content, not by path)."""
        ident = dataclasses.asdict(self)
        base = ident.pop("base")
        lora = ident.pop("lora")
        if base is None:
            return ident  # unchanged from before LoRA existed, so from-scratch checkpoints stay current
        from sisaflow.core.base_files import base_identity

        for key in ARCHITECTURE_KEYS:
            ident.pop(key)
        return {**ident, "base": base_identity(base), "lora": lora}


@dataclass(frozen=True)
class TrainParams:
    """How each constituent trains, slice by slice. Everything here is part of a checkpoint's identity."""

    seed: int = 0
    schedule: Literal["incremental", "cumulative"] = "incremental"
    """incremental: slice k trains on slice k only; cumulative (SISA): on slices 0..k."""
    epochs_per_slice: int = 3
    batch_size: int = 8
    learning_rate: float = 1.5e-3
    warmup_steps: int = 20
    """Linear warm-up over the first steps of the shard; then constant (no schedule sized from the data)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    threads: int = 1
    """CPU threads per shard training; fixed because float reductions can depend on it."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """On CUDA: bf16 autocast and a fused AdamW; CPU is the exact reference."""
    compile: bool = False
    """torch.compile the model's forward when training on CUDA (ignored on CPU, which stays eager and exact)."""
    deterministic: bool = True
    """Deterministic algorithms (on CUDA also cuBLAS's fixed workspace, CUBLAS_WORKSPACE_CONFIG); false trades
    a GPU run's repeatability for speed. CPU exactness is tested with it on."""
    log_every: int = 10

    def __post_init__(self) -> None:
        check_choice("train.schedule", self.schedule, ("incremental", "cumulative"))
        check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        for key in ("epochs_per_slice", "batch_size", "learning_rate", "threads", "log_every"):
            check_positive(f"train.{key}", getattr(self, key))
        for key in ("warmup_steps", "weight_decay", "grad_clip"):
            check_positive(f"train.{key}", getattr(self, key), zero_ok=True)


ClassifyRule = Literal["mean", "vote"]
CLASSIFY_RULES: tuple[str, ...] = get_args(ClassifyRule)
"""How a classification corpus's constituents decide (ensemble.classify, `sisaflow classify --rule`)."""


COMBINES: tuple[str, ...] = ("mixture", "posterior", "product", "merge")
"""How an ensemble combines its constituents (ensemble.combine)."""


@dataclass(frozen=True)
class PosteriorParams:
    """The posterior combination's settings (ensemble.combine: posterior; see sisaflow.inference.combine).

    Constituent k's weight before token t is proportional to pi_k exp(beta * sum_{i<t} log p_k(x_i | x_<i)) over
    the real tokens so far (the prompt and what was generated), then mixed with a uniform floor:
    w <- (1 - floor) w + floor / S. beta 1 and floor 0 give the mixture of the constituents' whole-sequence
    probabilities, exactly."""

    beta: float = 1.0
    """How sharply the context decides (0 would be the uniform mixture)."""
    floor: float = 0.0
    """Share of uniform weight under the posterior, in [0, 1): lets a change of topic mid-answer recover."""
    top_k: int | None = None
    """Keep only the k constituents with the highest weight once the prompt is read (and, in a forward over a
    whole text, at each position); null: all of them."""

    def __post_init__(self) -> None:
        check_positive("ensemble.posterior.beta", self.beta)
        if not 0 <= self.floor < 1:
            raise ConfigError(
                f"params: ensemble.posterior.floor = {self.floor!r} is not allowed; it must be >= 0 and < 1"
            )
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(
                f"params: ensemble.posterior.top_k = {self.top_k!r} is not allowed; it must be null (every "
                "constituent) or an integer from 1 to sharding.shards"
            )


@dataclass(frozen=True)
class EnsembleParams:
    """How constituents' next-token distributions are combined."""

    weights: Literal["uniform", "size"] = "uniform"
    combine: Literal["mixture", "posterior", "product", "merge"] = "mixture"
    """mixture: the weighted mean of the constituents' next-token probabilities; posterior: the same mean with
    each constituent weighted by how well it predicted the context so far (`posterior` below); product: of their
    log-probabilities, renormalised; merge (LoRA constituents only): one model, the base plus the weighted mean
    of the adapters' weight deltas (alpha/r) B A. Each is a fixed function of the exact constituents (and the
    context), so it stays exact after a forget; a merge costs one model at inference."""
    posterior: PosteriorParams = field(default_factory=PosteriorParams)
    """With combine: posterior only."""
    batched: bool = True
    """Evaluate all constituents in one batched computation per step (stacked weights, or batched LoRA) where
    they allow it; false: a Python loop over the constituents. Same numbers within float rounding."""
    cuda_graphs: bool = True
    """On a CUDA device, generate with the stacked ensemble's decode step captured once as a CUDA graph and
    replayed per token (`sisaflow.inference.graphed`); false: launch every step's kernels from Python. Ignored
    elsewhere, and for runners that are not stacked (the loop, BatchedLora)."""
    compile_decode: bool = False
    """With cuda_graphs: compile the decode step with torch.compile before capturing it (inductor fuses its
    elementwise work into fewer kernels per replay), at a compilation per captured shape on first use (tens of
    seconds for a 30-layer model). bench/graph_generate.py measures both."""
    classify: ClassifyRule = "mean"
    """A classification corpus: the mean of the constituents' class probabilities, or a vote of their most
    likely classes (`sisaflow classify`)."""

    def __post_init__(self) -> None:
        check_choice("ensemble.weights", self.weights, ("uniform", "size"))
        check_choice("ensemble.combine", self.combine, COMBINES)
        if self.combine != "posterior" and self.posterior != PosteriorParams():
            changed = [
                f.name
                for f in dataclasses.fields(PosteriorParams)
                if getattr(self.posterior, f.name) != getattr(PosteriorParams(), f.name)
            ]
            raise ConfigError(
                f"params: ensemble.posterior.{changed[0]} is set but ensemble.combine = {self.combine!r} does not "
                "route by the context; set ensemble.combine: posterior, or remove ensemble.posterior"
            )
        check_choice("ensemble.classify", self.classify, CLASSIFY_RULES)


@dataclass(frozen=True)
class RayParams:
    """Where shard trainings run. Not part of any result: changing it never retrains."""

    address: str = ""
    """Empty: start a local Ray; otherwise a cluster address (e.g. 127.0.0.1:6379 or auto)."""
    num_cpus_per_shard: float = 1
    num_gpus_per_shard: float = 1
    """Used only when the cluster has GPUs; a fraction shares a GPU between shards."""
    object_store_memory_mb: int = 256
    max_parallel: int = 0
    """0: as many shards at once as resources allow."""

    def __post_init__(self) -> None:
        check_positive("ray.num_cpus_per_shard", self.num_cpus_per_shard)
        check_positive("ray.num_gpus_per_shard", self.num_gpus_per_shard, zero_ok=True)
        check_positive("ray.object_store_memory_mb", self.object_store_memory_mb)
        check_positive("ray.max_parallel", self.max_parallel, zero_ok=True)


@dataclass(frozen=True)
class UnlearnParams:
    """What happens between a deletion request and the retrained ensemble."""

    mode: Literal["exclude", "wait"] = "exclude"
    """exclude: stop serving every constituent trained on a requested record at once, until it is retrained;
    wait: keep serving the old ensemble until the retrained one is promoted."""
    unknown: Literal["error", "warn"] = "error"
    """An owner or record not in the corpus: refuse the whole request (error) or drop it with a warning."""

    def __post_init__(self) -> None:
        check_choice("unlearn.mode", self.mode, ("exclude", "wait"))
        check_choice("unlearn.unknown", self.unknown, ("error", "warn"))


@dataclass(frozen=True)
class DvcParams:
    """The DVC remote that `dvc push` sends shards and checkpoints to."""

    remote: str = ".dvc-remote"
    """A directory (relative to the workspace or absolute) or any URL DVC understands."""


@dataclass(frozen=True)
class EvaluateParams:
    """`sisaflow evaluate`: utility and forgetting metrics. Nothing here changes what is trained."""

    holdout: str | None = None
    """Never-seen records (same format and fields as the corpus), e.g. TOFU's holdout authors: the
    non-members of the membership attacks and the unseen-data perplexity. Without it those are left out."""
    tofu_perturbed: str | None = None
    """A TOFU `*_perturbed.json` file: switches on truth ratio and forget quality for the questions it has."""
    max_records: int = 200
    """Records scored per group (retained, never-seen, forgotten); a deterministic sample by content hash."""
    min_k: float = 0.2
    """The k of the Min-K% and Min-K%++ attacks (fraction of lowest-scoring tokens)."""
    bootstrap: int = 1000
    """Bootstrap resamples for the AUC confidence intervals (95%)."""
    seed: int = 0
    rouge_records: int = 20
    """Records whose continuation is generated for the verbatim-memorisation ROUGE-L."""
    rouge_new_tokens: int = 48
    baseline: bool = True
    """Also train one monolithic model on all current data with the same total compute (in a temporary
    directory, removed afterwards) and report its utility beside the ensemble's."""
    before_after: bool = True
    """Forget runs record, before retraining, the forgotten records' metrics (aggregates only) so evaluate
    can show them before and after the deletion."""

    def __post_init__(self) -> None:
        for key in ("max_records", "bootstrap", "rouge_new_tokens"):
            check_positive(f"evaluate.{key}", getattr(self, key))
        check_positive("evaluate.rouge_records", self.rouge_records, zero_ok=True)
        if not 0 < self.min_k <= 1:
            raise ConfigError(f"params: evaluate.min_k = {self.min_k} must be in (0, 1]")


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml."""

    corpus: CorpusParams = field(default_factory=CorpusParams)
    sharding: ShardingParams = field(default_factory=ShardingParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    ensemble: EnsembleParams = field(default_factory=EnsembleParams)
    ray: RayParams = field(default_factory=RayParams)
    unlearn: UnlearnParams = field(default_factory=UnlearnParams)
    dvc: DvcParams = field(default_factory=DvcParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)

    def __post_init__(self) -> None:
        top_k = self.ensemble.posterior.top_k
        if top_k is not None and top_k > self.sharding.shards:
            raise ConfigError(
                f"params: ensemble.posterior.top_k = {top_k} is not allowed; it must be null (every constituent) "
                f"or an integer from 1 to sharding.shards ({self.sharding.shards})"
            )
        if self.ensemble.combine == "merge" and self.model.base is None:
            raise ConfigError(
                "params: ensemble.combine = 'merge' needs LoRA constituents (model.base set): it averages adapters' "
                "weight deltas over one base; choose mixture or product for models trained from scratch"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "params") -> Params:
        """Build and validate from a plain dict (as read from YAML)."""
        return build(cls, raw or {}, source)

    @classmethod
    def load(cls, path: Path) -> Params:
        """Read params.yaml; a missing file or invalid YAML is a ConfigError naming the file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: not found; run `sisaflow init` to create a workspace")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        return cls.from_dict(raw or {}, str(path)).resolved(path.resolve().parent)

    def resolved(self, root: Path) -> Params:
        """These params with a relative model.base made absolute against `root` (the workspace), so that Ray
        workers and the temporary workspace of `verify --exact` find the same base."""
        base = self.model.base
        if base is None or base.startswith("package:") or Path(base).expanduser().is_absolute():
            return self
        model = dataclasses.replace(self.model, base=str((Path(root) / base).resolve()))
        return dataclasses.replace(self, model=model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_identity(self) -> str:
        """A hash of everything that decides a constituent's weights apart from its data."""
        ident = {"model": self.model.identity(), "train": dataclasses.asdict(self.train)}
        ident["train"].pop("log_every")
        if not self.train.compile:
            ident["train"].pop("compile")  # keeps the identity of workspaces made before the switch existed
        if self.train.deterministic:
            ident["train"].pop("deterministic")  # the same: workspaces made before it keep their checkpoints
        return sha256_bytes(json.dumps(ident, sort_keys=True).encode())
