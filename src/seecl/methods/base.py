"""The one small interface every continual-learning method implements, and what they share.

A method is built from a `MethodContext` (base-model settings, run config, a working directory
for its state, and the adapter cache) and is driven by evaluation/protocol.py:

- `schedule == "sequential"`: `learn(tasks[:i+1])` at every stage i (the last task is new);
- `schedule == "joint"`: one `learn(all tasks)` (MTL);
- `schedule == "independent"`: `learn([task_j])` per task, each scored on its own task (AvgSTL).

`learn` must be idempotent: when the stage's state is already on disk (an interrupted run, or a
shared cache entry) it loads instead of training. `answer` returns one `Answer` per query; routed
methods fill in the route, others report `answered_by="model"`.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from seecl.cache import AdapterCache
from seecl.config import RunConfig
from seecl.data.task import Task
from seecl.serving.routing import Answer, Route

Schedule = Literal["sequential", "joint", "independent"]
MODEL = "model"  # answered_by for methods without routing


class Method(Protocol):
    label: str
    schedule: Schedule
    routed: bool
    stage_cache: bool  # each stage's trained adapter lives in the adapter cache under its metrics' cache_key

    def learn(self, tasks: Sequence[Task]) -> dict:
        """Train on the last of `tasks` (or all of them, for joint methods); returns stage metrics."""

    def answer(self, queries: Sequence[str], budgets: Sequence[int]) -> list[Answer]:
        """Greedy answers; `budgets` are max_new_tokens per query."""

    def routes(self, queries: Sequence[str]) -> list[Route]:
        """Only the routing decisions (routed methods); others return `answered_by="model"`."""

    def trainable_parameters(self) -> int:
        """Parameters the method has trained so far (all adapters/experts it keeps)."""

    def close(self) -> None:
        """Release the model."""


@dataclass
class MethodContext:
    config: RunConfig
    workdir: Path  # the method's own state lives here
    cache: AdapterCache  # trained adapters, shared between methods and runs
    general: Task | None = None  # a benchmark's general instructions (SEE's -general and -pseudo variants)
    general_negatives: int = 10  # general negatives per expert for SEE's -general variant


def unrouted(answers_text: Sequence[str], queries: Sequence[str]) -> list[Answer]:
    return [Answer(q, t, Route(MODEL, "direct")) for q, t in zip(queries, answers_text)]


def free_memory() -> None:
    """Give the memory of dropped models back before the next method loads one (callers drop their
    references first: `method.close()`, then `del method`)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
