"""The evaluation protocol (docs/design.md §3): a method learns tasks in order and is scored after stages.

Owns the stage x task score matrix and its resumable state. After stage i a sequential method is
scored on task i (the diagonal a[i][i]) and, after the last stage, on every task (the final row);
`full_matrix` scores every seen task at every stage. Joint methods (MTL) get only the final row,
independent ones (AvgSTL) only the diagonal. Every scored cell is written to disk at once
(`protocol.json` plus the answers with their routes), so an interrupted run recomputes nothing
it finished: training is resumed by the methods themselves (cache, ensembles).
Routed methods also get routing metrics at the final stage and RB-Acc on OOD queries.

Every stored result carries a fingerprint of the data it was computed from (the training data of
the stage's tasks, the scored task's eval set and budget, the OOD queries); a result whose data has
changed since is dropped when the state is loaded and computed again, so a rerun on edited data
never reports a stale score.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from seecl.data.task import Task
from seecl.errors import SeeclError
from seecl.evaluation.metrics import (
    BASE,
    average_score,
    backward_transfer,
    confusion,
    exact_match,
    mean,
    rb_acc,
    rouge_l,
    routing_prf_from_counts,
)
from seecl.methods.base import Method
from seecl.progress import tracking
from seecl.publish import write_json_atomic
from seecl.serving.routing import ScoresPerplexity


@dataclass(frozen=True)
class EvalSet:
    task: Task  # eval instances of one task
    budget: int  # max_new_tokens for its answers
    language: str = "en"  # "en" uses rouge-score's tokenizer; anything else the Unicode one
    classification: bool = False  # also report exact match


class Protocol:
    def __init__(
        self,
        method: Method,
        train_tasks: Sequence[Task],
        eval_sets: dict[str, EvalSet],
        workdir: Path,
        ood_queries: Sequence[str] = (),
        full_matrix: bool = False,
        log: Callable[[str], None] = print,
        progress: bool = False,
        reuse: Sequence[Path] = (),
    ):
        """`progress` shows a bar with counts and ETA while each cell, the OOD routing and the
        perplexity are computed. `reuse` names other runs' working directories of this method
        with the same settings (the caller checks them): a cell they scored on the same data is
        copied instead of computed (e.g. the first five stages of a ten-task run)."""
        self.method, self.tasks, self.eval_sets = method, list(train_tasks), eval_sets
        self.progress, self.reuse = progress, [Path(p) for p in reuse]
        self.workdir, self.ood, self.full_matrix, self.log = Path(workdir), list(ood_queries), full_matrix, log
        self.path = self.workdir / "protocol.json"
        self.state = (
            json.loads(self.path.read_text())
            if self.path.exists()
            else {"label": method.label, "stages": {}, "cells": {}, "seconds": {"train": 0.0, "eval": 0.0}}
        )
        self._drop_stale()

    # -- data fingerprints -----------------------------------------------------------------------
    def stage_fingerprint(self, stage: int) -> str:
        """The training data a stage's model was built from (every task it learned, in order)."""
        tasks = dict(self.stages())[stage]
        return _digest(self.method.schedule, [[t.name, t.fingerprint()] for t in tasks])

    def cell_fingerprint(self, stage: int, task: str) -> str:
        eval_set = self.eval_sets[task]
        return _digest(
            self.stage_fingerprint(stage),
            task,
            eval_set.task.fingerprint(),
            eval_set.budget,
            eval_set.language,
            eval_set.classification,
        )

    def routing_fingerprint(self) -> str:
        final = self.stages()[-1][0]
        return _digest([self.cell_fingerprint(final, t) for t in self.cells_for(final)], self.ood)

    def perplexity_fingerprint(self) -> str:
        final = self.stages()[-1][0]
        return _digest(
            self.stage_fingerprint(final), [[n, e.task.fingerprint()] for n, e in sorted(self.eval_sets.items())]
        )

    def _drop_stale(self) -> None:
        """Forget every stored result whose data fingerprint is missing or differs from this run's."""
        dropped = []
        for key, cell in list(self.state["cells"].items()):
            stage, task = key.split(":", 1)
            if (
                task not in self.eval_sets
                or int(stage) >= len(self.tasks)
                or cell.get("fingerprint") != self.cell_fingerprint(int(stage), task)
            ):
                dropped.append(f"stage {int(stage) + 1} {task}")
                del self.state["cells"][key]
        for stage, metrics in list(self.state["stages"].items()):
            if int(stage) not in dict(self.stages()) or metrics.get("fingerprint") != self.stage_fingerprint(
                int(stage)
            ):
                del self.state["stages"][stage]
        stored = self.state.setdefault("fingerprints", {})
        for part, fingerprint in (("routing", self.routing_fingerprint), ("perplexity", self.perplexity_fingerprint)):
            if part in self.state and stored.get(part) != fingerprint():
                dropped.append(part)
                del self.state[part]
        if dropped:
            self.log(
                f"  {self.method.label}: the data changed since {', '.join(dropped)} "
                "were computed; computing them again"
            )

    # -- persistence -----------------------------------------------------------------------------
    def _save(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.state)

    def _predictions(self, stage: int, task: str) -> Path:
        return self.workdir / "predictions" / f"stage{stage + 1}-{task}.jsonl"

    # -- the run ---------------------------------------------------------------------------------
    def cells_for(self, stage: int) -> list[str]:
        names = [t.name for t in self.tasks]
        last = len(names) - 1
        if self.method.schedule == "joint":
            return names
        if self.method.schedule == "independent":
            return [names[stage]]
        if self.full_matrix or stage == last:
            return names[: stage + 1]
        return [names[stage]]

    def stages(self) -> list[tuple[int, list[Task]]]:
        if self.method.schedule == "joint":
            return [(len(self.tasks) - 1, self.tasks)]
        if self.method.schedule == "independent":
            return [(i, [t]) for i, t in enumerate(self.tasks)]
        return [(i, self.tasks[: i + 1]) for i in range(len(self.tasks))]

    def _reuse_cells(self) -> None:
        """Copy the cells (and their answers) other runs scored on the same data: same stage
        fingerprint, same eval set and budget."""
        wanted = {f"{s}:{t}": self.cell_fingerprint(s, t) for s, _ in self.stages() for t in self.cells_for(s)}
        before = len(self.state["cells"])
        for workdir in self.reuse:
            try:  # another run's state is only a source: unreadable, it offers nothing
                cells = json.loads((workdir / "protocol.json").read_text(encoding="utf-8")).get("cells", {})
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                cells = {}
            for key, fingerprint in wanted.items():
                cell = cells.get(key)
                if key in self.state["cells"] or not cell or cell.get("fingerprint") != fingerprint:
                    continue
                stage, task = key.split(":", 1)
                ours = self._predictions(int(stage), task)
                answers = workdir / ours.relative_to(self.workdir)
                if answers.is_file():
                    ours.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(answers, ours)
                self.state["cells"][key] = {**cell, "reused_from": str(workdir)}
                self.log(f"  {self.method.label} stage {int(stage) + 1} {task}: scored by {workdir}, reused")
        if len(self.state["cells"]) > before:
            self._save()

    def run(self) -> dict:
        self._reuse_cells()
        final_stage = self.stages()[-1][0]
        if self.method.routed and "routing" not in self.state:
            # routing is scored from the final row's answers; a copy of the run that kept only
            # protocol.json and the adapters (predictions quote the data) answers them again
            for name in (t.name for t in self.tasks):
                if not self._predictions(final_stage, name).is_file():
                    self.state["cells"].pop(f"{final_stage}:{name}", None)
        # routing and perplexity are scored on the final model, so its stage must be (re)loaded
        final_pending = (self.method.routed and "routing" not in self.state) or (
            isinstance(self.method, ScoresPerplexity) and "perplexity" not in self.state
        )
        for stage, tasks in self.stages():
            todo = [t for t in self.cells_for(stage) if f"{stage}:{t}" not in self.state["cells"]]
            later = any(
                f"{s}:{t}" not in self.state["cells"] for s, _ in self.stages() if s > stage for t in self.cells_for(s)
            )
            needed = todo or later or (final_pending and stage == final_stage)
            recorded = self.state["stages"].get(str(stage))
            # a stage trained before cache keys were recorded is loaded once more to record its key
            unkeyed = self.method.stage_cache and recorded is not None and not recorded.get("cache_key")
            if not needed and recorded is not None and not unkeyed:
                continue
            started = time.perf_counter()
            metrics = self.method.learn(tasks)
            metrics["trainable_parameters"] = self.method.trainable_parameters()
            if recorded is None or not metrics.get("cached"):
                self.state["stages"][str(stage)] = {**metrics, "fingerprint": self.stage_fingerprint(stage)}
                self.state["seconds"]["train"] += time.perf_counter() - started
                self._save()
            elif unkeyed and metrics.get("cache_key"):
                recorded["cache_key"] = metrics["cache_key"]
                self._save()
            for task in todo:
                self._score_cell(stage, task)
        if self.method.routed and "routing" not in self.state:
            self._score_routing()
        if isinstance(self.method, ScoresPerplexity) and "perplexity" not in self.state:
            started = time.perf_counter()
            total = sum(len(self.eval_sets[t.name].task) for t in self.tasks)
            with tracking(total, f"{self.method.label} perplexity", self.progress):
                self.state["perplexity"] = {
                    name: self.method.perplexity(
                        [i.query for i in self.eval_sets[name].task.instances],
                        [i.references[0] for i in self.eval_sets[name].task.instances],
                        self._final_routes(name),
                    )
                    for name in (t.name for t in self.tasks)
                }
            self.state["fingerprints"]["perplexity"] = self.perplexity_fingerprint()
            self.state["seconds"]["eval"] += time.perf_counter() - started
            self._save()
        return self.summary()

    def _score_cell(self, stage: int, task: str) -> None:
        eval_set = self.eval_sets[task]
        started = time.perf_counter()
        queries = [i.query for i in eval_set.task.instances]
        with tracking(len(queries), f"{self.method.label} stage {stage + 1} {task}", self.progress):
            answers = self.method.answer(queries, [eval_set.budget] * len(queries))
        rows = []
        for inst, answer in zip(eval_set.task.instances, answers):
            row = {
                "id": inst.id,
                **answer.to_dict(),
                "references": list(inst.references),
                "rouge_l": rouge_l(answer.text, inst.references, eval_set.language),
            }
            if eval_set.classification:
                row["exact_match"] = exact_match(answer.text, inst.references)
            rows.append(row)
        path = self._predictions(stage, task)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        cell = {
            "rouge_l": mean([r["rouge_l"] for r in rows]),
            "n": len(rows),
            "fingerprint": self.cell_fingerprint(stage, task),
        }
        if eval_set.classification:
            cell["exact_match"] = mean([r["exact_match"] for r in rows])
        self.state["cells"][f"{stage}:{task}"] = cell
        self.state["seconds"]["eval"] += time.perf_counter() - started
        self._save()
        self.log(f"  {self.method.label} stage {stage + 1} {task}: ROUGE-L {cell['rouge_l']:.1f}")

    def _final_routes(self, task: str) -> list[str] | None:
        """Who answered each eval query of `task` in the final row (its predictions file), so the
        perplexity scores the routes the routing metrics count instead of routing them again; None
        when the file is missing or was written for other instances."""
        path = self._predictions(self.stages()[-1][0], task)
        if not path.is_file():
            return None
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if [r.get("id") for r in rows] != [i.id for i in self.eval_sets[task].task.instances]:
            return None
        return [r["answered_by"] for r in rows]

    def _score_routing(self) -> None:
        """Routing metrics from the final row's answers, and RB-Acc from OOD routes only."""
        names = [t.name for t in self.tasks]
        truth, routed = [], []
        for task in names:
            owners = self._final_routes(task)
            if owners is None:
                path = self._predictions(self.stages()[-1][0], task)
                raise SeeclError(f"{path}: the final row's answers are missing or were written for other instances")
            truth += [task] * len(owners)
            routed += owners
        started = time.perf_counter()
        with tracking(len(self.ood), f"{self.method.label} OOD routing", self.progress):
            ood_routes = [r.answered_by for r in self.method.routes(self.ood)] if self.ood else []
        experts = list(names)
        self.state["routing"] = {  # precision/recall/F1 are derived from the counts in summary()
            "accuracy": mean([float(t == r) for t, r in zip(truth, routed)]),
            "columns": experts + [BASE],
            "confusion": confusion(truth, routed, names, experts),
            "ood_confusion": {c: ood_routes.count(c) for c in experts + [BASE]},
            "rb_acc": rb_acc(ood_routes) if ood_routes else None,
            "n_ood": len(ood_routes),
        }
        self.state["fingerprints"]["routing"] = self.routing_fingerprint()
        self.state["seconds"]["eval"] += time.perf_counter() - started
        self._save()

    # -- results ---------------------------------------------------------------------------------
    def matrix(self, key: str = "rouge_l") -> list[list[float | None]]:
        n = len(self.tasks)
        return [[self.state["cells"].get(f"{i}:{t.name}", {}).get(key) for t in self.tasks] for i in range(n)]

    def summary(self) -> dict:
        names = [t.name for t in self.tasks]
        matrix = self.matrix()
        if self.method.schedule == "independent":
            final = [matrix[j][j] for j in range(len(names))]
            bwt = None
        else:
            final = matrix[-1]
            bwt = backward_transfer(matrix) if self.method.schedule == "sequential" else None
        ar = average_score([final]) if all(v is not None for v in final) else None
        em = {}
        for j, name in enumerate(names):
            stage = j if self.method.schedule == "independent" else len(names) - 1
            value = self.state["cells"].get(f"{stage}:{name}", {}).get("exact_match")
            if value is not None:
                em[name] = value
        routing = self.state.get("routing")
        f1_with_ood = None
        if routing:
            counts = (routing["confusion"], names, routing["columns"])
            prf = routing_prf_from_counts(*counts)
            routing = {**routing, "per_task": prf, "f1": mean([v["f1"] for v in prf.values()])}
            if routing.get("n_ood"):
                with_ood = routing_prf_from_counts(*counts, routing["ood_confusion"])
                f1_with_ood = mean([v["f1"] for v in with_ood.values()])
        # one entry per task position (None where the method has no stage, e.g. MTL before the end)
        parameters = [self.state["stages"].get(str(i), {}).get("trainable_parameters") for i in range(len(names))]
        return {
            "AR": ar,
            "BWT": bwt,
            "matrix": matrix,
            "per_task": {n: v for n, v in zip(names, final)},
            "exact_match": em,
            "routing_f1": routing["f1"] if routing else None,
            "routing_f1_with_ood": f1_with_ood,
            "rb_acc": routing["rb_acc"] if routing else None,
            "routing": routing,
            "perplexity": self.state.get("perplexity"),
            "trainable_parameters": parameters,
            "seconds": {k: round(v, 1) for k, v in self.state["seconds"].items()},
            "reused_cells": sum(1 for c in self.state["cells"].values() if "reused_from" in c),
        }


def _digest(*material) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
