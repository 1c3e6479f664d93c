"""Task reconstruction (docs/design.md §1): D̂_i from the new task and the query memory.

Owns the exact negative counts round(tau * |D_j|), the seeded query memory each task leaves behind
(queries, never responses), and `reconstruct`, which turns a task plus the memories of the earlier
tasks into positives (`<<pos>>` + response) and negatives (`<<neg>>`), with where each came from.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from seecl.data.prompts import Example, PromptFormatter
from seecl.data.task import Instance, Task
from seecl.errors import StoreError
from seecl.see.store import MemoryItem, QueryMemory


def negatives_count(tau: float, total: int) -> int:
    """round(tau * |D_j|), halves rounded up (tiny epsilon absorbs float error like 0.1 * 100)."""
    return int(math.floor(tau * total + 0.5 + 1e-9))


def memory_size(memory_tau: float, total: int) -> int:
    """Queries kept per task: enough for negatives_count(tau) for every tau <= memory_tau."""
    return min(total, max(negatives_count(memory_tau, total), math.ceil(round(memory_tau * total, 6))))


def build_memory(task: Task, memory_tau: float, seed: int) -> QueryMemory:
    """A seeded sample of the task's queries; SEE never keeps responses."""
    rng = random.Random(f"memory:{seed}:{task.name}")
    chosen = rng.sample(list(task.instances), memory_size(memory_tau, len(task)))
    return QueryMemory(task.name, len(task), tuple(MemoryItem(i.id, i.query) for i in chosen))


@dataclass
class Reconstruction:
    """D̂_i: the task's positives and the sampled negatives, with where each negative came from."""

    positives: list[Instance]
    negatives: list[tuple[str, MemoryItem]] = field(default_factory=list)

    def negative_ids(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for source, item in self.negatives:
            out.setdefault(source, []).append(item.id)
        return out

    def examples(self, formatter: PromptFormatter) -> list[Example]:
        return [formatter.see_example(i.query, i.response) for i in self.positives] + [
            formatter.see_example(item.query, None) for _, item in self.negatives
        ]


def _sample(items: Sequence[MemoryItem], k: int, key: str) -> list[MemoryItem]:
    # A seeded permutation truncated to k: negatives for a smaller tau are a subset of a larger one's.
    order = list(items)
    random.Random(key).shuffle(order)
    return order[:k]


def reconstruct(
    task: Task,
    memories: Sequence[QueryMemory],
    tau: float,
    seed: int = 0,
    general: Sequence[Instance] = (),
    n_general: int = 0,
    pseudo: bool = False,
    general_name: str = "general",
) -> Reconstruction:
    """Build D̂_i for `task` given the query memories of the earlier tasks (oldest first).

    Each earlier task j contributes exactly negatives_count(tau, |D_j|) queries. With `pseudo`,
    the same total number of negatives comes from `general` instead (ablation); `n_general` adds
    that many general negatives on top (the out-of-distribution option).
    """
    result = Reconstruction(list(task.instances))
    wanted = 0
    for memory in memories:
        k = negatives_count(tau, memory.total)
        if k > len(memory.items):
            raise StoreError(
                f"tau={tau} needs {k} queries of task {memory.task!r} but its memory keeps "
                f"{len(memory.items)}; lower tau or rebuild with a larger see.memory_tau"
            )
        wanted += k
        if not pseudo:
            for item in _sample(memory.items, k, f"neg:{seed}:{task.name}:{memory.task}"):
                result.negatives.append((memory.task, item))
    extra = (wanted if pseudo else 0) + n_general
    if extra:
        pool = [MemoryItem(i.id, i.query) for i in general]
        if len(pool) < extra:
            raise StoreError(f"{extra} general negatives requested but only {len(pool)} available")
        for item in _sample(pool, extra, f"general:{seed}:{task.name}"):
            result.negatives.append((general_name, item))
    return result
