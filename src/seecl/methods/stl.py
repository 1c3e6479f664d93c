"""AvgSTL: one LoRA per task trained alone, each scored on its own task (oracle routing)."""

from __future__ import annotations

from typing import Sequence

from ..data.task import Task
from ..routing import Answer, Route
from .base import MODEL, MethodContext
from .single import SingleAdapter


class SingleTask:
    schedule = "independent"
    routed = False

    def __init__(self, ctx: MethodContext, label: str = "AvgSTL"):
        self.ctx, self.label = ctx, label
        self.single = SingleAdapter(ctx)
        self.keys: dict[str, str] = {}

    def learn(self, tasks: Sequence[Task]) -> dict:
        (task,) = tasks
        self.keys[task.name], metrics = self.single.fit(list(task.instances), None, desc=f"{self.label} {task.name}")
        return {**metrics, "instances": len(task)}

    def answer(self, queries, budgets) -> list[Answer]:
        return self.single.answer(queries, budgets)

    def routes(self, queries) -> list[Route]:
        return [Route(MODEL, "direct") for _ in queries]

    def trainable_parameters(self) -> int:
        return sum(self.single.parameters_of(k) for k in self.keys.values())

    def close(self) -> None:
        self.single.close()
