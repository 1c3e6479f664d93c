"""MTL: one LoRA trained on all tasks at once (the upper-bound reference, not continual)."""

from __future__ import annotations

from typing import Sequence

from ..data.task import Task
from ..routing import Answer, Route
from .base import MODEL, MethodContext
from .single import SingleAdapter


class MultiTask:
    schedule = "joint"
    routed = False

    def __init__(self, ctx: MethodContext, label: str = "MTL"):
        self.ctx, self.label = ctx, label
        self.single = SingleAdapter(ctx)
        self.key: str | None = None

    def learn(self, tasks: Sequence[Task]) -> dict:
        data = [inst for task in tasks for inst in task.instances]
        self.key, metrics = self.single.fit(data, None, desc=self.label)
        return {**metrics, "instances": len(data)}

    def answer(self, queries, budgets) -> list[Answer]:
        return self.single.answer(queries, budgets)

    def routes(self, queries) -> list[Route]:
        return [Route(MODEL, "direct") for _ in queries]

    def trainable_parameters(self) -> int:
        return self.single.parameters_of(self.key) if self.key else 0

    def close(self) -> None:
        self.single.close()
