"""The `vllm.LLM` for an ensemble: which experts vLLM serves faithfully, their LoRA ids and settings,
and the LLM's keyword arguments.

Owns the refusal of experts vLLM would serve differently from PEFT (`check_servable`), the
process-wide adapter ids (`lora_id`), the LoRA settings from the experts' adapter configs
(`lora_settings`), the mapping of `VllmConfig` onto `vllm.LLM` arguments (`llm_kwargs`) and
`build_llm`. Does not route or build requests (vllm_engine.py) or export the base (vllm_export.py).

vLLM facts relied on (vLLM 0.32's source: vllm/config/lora.py, vllm/platforms/cpu.py):
- `LLM(enable_lora=True, max_lora_rank=r, max_loras=n, max_cpu_loras=m)`; `max_lora_rank` must be
  one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (`vllm.config.lora.MaxLoRARanks`).
- vLLM caches adapters by `lora_int_id`.
- vLLM serves LoRA A/B matrices only (on the linear layers, the embedding and the output head):
  PEFT trainable-token rows and modules_to_save are rejected or not applied. An expert's indicator
  rows are therefore rewritten as embedding and head LoRA (vllm_experts.py); anything else is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seecl.adapters import read_adapter_config
from seecl.config import VllmConfig
from seecl.errors import SeeclError
from seecl.see.shared_rows import TOKEN_ROWS_TENSOR
from seecl.see.store import EnsembleStore

INSTALL_HINT = "pip install 'seecl[vllm]' (CUDA); for vLLM's CPU build run `make vllm-venv` (docs/vllm.md)"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CPU_BLOCK_SIZE = 32  # the CPU attention kernels take multiples of 32; see VllmConfig.block_size
CPU_MEMORY_SHARE = 0.25  # vLLM's 0.92 default, read as a share of CPU memory, is refused on 24 GiB
SERVABLE_HINT = "train it with `seecl learn` (LoRA matrices and indicator rows only)"

LORA_TENSORS = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
LoraTuple = tuple[str, int, str]  # LoRARequest(lora_name, lora_int_id, lora_path)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def require_vllm():
    try:
        import vllm
    except ImportError:
        raise SeeclError(f"the vLLM backend needs vLLM, which is not installed: {INSTALL_HINT}") from None
    return vllm


def supports_logprob_token_ids() -> bool:
    from vllm import SamplingParams

    return "logprob_token_ids" in getattr(SamplingParams, "__struct_fields__", ())


def on_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


# -- experts and LoRA settings ----------------------------------------------------------------------
_LORA_IDS: dict[tuple, int] = {}


def lora_id(directory: str | Path) -> int:
    """One id per adapter file for the life of the process: vLLM caches adapters by id, so two
    ensembles sharing one LLM, or a directory whose adapter was replaced, never mix weights."""
    path = (Path(directory) / "adapter_model.safetensors").resolve()
    try:
        stat = path.stat()
        key: tuple = (str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)
    except FileNotFoundError:
        key = (str(path),)
    return _LORA_IDS.setdefault(key, len(_LORA_IDS) + 1)


def lora_table(ensemble_dir: str | Path, experts: Sequence[str]) -> dict[str, LoraTuple]:
    """One LoRARequest tuple per expert: its name, its process-wide id and its directory."""
    store = EnsembleStore(ensemble_dir)
    return {name: (name, lora_id(store.expert_dir(name)), str(store.expert_dir(name).resolve())) for name in experts}


def token_row_tensors(directory: str | Path) -> list[str]:
    """Names of tensors in adapter_model.safetensors that vLLM would not apply (anything not LoRA A/B)."""
    from safetensors import safe_open

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        raise SeeclError(f"{directory}: adapter_model.safetensors missing (pickled adapters are not served)")
    with safe_open(str(path), framework="pt") as handle:  # reads the header only, never pickle
        names = list(handle.keys())
    return [n for n in names if not n.endswith(LORA_TENSORS)]


def check_servable(name: str, directory: str | Path) -> None:
    """Raise if vLLM would serve expert `name` differently from PEFT (its routing would change).
    Indicator rows are servable: they are rewritten as LoRA matrices (vllm_experts.py)."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    extra = [n for n in token_row_tensors(directory) if not n.endswith(TOKEN_ROWS_TENSOR)]
    if config.get("modules_to_save"):
        extra.append(f"modules_to_save={config['modules_to_save']}")
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise SeeclError(
            f"expert {name!r} cannot be served with vLLM: its adapter carries weights that are neither "
            f"LoRA matrices nor indicator rows ({shown}), which vLLM ignores, so its routing would "
            f"silently change; {SERVABLE_HINT}"
        )
    if config.get("alora_invocation_tokens"):
        # vLLM would apply an activated LoRA to the whole prompt: different outputs than PEFT.
        raise SeeclError(
            f"expert {name!r} is an activated LoRA (adapter.kind=alora), which the vLLM backend "
            "does not serve; use the PEFT engine or train it with adapter.kind=lora"
        )


