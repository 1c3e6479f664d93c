"""SSR, self-synthesized rehearsal (Huang et al., 2024), on one sequentially fine-tuned LoRA.

At stage i > 1, for every earlier task j:
1. the *base* model writes new task inputs by in-context learning from a few stored real
   demonstrations of task j (each candidate sees a different seeded choice and order of them, so
   greedy decoding still yields different inputs);
2. the *latest* model (the adapter after stage i-1) answers each synthetic query, refining the
   synthetic instance's output;
3. round(tau * |D_j|) of the synthetic instances are kept, the ones nearest to the k-means
   centres of their sentence embeddings (diverse), and replayed with task i's data.
The synthetic instances of a stage are written to disk and reused when a run resumes; a stage's
adapter is cached under a key named by its inputs, not by the synthetic text, so a finished stage
is neither synthesized nor trained again on another machine, whose greedy decoding may write other
text. SSR keeps only `demonstrations` real instances per task (for the prompts), never the task's data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from seecl.cache import cache_key
from seecl.data.task import Instance, Task
from seecl.methods.base import MethodContext
from seecl.methods.replay import Replay
from seecl.progress import tracking
from seecl.see.reconstruction import negatives_count


def split_definition(task: Task) -> tuple[str, list[str]]:
    """(shared instruction, per-instance inputs): SuperNI queries are Definition + "\\n\\n" + input."""
    queries = [i.query for i in task.instances]
    prefix = queries[0]
    for query in queries[1:]:
        while not query.startswith(prefix):
            prefix = prefix[:-1]
    cut = prefix.rfind("\n\n")
    definition = prefix[:cut] if cut > 0 else ""
    start = len(definition) + 2 if definition else 0
    return definition, [q[start:] for q in queries]


def synthesis_prompt(definition: str, demos: Sequence[str]) -> str:
    shown = "\n\n".join(f"Input: {d}" for d in demos)
    head = f"{definition}\n\n" if definition else ""
    return (
        f"{head}Here are example inputs for this task:\n\n{shown}\n\n"
        "Write one new input for this task, different from the examples. Reply with the input only."
    )


class SelfSynthesizedRehearsal(Replay):
    def __init__(
        self,
        ctx: MethodContext,
        label: str = "SSR",
        tau: float = 0.1,
        demonstrations: int = 8,
        shots: int = 3,
        oversample: float = 2.0,
        max_input_tokens: int = 256,
    ):
        super().__init__(ctx, label, tau)
        self.demonstrations, self.shots, self.oversample = demonstrations, shots, oversample
        self.max_input_tokens = max_input_tokens

    def stage_key(self, tasks: Sequence[Task], init: str | None) -> str | None:
        """A stage with synthetic rehearsal is named by what produces it (the previous adapter, the
        real data, SSR's settings), not by the synthetic text: greedy decoding on another machine or
        thread count writes other text, which would make every finished stage train again there."""
        if len(tasks) == 1:
            return None  # no rehearsal: the task's own data names the stage
        return cache_key(
            kind="ssr-stage",
            stage=self.single.key(tasks[-1].instances, init),
            earlier=[(task.name, task.fingerprint()) for task in tasks[:-1]],
            ssr=[self.tau, self.demonstrations, self.shots, self.oversample, self.max_input_tokens],
            seed=self.ctx.config.see.seed,
        )

    def rehearsal(self, earlier: Sequence[Task], new: Task, init: str | None) -> list[Instance]:
        if not earlier:
            return []
        self.single.activate(init)  # the latest model refines the synthetic outputs
        return self.synthesize(earlier, len(earlier))

    def synthesize(self, earlier: Sequence[Task], stage: int) -> list[Instance]:
        path = self.ctx.workdir / "synthetic" / f"stage{stage + 1}.jsonl"
        if path.exists():
            return [
                Instance(r["id"], r["query"], (r["response"],)) for r in map(json.loads, path.read_text().splitlines())
            ]
        seed, progress = self.ctx.config.see.seed, self.ctx.config.train.progress
        fmt = self.single.formatter
        chosen: list[Instance] = []
        for task in earlier:
            k = negatives_count(self.tau, len(task))
            if k == 0:
                continue
            definition, inputs = split_definition(task)
            rng = random.Random(f"ssr:{seed}:{task.name}")
            pool = rng.sample(inputs, min(self.demonstrations, len(inputs)))
            n = max(k, round(k * self.oversample))
            prompts = []
            for c in range(n):
                demos = random.Random(f"ssr:{seed}:{task.name}:{stage}:{c}").sample(pool, min(self.shots, len(pool)))
                prompts.append(fmt.prompt_ids(synthesis_prompt(definition, demos)))
            budget = min(self.max_input_tokens, max(len(fmt.text_ids(d)) for d in pool) + 8)
            # bars over the inputs written and the answers: a stage's synthesis takes minutes on a CPU
            with tracking(n, f"{self.label} stage {stage + 1} {task.name} inputs", progress):
                new_inputs = self.single.generate(prompts, [budget] * n, use_adapter=False)
            unique = [x for x in dict.fromkeys(x.strip() for x in new_inputs) if x and x not in inputs]
            queries = [f"{definition}\n\n{x}" if definition else x for x in unique]
            if not queries:
                continue
            budgets = [fmt.answer_budget([r for i in task.instances for r in i.references])] * len(queries)
            with tracking(len(queries), f"{self.label} stage {stage + 1} {task.name} answers", progress):
                outputs = self.single.generate([fmt.prompt_ids(q) for q in queries], budgets)
            candidates = [
                Instance(f"ssr-{task.name}-{stage + 1}-{i}", q, (o,))
                for i, (q, o) in enumerate(zip(queries, outputs))
                if o.strip()
            ]
            chosen.extend(self._select(candidates, k, seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "".join(
                json.dumps({"id": i.id, "query": i.query, "response": i.response}, ensure_ascii=False) + "\n"
                for i in chosen
            )
        )
        return chosen

    @staticmethod
    def _select(candidates: list[Instance], k: int, seed: int) -> list[Instance]:
        if len(candidates) <= k:
            return candidates
        from seecl.embeddings import embed, kmeans_representatives

        vectors = embed([c.query for c in candidates])
        return [candidates[i] for i in kmeans_representatives(vectors, k, seed)]
