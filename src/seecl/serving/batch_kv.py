"""The routing engine's batch states: the KV of a batch's rows in buffers that forwards fill in place.

Owns how a batch's keys and values are laid out while it is routed and answered. A buffer per
layer is sized once for everything the batch will append (its prompt chunks, a check's tail, the
answer budget), so a forward writes only its new positions, where a growing cache would copy the
whole KV at every forward. Rows of different lengths are left-padded with zeroed, masked columns
(never uninitialised memory: a masked NaN would still poison the attention). Taking a subset of
rows or gathering the rows of several states into one copies the filled positions once; taking
all rows in order hands the buffers over without a copy. Rewinding makes the next forward
overwrite what the previous one appended (an aLoRA expert's check over a shared prompt body).
Also cuts a batch's rows into prefill chunks (`row_chunks`).
Does not run the model: the engine's forwards fill the buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from seecl.model.kv import kv_over


@dataclass
class Rows:
    """A batch's decoding state: KV cache (buffer layers), attention mask over it, next position ids."""

    cache: object  # transformers DynamicCache whose layers are `models.kv_over` buffer layers
    mask: torch.Tensor  # [rows, filled positions], 1 = real token
    next_pos: torch.Tensor  # [rows]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @property
    def room(self) -> int:
        """Positions that can still be appended without reallocating."""
        return self.cache.layers[0].key_buffer.shape[2] - self.length

    def buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.key_buffer, layer.value_buffer) for layer in self.cache.layers]

    def rewind(self) -> Rows:
        """This state again after a forward appended to its cache (the appended positions become free)."""
        for layer in self.cache.layers:
            layer.rewind(self.length)
        return self

    def view(self, first: int, stop: int, column: int, length: int, mask: torch.Tensor, next_pos: torch.Tensor) -> Rows:
        """Rows `first:stop` from position `column` on, as a state of their own whose forwards
        write into this state's buffers, with its first `length` positions counted as filled."""
        buffers = [(k[first:stop, :, column:], v[first:stop, :, column:]) for k, v in self.buffers()]
        return Rows(kv_over(buffers, length), mask, next_pos)

    def take(self, rows: Sequence[int], room: int | None = None) -> Rows:
        """A state holding `rows` in this order. All rows in order (and room enough): this state
        itself, which its holder must no longer extend; otherwise a copy of the filled positions."""
        rows = list(rows)
        need = self.room if room is None else room
        if rows == list(range(self.mask.shape[0])) and self.room >= need:
            return self.rewind()
        return gather([(self, rows)], need)

    def narrow(self, rows: Sequence[int]) -> None:
        """Keep only `rows`, in place (the buffers are reallocated for them)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.next_pos = self.mask.index_select(0, index), self.next_pos.index_select(0, index)

    def zero(self, rows: Sequence[int] | torch.Tensor, start: int, stop: int) -> None:
        """Zero positions `start:stop` of `rows` in every buffer (columns a mask leaves out)."""
        if stop <= start:
            return
        index = (
            rows
            if isinstance(rows, torch.Tensor)
            else torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        )
        for k, v in self.buffers():
            k[:, :, start:stop].index_fill_(0, index, 0)
            v[:, :, start:stop].index_fill_(0, index, 0)


def allocate(like: torch.Tensor, shape: tuple[int, int, int], rows: int, positions: int) -> Rows:
    """An empty state of `rows` rows with room for `positions` positions, for a model whose KV
    `shape` is (layers, key/value heads, head dimension); dtype and device of `like`."""
    layers, heads, dim = shape
    buffers = [
        (like.new_empty((rows, heads, positions, dim)), like.new_empty((rows, heads, positions, dim)))
        for _ in range(layers)
    ]
    return Rows(
        kv_over(buffers, 0),
        torch.zeros((rows, 0), dtype=torch.long, device=like.device),
        torch.zeros(rows, dtype=torch.long, device=like.device),
    )


def _ranges(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """(destination offset, first, stop) of each run of consecutive indices in `rows`."""
    runs: list[tuple[int, int, int]] = []
    for offset, row in enumerate(rows):
        if runs and runs[-1][2] == row:
            runs[-1] = (runs[-1][0], runs[-1][1], row + 1)
        else:
            runs.append((offset, row, row + 1))
    return runs


def gather(parts: Sequence[tuple[Rows, Sequence[int]]], room: int) -> Rows:
    """One new state holding the given rows of each part in order, left-padded to the longest,
    with `room` free positions after it: one copy of the filled positions."""
    width = max(state.length for state, _ in parts)
    total = sum(len(rows) for _, rows in parts)
    first = parts[0][0]
    device = first.mask.device
    buffers = [
        (
            k.new_empty((total, *k.shape[1:2], width + room, k.shape[3])),
            v.new_empty((total, *v.shape[1:2], width + room, v.shape[3])),
        )
        for k, v in first.buffers()
    ]
    mask = torch.zeros((total, width), dtype=first.mask.dtype, device=device)
    next_pos = torch.empty(total, dtype=first.next_pos.dtype, device=device)
    at = 0
    for state, rows in parts:
        pad = width - state.length
        for offset, start, stop in _ranges(list(rows)):
            into = slice(at + offset, at + offset + stop - start)
            for (k, v), (sk, sv) in zip(buffers, state.buffers()):
                k[into, :, :pad] = 0
                v[into, :, :pad] = 0
                k[into, :, pad:width] = sk[start:stop, :, : state.length]
                v[into, :, pad:width] = sv[start:stop, :, : state.length]
            mask[into, pad:] = state.mask[start:stop]
            next_pos[into] = state.next_pos[start:stop]
        at += len(rows)
    cache = kv_over(buffers, width)
    return Rows(cache, mask, next_pos)


def row_chunks(widths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive row groups whose rows x longest width stays within `budget` (at least one row)."""
    groups: list[list[int]] = []
    widest = 0
    for row, width in enumerate(widths):
        if groups and (len(groups[-1]) + 1) * max(widest, width) <= budget:
            groups[-1].append(row)
            widest = max(widest, width)
        else:
            groups.append([row])
            widest = width
    return groups
