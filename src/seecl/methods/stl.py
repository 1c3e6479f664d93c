"""AvgSTL: one LoRA per task trained alone, each scored on its own task (oracle routing)."""

from __future__ import annotations

from collections.abc import Sequence

from seecl.data.task import Task
from seecl.methods.base import MethodContext
from seecl.methods.single import OneModelMethod


class SingleTask(OneModelMethod):
    schedule = "independent"

    def __init__(self, ctx: MethodContext, label: str = "AvgSTL"):
        super().__init__(ctx, label)
        self.keys: dict[str, str] = {}

    def learn(self, tasks: Sequence[Task]) -> dict:
        (task,) = tasks
        self.keys[task.name], metrics = self.single.fit(list(task.instances), None, desc=f"{self.label} {task.name}")
        return {**metrics, "instances": len(task)}

    def trainable_parameters(self) -> int:
        return sum(self.single.parameters_of(k) for k in self.keys.values())
