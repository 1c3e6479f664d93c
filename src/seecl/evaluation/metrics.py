"""Pure metric functions: ROUGE-L as SuperNI scores it, exact match, AR/BWT, routing metrics.

ROUGE-L follows SuperNI's official scorer: rouge-score's `rougeL` with Porter stemming, the
maximum over references, times 100. rouge-score's default tokenizer keeps only [a-z0-9], which
erases accented letters ("está" -> "est"), so non-English targets use `UnicodeTokenizer`
(lower-cased Unicode word characters, no stemming) instead; `language="en"` keeps the official one.
No model code here.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from functools import lru_cache

BASE = "base"


class UnicodeTokenizer:
    """Lower-cased runs of Unicode letters/digits; for targets outside English."""

    _word = re.compile(r"\w+", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        return self._word.findall(text.lower())


@lru_cache(maxsize=4)
def _scorer(language: str):
    from rouge_score import rouge_scorer

    if language == "en":
        return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=UnicodeTokenizer())


def rouge_l(prediction: str, references: Sequence[str] | str, language: str = "en") -> float:
    """ROUGE-L F-measure x 100, maximum over the references."""
    refs = [references] if isinstance(references, str) else list(references)
    scorer = _scorer(language)
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in refs)


def _normalize(text: str) -> str:
    text = text.lower().strip()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str] | str) -> float:
    """100 if the prediction equals a reference after lower-casing and dropping punctuation."""
    refs = [references] if isinstance(references, str) else list(references)
    return 100.0 * any(_normalize(prediction) == _normalize(r) for r in refs)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ----------------------------------------------------------------------------- continual metrics


def average_score(matrix: Sequence[Sequence[float | None]]) -> float:
    """AR: mean of the last stage's scores over all tasks."""
    last = [v for v in matrix[-1] if v is not None]
    return mean(last)


def backward_transfer(matrix: Sequence[Sequence[float | None]]) -> float | None:
    """BWT = mean over j < N of a[N][j] - a[j][j]; None with a single task."""
    n = len(matrix)
    if n < 2:
        return None
    diffs = [
        matrix[-1][j] - matrix[j][j] for j in range(n - 1) if matrix[-1][j] is not None and matrix[j][j] is not None
    ]
    return mean(diffs) if diffs else None


# ----------------------------------------------------------------------------- routing metrics


def confusion(
    true_tasks: Sequence[str], routed_to: Sequence[str], tasks: Sequence[str], experts: Sequence[str]
) -> list[list[int]]:
    """counts[i][k]: queries of tasks[i] answered by column k (experts..., then base)."""
    columns = list(experts) + [BASE]
    index = {c: k for k, c in enumerate(columns)}
    rows = {t: i for i, t in enumerate(tasks)}
    counts = [[0] * len(columns) for _ in tasks]
    for truth, routed in zip(true_tasks, routed_to):
        counts[rows[truth]][index[routed]] += 1
    return counts


def routing_prf(
    true_tasks: Sequence[str], routed_to: Sequence[str], tasks: Sequence[str], owner: dict[str, str] | None = None
) -> dict[str, dict[str, float]]:
    """Per task j: precision/recall/F1 of "a query of task j is answered by expert j".

    `owner` maps task -> expert name when they differ. Queries of other tasks (including OOD,
    labelled with any non-task string) answered by expert j count as false positives.
    """
    owner = owner or {}
    out = {}
    for task in tasks:
        expert = owner.get(task, task)
        tp = sum(1 for t, r in zip(true_tasks, routed_to) if t == task and r == expert)
        fp = sum(1 for t, r in zip(true_tasks, routed_to) if t != task and r == expert)
        fn = sum(1 for t, r in zip(true_tasks, routed_to) if t == task and r != expert)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[task] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    return out


def routing_prf_from_counts(
    confusion: list[list[int]], tasks: Sequence[str], columns: Sequence[str], ood_counts: dict[str, int] | None = None
) -> dict[str, dict[str, float]]:
    """`routing_prf` from a confusion matrix (rows: tasks, columns: experts + base); with
    `ood_counts` (answered-by counts of OOD queries) the OOD queries an expert claimed are its
    false positives as well. Without them it is the routing F1 of the tasks' own queries; RB-Acc
    reports the OOD claims on its own."""
    truth = [t for t, row in zip(tasks, confusion) for n in row for _ in range(n)]
    routed = [c for row in confusion for c, n in zip(columns, row) for _ in range(n)]
    ood = [c for c in columns for _ in range((ood_counts or {}).get(c, 0))]
    return routing_prf(truth + ["<ood>"] * len(ood), routed + ood, tasks)


def routing_accuracy(true_experts: Sequence[str], routed_to: Sequence[str]) -> float:
    """Share of queries answered by the expert they belong to."""
    return sum(t == r for t, r in zip(true_experts, routed_to)) / len(true_experts) if true_experts else float("nan")


def rb_acc(routed_to_for_ood: Sequence[str]) -> float:
    """RB-Acc: share of out-of-distribution queries answered by the base model."""
    return sum(r == BASE for r in routed_to_for_ood) / len(routed_to_for_ood) if routed_to_for_ood else float("nan")
