"""Straightforward reference implementations that tests compare the optimised code against."""

import torch
import torch.nn.functional as F

from seecl.data.prompts import IGNORE
from seecl.model.kv import kv_over


def reference_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The straightforward loss through the model's full logits (summed), for comparison."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


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
