"""The KV cache objects handed to a model's forward: shared tensors and in-place buffers.

Owns the name of the forward's cache argument in the installed transformers, caches that hold
given per-layer tensors without copying them, buffer-backed layers that a forward fills in place,
and the KV geometry of a model. What goes into the buffers is the serving engine's business.
"""

from __future__ import annotations

import functools
import inspect

import torch


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
    """The cache layer class of `kv_over` (built on first use: transformers is imported lazily)."""
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


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dimension) of a decoder's KV cache, from its config."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim
