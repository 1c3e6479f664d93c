"""The routing engine's prefix cache: per-owner KV of block-aligned prompt heads, LRU within a token budget.

Owns which prefixes are kept, how a prompt finds the longest cached head of itself, eviction, the
batch order that lets prompts sharing a head meet in one batch, and the runs of a batch that share
more than the whole batch does.
Does not run the model: the engine computes the KV it stores and continues from what it finds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from seecl.data.prompts import common_prefix_length


def _head(layers: list, length: int) -> list:
    """Per-layer (k, v) views of the first `length` positions (tensors are [batch, heads, positions, dim])."""
    if layers[0][0].shape[2] == length:
        return layers
    return [(k[:, :, :length], v[:, :, :length]) for k, v in layers]


def _owned(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is all of its storage (not a view into something larger)."""
    return tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


class PrefixCache:
    """Per-owner KV of prompt prefixes, LRU-evicted to stay under `max_tokens` tokens.

    An entry is the KV of one block-aligned prefix; every block-aligned head of it is indexed too,
    so a later prompt that shares only its first blocks (a task definition, without the previous
    query's input) reuses that part of the entry. This is what makes the cache work one query at a
    time, where the stored prefix is a whole earlier prompt.
    """

    def __init__(self, max_tokens: int = 4096, block: int = 8):
        self.max_tokens, self.block = max_tokens, block
        self.entries: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.heads: dict[tuple, tuple] = {}  # (owner, head tokens) -> key of an entry that starts with it
        self.tokens = 0
        self.hits = self.misses = 0

    def _head_keys(self, key: tuple):
        owner, tokens = key
        for length in range(self.block, len(tokens) + 1, self.block):
            yield (owner, tokens[:length])

    def lookup(self, owner: str, prefix: Sequence[int]) -> tuple[int, list | None]:
        """Longest cached block-aligned head of `prefix`: (length, per-layer (k, v)) or (0, None)."""
        for length in range(len(prefix) // self.block * self.block, 0, -self.block):
            entry = self.heads.get((owner, tuple(prefix[:length])))
            if entry is not None:
                self.entries.move_to_end(entry)
                self.hits += 1
                return length, _head(self.entries[entry], length)
        self.misses += 1
        return 0, None

    def store(self, owner: str, prefix: Sequence[int], layers: list) -> None:
        """Keep the KV of `prefix`, cut to its block-aligned part (so all its heads are aligned);
        `layers` may cover more positions than that, or be views of a batch's buffers: only the
        head is copied (an entry never keeps a larger buffer alive)."""
        if len(prefix) > self.max_tokens or len(prefix) < self.block:
            return
        key = (owner, tuple(prefix[: len(prefix) // self.block * self.block]))
        layers = [tuple(t if _owned(t) else t.clone() for t in pair) for pair in _head(layers, len(key[1]))]
        if key not in self.entries:
            self.tokens += len(key[1])
        self.entries[key] = layers
        self.entries.move_to_end(key)
        for head in self._head_keys(key):
            self.heads[head] = key
        while self.tokens > self.max_tokens:
            self._evict()

    def _evict(self) -> None:
        old, _ = self.entries.popitem(last=False)
        self.tokens -= len(old[1])
        for head in self._head_keys(old):
            if self.heads.get(head) == old:
                # another entry may start with the same head: keep it reachable
                survivor = next(
                    (key for key in reversed(self.entries) if key[0] == head[0] and key[1][: len(head[1])] == head[1]),
                    None,
                )
                if survivor is None:
                    del self.heads[head]
                else:
                    self.heads[head] = survivor

    def clear(self) -> None:
        self.entries.clear()
        self.heads.clear()
        self.tokens = 0


def _floor(prompts: Sequence[Sequence[int]], block: int) -> int:
    """The block-aligned length of the head every prompt shares (a system prompt): rows group by
    what they share beyond it."""
    return common_prefix_length(prompts) // block * block


def batch_order(prompts: Sequence[Sequence[int]], block: int) -> list[int]:
    """The order in which prompts are cut into batches.

    Prompts that share at least one prefix block more than all prompts do (a task definition
    behind a common system prompt) stay together, so the prefix cache prefills their shared part
    once; inside each such group, and among the prompts that share nothing more, shorter prompts
    come first, so a batch pads little (padding is computed at every expert's check).
    """
    if not prompts:
        return []
    floor = _floor(prompts, block)
    by_text = sorted(range(len(prompts)), key=lambda i: (prompts[i], i))
    groups: list[list[int]] = []
    for previous, index in zip([None] + by_text, by_text):
        if previous is not None and common_prefix_length([prompts[previous], prompts[index]]) >= floor + block:
            groups[-1].append(index)
        else:
            groups.append([index])
    loners = [g[0] for g in groups if len(g) == 1]
    groups = [g for g in groups if len(g) > 1] + [loners]
    return [i for group in groups for i in sorted(group, key=lambda i: (len(prompts[i]), i))]


def shared_runs(prompts: Sequence[Sequence[int]], block: int) -> list[list[int]]:
    """Consecutive runs of `prompts` that share more block-aligned prefix than all of them do.

    A batch cut from `batch_order` may span the end of one group and the start of the next (two
    task definitions behind a common system prompt); prefilled as one, its rows could share only
    the system prompt, while each run shares its own definition. Neighbouring rows that share no
    more than all do with anyone stay one run (a pass per row would gain nothing).
    """
    floor = _floor(prompts, block)
    runs = [[0]]
    for row in range(1, len(prompts)):
        if common_prefix_length([prompts[row - 1], prompts[row]]) >= floor + block:
            runs[-1].append(row)
        else:
            runs.append([row])
    coalesced: list[list[int]] = []
    for run, previous in zip(runs, [None] + runs):
        if len(run) == 1 and previous is not None and len(previous) == 1:
            coalesced[-1].append(run[0])
        else:
            coalesced.append(run)
    return coalesced
