"""Typed run configuration: the schema, one dataclass per section with a doc per field, and presets.

Owns what can be configured and its validation. Does not know what the values are used for: each
component reads its own section. Building, overriding, saving and describing any of these
dataclasses is typed_config.py's job (re-exported here). Every run writes its resolved config
next to its outputs (`save_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from seecl.errors import ConfigError
from seecl.typed_config import check as _check
from seecl.typed_config import describe as _describe
from seecl.typed_config import doc, from_dict, merge_overrides, parse_override, save_config, to_dict
from seecl.typed_config import load_config as _load_config

__all__ = ["doc", "from_dict", "merge_overrides", "parse_override", "save_config", "to_dict"]

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
    alora_invocation: Literal["header", "last_token"] = doc(
        "What invokes an aLoRA expert: the whole assistant-turn header, or only its last token "
        "(a routing check then runs one token per expert instead of the header's).",
        "header",
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
    checkpoint_every: int = doc(
        "Save a resumable checkpoint every N optimizer steps (a killed learn resumes from it); 0 disables.", 50
    )
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

    check_group: int = doc(
        "Activated-LoRA experts whose routing checks of a batch run in one forward (newest first, "
        "group after group while queries are open); their KV shares the batch's buffers.",
        32,
    )

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0, "generate.max_new_tokens must be positive")
        _check(self.batch_size > 0, "generate.batch_size must be positive")
        _check(self.prefix_cache_tokens >= 0, "generate.prefix_cache_tokens must be >= 0")
        _check(self.prefix_block > 0, "generate.prefix_block must be positive")
        _check(self.prefill_tokens > 0, "generate.prefill_tokens must be positive")
        _check(self.check_group > 0, "generate.check_group must be positive")


@dataclass
class ServerConfig:
    """`seecl serve`: `--set server.<field>=value`. Never stored with an ensemble (it may hold a key)."""

    max_prompt_tokens: int = doc(
        "Longest prompt in tokens, counted with the system prompt and chat template (a conversation whole).", 2048
    )
    max_tokens: int = doc("Largest `max_tokens` a request may ask for.", 1024)
    default_max_tokens: int | None = doc(
        "Answer budget of a request that names none; null: the ensemble's generate.max_new_tokens.", None
    )
    max_body_bytes: int = doc("Larger request bodies get 413.", 1 << 20)
    max_prompts: int = doc("Prompts in one /v1/completions request.", 32)
    max_n: int = doc("Largest `n` (choices per prompt).", 8)
    max_stop: int = doc("Most stop strings in one request.", 4)
    max_logprobs: int = doc("Largest `logprobs` / `top_logprobs` (alternatives per token).", 20)
    batch_window_s: float = doc("How long the first waiting request waits for others to share its batch.", 0.01)
    max_batch_queries: int = doc("Queries per engine call (a larger request goes alone).", 32)
    reload_interval_s: float = doc(
        "How often an idle server looks for experts learned meanwhile; it also looks before every batch "
        "(0: only then).",
        1.0,
    )
    api_key: str | None = doc(
        "Clients must send `Authorization: Bearer <key>` (not /health). Prefer the SEECL_API_KEY "
        "environment variable: a command line is visible to other users of the machine.",
        None,
    )
    allowed_hosts: list[str] = doc(
        "Host header values accepted (against DNS rebinding); empty: the loopback names when bound to a "
        "loopback address, any host otherwise; '*': any.",
        [],
    )
    allowed_origins: list[str] = doc(
        "Browser origins (scheme://host:port) allowed to call the API, with CORS; empty: only same-origin "
        "requests, cross-site ones get 403.",
        [],
    )

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "max_body_bytes", "max_prompts", "max_n", "max_batch_queries"):
            _check(getattr(self, name) > 0, f"server.{name} must be positive")
        _check(self.max_stop >= 0 and self.max_logprobs >= 0, "server.max_stop and max_logprobs must be >= 0")
        _check(
            self.default_max_tokens is None or 0 < self.default_max_tokens <= self.max_tokens,
            f"server.default_max_tokens must be in [1, server.max_tokens={self.max_tokens}]",
        )
        _check(self.batch_window_s >= 0 and self.reload_interval_s >= 0, "server intervals must be >= 0")
        _check(self.api_key is None or len(self.api_key) > 0, "server.api_key must not be empty")


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


def load_config(
    cls: type = RunConfig,
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    preset: str | None = None,
    defaults: dict[str, Any] | None = None,
) -> Any:
    """Defaults (the dataclass's, then `defaults`) <- preset <- YAML file <- overrides."""
    data = dict(defaults or {})
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        data = merge_overrides(data, PRESETS[preset])
    return _load_config(cls, path, overrides, data)


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted name, default, doc) for every field, for `seecl config`."""
    return _describe(cls, prefix)