def vllm_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise SeeclError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


@dataclass(frozen=True)
class LoraSettings:
    """What `vllm.LLM` must know about the experts' adapters."""

    targets: list[str]
    max_rank: int
    n_experts: int
    max_loras_cap: int = 8

    @property
    def vllm_rank(self) -> int:
        return vllm_rank(self.max_rank)

    def llm_kwargs(self) -> dict[str, Any]:
        # Answers of several experts share one generate call: a slot per expert up to the cap, and
        # a CPU cache of all experts avoids reloading adapters from disk at every switch.
        slots = max(1, min(self.n_experts, self.max_loras_cap))
        return {
            "enable_lora": True,
            "max_lora_rank": self.vllm_rank,
            "max_loras": slots,
            "max_cpu_loras": max(slots, self.n_experts),
        }


def lora_settings(expert_dirs: Sequence[str | Path], min_rank: int = 1) -> LoraSettings:
    """Union of target modules and the largest rank (incl. rank_pattern) over the experts."""
    targets: list[str] = []
    max_rank = min_rank
    for directory in expert_dirs:
        config = read_adapter_config(Path(directory))
        modules = config.get("target_modules") or []
        for module in [modules] if isinstance(modules, str) else modules:
            if module not in targets:
                targets.append(module)
        max_rank = max([max_rank, int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
    return LoraSettings(targets, max_rank, len(expert_dirs))


def llm_kwargs(config: VllmConfig, lora: dict[str, Any], cpu: bool) -> dict[str, Any]:
    """`vllm.LLM` keyword arguments (besides model/tokenizer) from the config and LoRA settings."""
    kwargs: dict[str, Any] = {
        **lora,
        "enable_prefix_caching": True,
        "tensor_parallel_size": config.tensor_parallel_size,
    }
    if config.dtype != "auto":
        kwargs["dtype"] = config.dtype
    memory = config.gpu_memory_utilization
    if memory is None and cpu:
        memory = CPU_MEMORY_SHARE
    if memory is not None:
        kwargs["gpu_memory_utilization"] = memory
    for name in ("kv_cache_memory_bytes", "max_model_len", "max_num_seqs"):
        if getattr(config, name) is not None:
            kwargs[name] = getattr(config, name)
    eager = config.enforce_eager if config.enforce_eager is not None else (True if cpu else None)
    if eager is not None:
        kwargs["enforce_eager"] = eager
    block = config.block_size if config.block_size is not None else (CPU_BLOCK_SIZE if cpu else None)
    if block is not None:
        kwargs["block_size"] = block
    return {**kwargs, **config.llm_args}


def export_dtype(dtype: str) -> str:
    """The dtype a base is exported in for a `vllm.dtype`: float32 unless a 16-bit one is asked for."""
    return dtype if dtype in ("bfloat16", "float16") else "float32"


def build_llm(base_dir: str | Path, expert_dirs: Sequence[str | Path], config: VllmConfig, **extra: Any):
    """A `vllm.LLM` over the exported base with LoRA enabled for these experts (and any added
    later up to `config.max_lora_rank`). vLLM starts worker processes: call this under
    `if __name__ == "__main__":` in scripts."""
    vllm = require_vllm()
    settings = lora_settings(expert_dirs, config.max_lora_rank or 8)
    kwargs = {**llm_kwargs(config, settings.llm_kwargs(), on_cpu_build()), **extra}
    return vllm.LLM(model=str(base_dir), tokenizer=str(base_dir), **kwargs)
