"""MTL: one LoRA trained on all tasks at once (the upper-bound reference, not continual)."""

from __future__ import annotations

from collections.abc import Sequence

from seecl.data.task import Task
from seecl.methods.base import MethodContext
from seecl.methods.single import OneModelMethod


class MultiTask(OneModelMethod):
    schedule = "joint"

    def __init__(self, ctx: MethodContext, label: str = "MTL"):
        super().__init__(ctx, label)
        self.key: str | None = None

    def learn(self, tasks: Sequence[Task]) -> dict:
        # The union in task-name order: a joint model does not depend on the order the continual
        # methods see the tasks in, so every order of the same tasks shares one adapter (and cache entry).
        data = [inst for task in sorted(tasks, key=lambda task: task.name) for inst in task.instances]
        self.key, metrics = self.single.fit(data, None, desc=self.label)
        return {**metrics, "instances": len(data)}

    def trainable_parameters(self) -> int:
        return self.single.parameters_of(self.key) if self.key else 0
