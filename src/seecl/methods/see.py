"""SEE, the Sequential Ensemble of Experts (docs/design.md §1), over an ensemble directory.

Owns task reconstruction (positives with `<<pos>>`, tau-sampled `<<neg>>` queries of every earlier
task from the ensemble's query memory), training one fresh LoRA expert per task on the frozen base,
publishing it through the store, and answering queries by sequential routing. The training loop,
the on-disk format and the routing rule live in training.py, store.py and routing.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

from seecl.config import RunConfig, to_dict
from seecl.data.task import Task
from seecl.errors import StoreError
from seecl.see.ensemble import SeeEnsemble
from seecl.serving.routing import Answer


class SeeMethod:
    """SEE behind the Method protocol (evaluation/protocol.py): one ensemble per configuration."""

    schedule = "sequential"
    routed = True
    stage_cache = True

    def __init__(self, ctx, label: str, overrides: list[str] | None = None, general: Task | None = None):
        """`overrides` turn the run config into this label's recipe; `general` is the general
        instruction set its general or pseudo negatives come from (None: the ensemble's own)."""
        from seecl.config import from_dict, merge_overrides

        self.ctx, self.label, self.general = ctx, label, general
        config = from_dict(RunConfig, merge_overrides(to_dict(ctx.config), overrides or []))
        self.ensemble = SeeEnsemble(ctx.workdir / "ensemble", config)

    def learn(self, tasks: Sequence[Task]) -> dict:
        task, seen = tasks[-1], [t.name for t in tasks]
        stored = self.ensemble.store.expert_names() if self.ensemble.store.exists() else []
        trained_on = {e["name"]: e.get("data_fingerprint") for e in self.ensemble.store.records()} if stored else {}
        changed = [t.name for t in tasks if t.name in trained_on and trained_on[t.name] != t.fingerprint()]
        if changed:
            # The run's ensemble is a working copy: every finished expert is also in the adapter
            # cache, so an ensemble built on other data is rebuilt rather than routed through.
            print(
                f"  {self.label}: the data of {', '.join(changed)} changed since its expert was trained; "
                f"rebuilding {self.ensemble.store.root}",
                flush=True,
            )
            config, root = self.ensemble.config, self.ensemble.store.root
            shutil.rmtree(root)
            self.ensemble = SeeEnsemble(root, config)
            stored = []
        if stored[: len(seen)] != seen[: len(stored)]:
            raise StoreError(
                f"{self.ensemble.store.root} holds experts {stored}, learned in another "
                f"order than this run's tasks {seen}"
            )
        self.ensemble.visible = len(seen)  # later experts of a resumed run stay out of this stage
        if task.name in stored:
            record = next(e for e in self.ensemble.store.records() if e["name"] == task.name)
            return {**record["metrics"], "cached": True, "cache_key": record.get("cache_key")}
        record = self.ensemble.learn(task, general=self.general, cache=self.ctx.cache)
        negatives = sum(record["n_negatives"].values())
        return {
            **record["metrics"],
            "cached": record["from_cache"],
            "negatives": negatives,
            "cache_key": record["cache_key"],
        }

    def answer(self, queries, budgets) -> list[Answer]:
        return self.ensemble.ask(list(queries), list(budgets))

    def routes(self, queries):
        return self.ensemble.route(list(queries))

    def perplexity(self, queries, responses, owners=None) -> float:
        return self.ensemble.engine().perplexity(list(queries), list(responses), owners)

    def trainable_parameters(self) -> int:
        routed = set(self.ensemble.experts())
        return sum(int(e.get("trainable_parameters", 0)) for e in self.ensemble.store.records() if e["name"] in routed)

    def close(self) -> None:
        self.ensemble = None
