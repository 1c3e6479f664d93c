"""Load a base model and tokenizer (never from a model hub) and install the indicator tokens.

Owns model resolution (offline default, tiny test model, local directory, GGUF file, hub id already
in the local cache), device and dtype choice, the frozen-base invariant, and the KV cache objects
handed to the model's forward (shared tensors, in-place buffers). Adapters live in
store.py / experts.py; prompt formatting in prompts.py.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .default_model import DEFAULT_MODEL, ensure_default_model
from .errors import ModelError
from .indicators import Indicators, install_indicators
from .tiny import TINY_MODEL, build_tiny_model, build_tiny_tokenizer


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


@functools.cache
def cache_keyword() -> str:
    """The forward argument carrying the KV cache. transformers 5.24 renamed `past_key_values` to
    `cache` (the old name warns and is scheduled for removal); earlier 5.x releases know only the
    old one."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned, under the field name of the installed transformers."""
    return output.cache if cache_keyword() == "cache" else output.past_key_values


def kv_cache(layers):
    """A transformers DynamicCache holding these per-layer (k, v) tensors as they are.

    Its `ddp_cache_data` constructor appends every tensor to an empty layer, a full copy. The
    tensors are shared, not copied: a forward appends to a cache by concatenating into new tensors,
    so the given ones are never written.
    """
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(k[..., :0, :], v[..., :0, :]) for k, v in layers])
    for layer, (k, v) in zip(cache.layers, layers):
        layer.keys, layer.values = k, v
    return cache


@functools.cache
def _buffer_layer():
    """The cache layer class of `kv_buffer` (built on first use: transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """`keys`/`values` are views of the first positions of preallocated buffers; an update
        writes the new positions in place (reallocating, doubled, only past the capacity)."""

        def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int):
            super().__init__()
            self.device, self.is_initialized = key_buffer.device, True
            self.key_buffer, self.value_buffer = key_buffer, value_buffer
            self.rewind(length)

        def rewind(self, length: int) -> None:
            """Only the first `length` positions count; later ones are overwritten by the next update."""
            self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]

        @staticmethod
        def _grown(states: torch.Tensor, positions: int) -> torch.Tensor:
            buffer = states.new_empty((*states.shape[:2], positions, states.shape[3]))
            buffer[:, :, : states.shape[2]] = states
            return buffer

        def update(self, key_states, value_states, *args, **kwargs):
            start = self.keys.shape[2]
            end = start + key_states.shape[2]
            if end > self.key_buffer.shape[2]:
                self.key_buffer, self.value_buffer = self._grown(self.keys, 2 * end), self._grown(self.values, 2 * end)
            self.key_buffer[:, :, start:end] = key_states
            self.value_buffer[:, :, start:end] = value_states
            self.rewind(end)
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            length = self.keys.shape[2]
            self.key_buffer = self.key_buffer.index_select(0, indices)
            self.value_buffer = self.value_buffer.index_select(0, indices)
            self.rewind(length)

    return BufferLayer


def kv_over(buffers, length: int):
    """A transformers cache over these per-layer (key, value) buffers [batch, heads, capacity, dim]
    whose first `length` positions are filled: forwards write their new positions in place.

    The buffers are used, not copied: whoever else holds them sees the writes.
    """
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=[(k[..., :0, :], v[..., :0, :]) for k, v in buffers])
    cache.layers = [_buffer_layer()(k, v, length) for k, v in buffers]
    return cache


def kv_buffer(layers, capacity: int):
    """A transformers cache holding copies of these per-layer (k, v) tensors in buffers of
    `capacity` positions, which later forwards fill in place.

    A DynamicCache concatenates every layer's whole KV into new tensors at each forward: a copy of
    the cache per decoded token. A buffer is written in place, so it has one owner: the given
    tensors are copied, and nothing else may hold the returned cache's tensors.
    """
    length = layers[0][0].shape[2]
    buffers = []
    for k, v in layers:
        pair = []
        for states in (k, v):
            buffer = states.new_empty((*states.shape[:2], max(capacity, length), states.shape[3]))
            buffer[:, :, :length] = states
            pair.append(buffer)
        buffers.append(tuple(pair))
    return kv_over(buffers, length)


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dimension) of a decoder's KV cache, from its config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


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


def _load_pretrained(cfg: ModelConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = cfg.name
    if name == TINY_MODEL:
        tokenizer = build_tiny_tokenizer()
        return build_tiny_model(tokenizer).to(dtype), tokenizer
    if name == DEFAULT_MODEL:
        path = ensure_default_model()
        return (AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                AutoTokenizer.from_pretrained(path))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return (AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype),
                AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model directory (no config.json)")
        return (AutoModelForCausalLM.from_pretrained(path, dtype=dtype),
                AutoTokenizer.from_pretrained(path))
    if path.exists():
        raise ModelError(f"model path {name!r} is neither a model directory nor a .gguf file")
    try:
        return (AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True),
                AutoTokenizer.from_pretrained(name, local_files_only=True))
    except OSError:
        raise ModelError(
            f"model {name!r} is not a local directory, a .gguf file, or a hub id in the local cache; "
            f"seecl does not download from a model hub. Use '{DEFAULT_MODEL}' (offline default) or "
            "a local path."
        ) from None


def load_base(cfg: ModelConfig) -> Base:
    """Load the frozen base model on its device, with the indicator tokens installed."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    started = time.perf_counter()
    model, tokenizer = _load_pretrained(cfg, dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(f"the tokenizer of {cfg.name!r} has no chat template")
    indicators = install_indicators(model, tokenizer, cfg.indicator)
    model.requires_grad_(False)
    model.to(device).eval()
    model.config.use_cache = True
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return Base(model=model, tokenizer=tokenizer, indicators=indicators, config=cfg,
                load_seconds=time.perf_counter() - started)
