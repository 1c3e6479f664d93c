"""One LoRA fine-tuned task after task: Non-rehearsal, RandSel(tau) and KMeansSel(tau).

Stage i continues the adapter of stage i-1 on task i's data plus, for the rehearsal variants,
round(tau * |D_j|) instances (with responses) of every earlier task j: chosen at random
(RandSel) or as the instances nearest to the k-means centres of sentence embeddings of the
task's queries (KMeansSel). Non-rehearsal is tau = 0: it forgets.

A task's sample is drawn once, when the task is learned, and the same instances are replayed at
every later stage, as SSR's selection script (which the SEE paper follows) writes one sample file
per task: the seed names the task, never the stage that replays it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Literal

from seecl.data.task import Instance, Task
from seecl.methods.base import MethodContext
from seecl.methods.single import OneModelMethod
from seecl.see.reconstruction import negatives_count

Selection = Literal["none", "random", "kmeans"]


def select_rehearsal(task: Task, k: int, selection: Selection, seed: int) -> list[Instance]:
    """The instances of `task` that every later stage replays (the same ones at each stage)."""
    if k <= 0 or selection == "none":
        return []
    if selection == "random":
        return random.Random(f"replay:{seed}:{task.name}").sample(list(task.instances), k)
    from seecl.embeddings import embed, kmeans_representatives

    vectors = embed([i.query for i in task.instances])
    return [task.instances[i] for i in kmeans_representatives(vectors, k, seed)]


class Replay(OneModelMethod):
    """One adapter chain: stage i continues stage i-1's adapter on task i plus `rehearsal(...)`."""

    schedule = "sequential"

    def __init__(self, ctx: MethodContext, label: str, tau: float = 0.0, selection: Selection = "none"):
        super().__init__(ctx, label)
        self.tau, self.selection = tau, selection
        self.state_path = ctx.workdir / "stages.json"
        self.keys: list[str] = json.loads(self.state_path.read_text()) if self.state_path.exists() else []
        self._selected: dict[str, list[Instance]] = {}

    def rehearsal(self, earlier: Sequence[Task], new: Task, init: str | None) -> list[Instance]:
        """Instances of earlier tasks replayed with `new` (`init`: the previous stage's adapter)."""
        data: list[Instance] = []
        for old in earlier:
            if old.name not in self._selected:
                k = negatives_count(self.tau, len(old))
                self._selected[old.name] = select_rehearsal(old, k, self.selection, self.ctx.config.see.seed)
            data.extend(self._selected[old.name])
        return data

    def stage_key(self, tasks: Sequence[Task], init: str | None) -> str | None:
        """The cache key of a stage named by its inputs, for methods whose training data a model
        writes (None: the training data names the stage, as for real replayed instances)."""
        return None

    def learn(self, tasks: Sequence[Task]) -> dict:
        stage = len(tasks) - 1
        init = self.keys[stage - 1] if stage > 0 else None
        key = self.stage_key(tasks, init)
        metrics = self.single.cached(key) if key is not None else None
        if metrics is None:  # build the stage's data only when it is to be trained
            replayed = self.rehearsal(tasks[:-1], tasks[-1], init)
            data = list(tasks[-1].instances) + replayed
            sizes = {"instances": len(data), "rehearsal": len(replayed)}
            key, metrics = self.single.fit(data, init, desc=f"{self.label} stage {stage + 1}", key=key, meta=sizes)
        self.keys = self.keys[:stage] + [key]
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_path.write_text(json.dumps(self.keys))
        return metrics

    def trainable_parameters(self) -> int:
        return self.single.parameters_of(self.keys[-1]) if self.keys else 0
