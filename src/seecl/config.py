"""Typed run configuration: dataclasses with a doc per field, YAML loading, `a.b=value` overrides.

Owns the schema and its validation. Does not know what the values are used for: each component
reads its own section. Every run writes its resolved config next to its outputs (`save_config`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from seecl.errors import ConfigError


def doc(text: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A dataclass field carrying its documentation (shown by `seecl config`)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": text}, **kwargs)
    return field(default=default, metadata={"doc": text}, **kwargs)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


IndicatorKind = Literal["added", "nonsemantic", "semantic"]


@dataclass
class ModelConfig:
    name: str = doc(
        "Base model: 'smollm2-135m-instruct' (offline default, from PyPI), 'tiny-random' (tests), "
        "a local model directory, a .gguf file, or a hub id already in the local HF cache.",
        "smollm2-135m-instruct",
    )
    indicator: IndicatorKind = doc(
        "Indicator tokens: 'added' (<<pos>>/<<neg>> special tokens), 'nonsemantic' («pos»/«neg» "
        "in-vocabulary strings) or 'semantic' (Yes/No).",
        "added",
    )
    indicator_rows: Literal["per_expert", "shared"] = doc(
        "Added indicator tokens' embedding rows: 'per_expert' (every expert trains its own copy) or "
        "'shared' (the first expert trains them, then the whole ensemble shares them and every "
        "expert is a plain LoRA adapter, servable by vLLM). Fixed when the ensemble is created.",
        "per_expert",
    )
    system_prompt: str | None = doc(
        "System message for every prompt; null keeps the chat template's own default.", None
    )
    device: str = doc("'auto' (cuda if available, else cpu), 'cpu' or 'cuda[:n]'.", "auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "Weights dtype; 'auto' is float32 on CPU (bf16 matmul is far slower there) and bf16 on GPU.",
        "auto",
    )

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name must not be empty")


@dataclass
class AdapterConfig:
    kind: Literal["lora", "alora"] = doc(
        "'lora', or 'alora' (activated LoRA: acts only from the assistant-turn header on).", "lora"
    )
    r: int = doc("LoRA rank.", 8)
    alpha: int = doc("LoRA alpha (scaling = alpha / r).", 16)
    dropout: float = doc("LoRA dropout.", 0.1)
    targets: list[str] = doc("Module names that get LoRA weights.", ["q_proj", "v_proj"])
    train_indicator_rows: bool = doc(
        "Train the indicator tokens' embedding (and tied output) rows in every expert.", True
    )

    def __post_init__(self) -> None:
        _check(self.r > 0, f"adapter.r must be positive, got {self.r}")
        _check(self.alpha > 0, f"adapter.alpha must be positive, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"adapter.dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.targets) > 0, "adapter.targets must name at least one module")


@dataclass
class TrainConfig:
    epochs: int = doc("Passes over the stage's training data.", 4)
    lr: float = doc("Peak learning rate (AdamW).", 5e-4)
    indicator_lr_scale: float = doc(
        "Learning-rate multiplier for the indicator token rows: at a LoRA learning rate they barely "
        "move from their initialisation and the expert never emits an indicator.",
        20.0,
    )
    batch_size: int = doc("Global batch size in examples (micro-batches x accumulation x devices).", 4)
    micro_batch_size: int = doc("Examples per forward pass on one device.", 4)
    schedule: Literal["cosine", "linear", "constant"] = doc("Learning-rate schedule after warm-up.", "cosine")
    warmup_ratio: float = doc("Share of optimizer steps spent warming up linearly.", 0.0)
    weight_decay: float = doc("AdamW weight decay.", 0.0)
    max_grad_norm: float = doc("Gradient clipping norm; 0 disables clipping.", 1.0)
    max_length: int = doc("Longest example in tokens; longer prompts are cut from the left.", 1024)
    batching: Literal["stratified", "random", "length"] = doc(
        "Batch order: 'stratified' mixes positives and negatives in every batch and groups by length "
        "inside that constraint; 'random' shuffles; 'length' groups by length only (can segregate "
        "negatives, kept for ablations).",
        "stratified",
    )
    share_prefix_tokens: int = doc(
        "Rows of a micro-batch whose prompts share a loss-free head of at least this many tokens "
        "(a task definition) compute it once and continue from its KV cache; 0 disables. LoRA "
        "dropout on a shared head is drawn once for its rows.",
        16,
    )
    seed: int = doc("Seed for adapter init, dropout and data order.", 0)
    checkpoint_every: int = doc("Save a resumable checkpoint every N optimizer steps; 0 disables.", 0)
    mixed_precision: Literal["no", "bf16", "fp16"] = doc(
        "Autocast precision on devices that support it; CPU runs always use fp32.", "no"
    )
    progress: bool = doc("Show a progress bar with the running loss.", True)

    def __post_init__(self) -> None:
        _check(self.epochs > 0, f"train.epochs must be positive, got {self.epochs}")
        _check(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        _check(self.indicator_lr_scale > 0, "train.indicator_lr_scale must be positive")
        _check(self.batch_size > 0 and self.micro_batch_size > 0, "train batch sizes must be positive")
        _check(
            self.batch_size % self.micro_batch_size == 0,
            f"train.batch_size ({self.batch_size}) must be a multiple of train.micro_batch_size "
            f"({self.micro_batch_size})",
        )
        _check(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio must be in [0, 1)")
        _check(self.max_length > 8, "train.max_length is too small")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every must be >= 0")
        _check(self.share_prefix_tokens >= 0, "train.share_prefix_tokens must be >= 0")


@dataclass
class SeeConfig:
    tau: float = doc("Rehearsal ratio: negatives per earlier task = round(tau * |D_j|).", 0.1)
    memory_tau: float = doc(
        "Share of each task's queries kept in the ensemble's query memory (largest usable tau).", 0.2
    )
    seed: int = doc("Seed for the query memory and the negative sampling.", 0)
    negatives: Literal["earlier", "pseudo"] = doc(
        "'earlier' tasks' queries (the method) or 'pseudo' negatives from general_negatives_file instead (ablation).",
        "earlier",
    )
    general_negatives_file: str | None = doc(
        "Instruction file (any supported format; responses optional) for general or pseudo negatives; "
        "null: the 600 general instructions that ship with seecl (data/general_instructions.jsonl).",
        None,
    )
    general_negatives: int = doc(
        "Negatives per expert drawn from the general instructions, so that no expert claims queries that "
        "belong to no task (0 = the paper's recipe, none).",
        10,
    )
    threshold: float | None = doc(
        "Claim a query only if P(pos) / (P(pos) + P(neg)) >= threshold; null = greedy indicator.", None
    )
    calibrate: bool = doc(
        "Per-expert thresholds calibrated on each expert's own stored queries (overrides threshold): "
        "the calibration_quantile of their log-odds log(P(pos)/P(neg)), minus calibration_margin.",
        True,
    )
    calibration_quantile: float = doc("Quantile of the own-query log-odds the threshold starts from.", 0.05)
    calibration_margin: float = doc("Log-odds subtracted from that quantile (room for unseen own queries).", 2.0)

    def __post_init__(self) -> None:
        _check(0.0 <= self.tau <= 1.0, f"see.tau must be in [0, 1], got {self.tau}")
        _check(0.0 < self.memory_tau <= 1.0, f"see.memory_tau must be in (0, 1], got {self.memory_tau}")
        _check(
            self.tau <= self.memory_tau,
            f"see.tau ({self.tau}) exceeds see.memory_tau ({self.memory_tau}), the share of queries the ensemble keeps",
        )
        _check(self.general_negatives >= 0, "see.general_negatives must be >= 0")
        _check(self.threshold is None or 0.0 < self.threshold < 1.0, "see.threshold must be in (0, 1)")
        _check(0.0 <= self.calibration_quantile < 1.0, "see.calibration_quantile must be in [0, 1)")
        _check(self.calibration_margin >= 0.0, "see.calibration_margin must be >= 0")


@dataclass
class GenerateConfig:
    max_new_tokens: int = doc("Longest answer in tokens (greedy decoding).", 64)
    batch_size: int = doc("Queries per forward pass at inference.", 16)
    engine: Literal["fast", "reference"] = doc(
        "'fast': batched routing with KV reuse and a prefix cache (engine.py); 'reference': one "
        "full prompt pass per expert, then a fresh generation pass (routing.py).",
        "fast",
    )
    prefix_cache_tokens: int = doc("Token budget of the fast engine's prefix cache (0 disables it).", 4096)
    prefix_block: int = doc("Shared prefixes are cached in multiples of this many tokens.", 8)
    prefill_tokens: int = doc(
        "Most tokens (rows x padded width) the fast engine feeds in one prefill forward; a larger "
        "batch is prefilled in chunks and decoded together (big CPU forwards run slower per token).",
        512,
    )

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0, "generate.max_new_tokens must be positive")
        _check(self.batch_size > 0, "generate.batch_size must be positive")
        _check(self.prefix_cache_tokens >= 0, "generate.prefix_cache_tokens must be >= 0")
        _check(self.prefix_block > 0, "generate.prefix_block must be positive")
        _check(self.prefill_tokens > 0, "generate.prefill_tokens must be positive")


@dataclass
class MosesConfig:
    """MoSEs (methods/moses.py): a pool of LoRA sub-experts per layer, masked per task."""

    experts: int = doc("Sub-experts in every adapted layer's pool at the start.", 2)
    capacity: float = doc("Share of a layer's pool weights each task's mask keeps (top-c% of its scores).", 0.5)
    top_k: int = doc("Sub-experts the token-level router mixes.", 2)
    grow_below: float = doc(
        "Add a sub-expert to every layer when the free share of pool weights falls below this.", 0.3
    )
    feature_queries: int = doc("Training queries per task whose frozen-base features make its prototype.", 64)

    def __post_init__(self) -> None:
        _check(self.experts >= 1, "moses.experts must be >= 1")
        _check(0 < self.capacity <= 1, "moses.capacity must be in (0, 1]")
        _check(self.top_k >= 1, "moses.top_k must be >= 1")
        _check(0 <= self.grow_below <= 1, "moses.grow_below must be in [0, 1]")
        _check(self.feature_queries >= 1, "moses.feature_queries must be >= 1")


@dataclass
class SetaConfig:
    """SETA (methods/seta.py): sparse shared and unique experts, Fisher anchoring, a feature gate."""

    density: float = doc("Entries of each task's sparse subspace, as a multiple of a rank-r LoRA's parameters.", 1.0)
    probe: int = doc("Training examples whose gradients measure each weight's sensitivity and Fisher information.", 16)
    ewc_lambda: float = doc("Weight of the Fisher-weighted anchoring of entries shared with earlier tasks.", 10.0)
    gate_steps: int = doc("Optimizer steps fitting the gate at each stage.", 300)
    gate_lr: float = doc("Learning rate of the gate.", 0.05)
    kl_weight: float = doc("Weight of the KL term keeping the gate's outputs for old tasks' pseudo-features.", 1.0)
    pseudo: int = doc("Gaussian pseudo-features per old task for the gate.", 32)
    feature_queries: int = doc("Training queries per task whose frozen-base features the gate learns from.", 64)

    def __post_init__(self) -> None:
        _check(self.density > 0, "seta.density must be > 0")
        _check(self.probe >= 1, "seta.probe must be >= 1")
        _check(self.ewc_lambda >= 0, "seta.ewc_lambda must be >= 0")
        _check(self.gate_steps >= 1 and self.gate_lr > 0, "seta.gate_steps must be >= 1 and seta.gate_lr > 0")
        _check(self.kl_weight >= 0, "seta.kl_weight must be >= 0")
        _check(self.pseudo >= 1 and self.feature_queries >= 1, "seta.pseudo and seta.feature_queries must be >= 1")


@dataclass
class VllmConfig:
    """How `--backend vllm` builds its `vllm.LLM` (a serving setting, not part of a run's config:
    set with `--set vllm.field=value`)."""

    base_dir: str | None = doc(
        "The ensemble's base exported for vLLM (`seecl export-base`); null: ENSEMBLE/vllm-base, "
        "exported there on first use and again whenever the ensemble's base changes.",
        None,
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = doc(
        "Weights dtype in vLLM; 'auto' lets vLLM choose from the exported base (float32, which vLLM "
        "runs in 16 bits on GPUs). float32 gives the PEFT engine's routes and greedy answers.",
        "auto",
    )
    tensor_parallel_size: int = doc("GPUs one model is split over.", 1)
    gpu_memory_utilization: float | None = doc(
        "Share of accelerator memory vLLM reserves; on vLLM's CPU build, of CPU memory. null: 0.25 "
        "on the CPU build (its default 0.92 is refused on a 24 GiB machine), vLLM's default elsewhere.",
        None,
    )
    kv_cache_memory_bytes: int | None = doc(
        "KV cache size in bytes, instead of sizing it from gpu_memory_utilization; null: vLLM sizes it.", None
    )
    max_model_len: int | None = doc("Longest prompt + answer in tokens; null: the model's own limit.", None)
    max_num_seqs: int | None = doc("Most requests vLLM runs at once; null: vLLM's default.", None)
    enforce_eager: bool | None = doc(
        "Run without CUDA graphs / compilation; null: true on the CPU build (which captures no graphs), "
        "vLLM's default on GPUs.",
        None,
    )
    block_size: int | None = doc(
        "KV cache block size in tokens. Prefix caching reuses whole blocks, so a claimed query's answer "
        "recomputes up to block_size - 1 prompt tokens after its check; null: 32 on the CPU build (its "
        "default 128 made answers recompute about half of a SuperNI prompt), vLLM's default on GPUs.",
        None,
    )
    max_lora_rank: int | None = doc(
        "Largest expert rank the engine accepts, including experts added while it runs; null: the "
        "current experts' largest (at least 8), rounded up to a rank vLLM supports.",
        None,
    )
    llm_args: dict[str, Any] = doc("Further `vllm.LLM` keyword arguments, e.g. {swap_space: 0}.", {})

    def __post_init__(self) -> None:
        _check(self.tensor_parallel_size > 0, "vllm.tensor_parallel_size must be positive")
        _check(
            self.gpu_memory_utilization is None or 0 < self.gpu_memory_utilization <= 1,
            "vllm.gpu_memory_utilization must be in (0, 1]",
        )
        _check(self.max_model_len is None or self.max_model_len > 0, "vllm.max_model_len must be positive")
        _check(self.max_num_seqs is None or self.max_num_seqs > 0, "vllm.max_num_seqs must be positive")
        _check(self.max_lora_rank is None or self.max_lora_rank > 0, "vllm.max_lora_rank must be positive")
        _check(self.block_size is None or self.block_size > 0, "vllm.block_size must be positive")
        _check(
            self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
            "vllm.kv_cache_memory_bytes must be positive",
        )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    see: SeeConfig = field(default_factory=SeeConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    moses: MosesConfig = field(default_factory=MosesConfig)
    seta: SetaConfig = field(default_factory=SetaConfig)


PRESETS: dict[str, dict[str, Any]] = {
    # Measured on SmolLM2-135M, CPU: batches that mix positives and negatives, a higher lr and
    # small batches make the indicator learnable from ~100 instances per task.
    "small": {},
    # The SEE paper's recipe (7B-scale models, thousands of instances per task): no general
    # negatives, greedy indicators.
    "paper": {
        "see.general_negatives": 0,
        "see.calibrate": False,
        "train.lr": 2e-4,
        "train.epochs": 3,
        "train.batch_size": 32,
        "train.micro_batch_size": 4,
        "adapter.r": 8,
        "adapter.dropout": 0.1,
    },
}


# ---------------------------------------------------------------------------------------------
# Generic machinery: dict <-> dataclass with type checks, YAML, overrides.


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a plain mapping; unknown keys and wrong types are errors."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where != "config" else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (["train", "lr"], 0.001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value ({exc})") from None
    return path, value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Return a copy of `base` with dotted-key overrides (a dict or `a.b=v` strings) applied."""
    out = _deep_copy(base)
    items = (
        overrides.items()
        if isinstance(overrides, dict)
        else ((".".join(p), v) for p, v in map(parse_override, overrides))
    )
    for key, value in items:
        _set_path(out, key.split("."), value)
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_config(
    cls: type = RunConfig,
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    preset: str | None = None,
    defaults: dict[str, Any] | None = None,
) -> Any:
    """Defaults (the dataclass's, then `defaults`) <- preset <- YAML file <- overrides."""
    data: dict[str, Any] = _deep_copy(defaults or {})
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        data = merge_overrides(data, PRESETS[preset])
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = _merge_nested(data, loaded)
    if overrides:
        data = merge_overrides(data, overrides)
    return from_dict(cls, data)


def _merge_nested(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = _deep_copy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_nested(out[key], value)
        else:
            out[key] = _deep_copy(value)
    return out


def save_config(config: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every field, for `seecl config`."""
    rows: list[tuple[str, str, str]] = []
    instance = cls()
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(type(value), f"{prefix}{f.name}."))
        else:
            rows.append((prefix + f.name, repr(value), f.metadata.get("doc", "")))
    return rows
