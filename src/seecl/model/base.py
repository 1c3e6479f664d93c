"""Load a base model and tokenizer (never from a model hub) and install the indicator tokens.

Owns model resolution (offline default, tiny test model, local directory, GGUF file, hub id already
in the local cache), device and dtype choice and the frozen-base invariant. The KV cache objects
handed to a forward live in kv.py, adapters in seecl.adapters, prompt formatting in data/prompts.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from seecl.config import ModelConfig
from seecl.errors import ModelError
from seecl.model.default import DEFAULT_MODEL, ensure_default_model
from seecl.model.indicators import Indicators, install_indicators
from seecl.model.tiny import TINY_MODEL, build_tiny_model, build_tiny_tokenizer


@dataclass
class Base:
    """A frozen base model with its tokenizer and indicator tokens installed."""

    model: torch.nn.Module
    tokenizer: object
    indicators: Indicators
    config: ModelConfig
    load_seconds: float = 0.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(name: str) -> torch.device:
    """'auto' is this process's accelerator device (cuda:LOCAL_RANK under `accelerate launch`)."""
    if name == "auto":
        if torch.cuda.is_available():
            from accelerate import PartialState

            return PartialState().device
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ModelError(f"invalid device {name!r}: {exc}") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _source(cfg: ModelConfig) -> tuple[Path | str, dict]:
    """Where the model named by `cfg` lives, and the loading arguments transformers needs for it."""
    name = cfg.name
    if name == DEFAULT_MODEL:
        return ensure_default_model(), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return path.parent, {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model directory (no config.json)")
        return path, {}
    if path.exists():
        raise ModelError(f"model path {name!r} is neither a model directory nor a .gguf file")
    return name, {"local_files_only": True}


def _not_found(name: str) -> ModelError:
    return ModelError(
        f"model {name!r} is not a local directory, a .gguf file, or a hub id in the local cache; "
        f"seecl does not download from a model hub. Use '{DEFAULT_MODEL}' (offline default) or a local path."
    )


def load_tokenizer(cfg: ModelConfig):
    """The base model's tokenizer alone (no weights loaded), without the indicator tokens."""
    from transformers import AutoTokenizer

    if cfg.name == TINY_MODEL:
        tokenizer = build_tiny_tokenizer()
    else:
        source, kwargs = _source(cfg)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        except OSError:
            raise _not_found(cfg.name) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(f"the tokenizer of {cfg.name!r} has no chat template")
    return tokenizer


def _load_model(cfg: ModelConfig, tokenizer, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if cfg.name == TINY_MODEL:
        return build_tiny_model(tokenizer).to(dtype)
    source, kwargs = _source(cfg)
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except OSError:
        raise _not_found(cfg.name) from None


def load_base(cfg: ModelConfig) -> Base:
    """Load the frozen base model on its device, with the indicator tokens installed."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    model = _load_model(cfg, tokenizer, dtype)
    indicators = install_indicators(model, tokenizer, cfg.indicator)
    model.requires_grad_(False)
    model.to(device).eval()
    model.config.use_cache = True
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return Base(
        model=model, tokenizer=tokenizer, indicators=indicators, config=cfg, load_seconds=time.perf_counter() - started
    )
