"""Sequential routing (DESIGN §1): experts are asked newest first; the first `<<pos>>` answers.

Owns the decision rule (`decide`), the walk over experts (`walk`, pure and testable with any
check function) and `SequentialRouter`, the straightforward reference implementation on a PEFT
model: one prompt pass per expert for the still-unclaimed queries, then one generation pass per
answering expert and one for the base model. Faster engines must give the same routes and answers.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from .data.prompts import PromptFormatter
from .generation import greedy_generate, last_logprobs
from .indicators import Indicators

BASE = "base"


@dataclass
class Check:
    """One expert's look at one query."""

    expert: str
    verdict: str  # "pos" | "neg" | "neither"
    p_pos: float
    p_neg: float


@dataclass
class Route:
    answered_by: str  # expert name or "base"
    reason: str  # "claimed" | "all_negative" | "exception" | "no_experts"
    checks: list[Check] = field(default_factory=list)


@dataclass
class Answer:
    query: str
    text: str
    route: Route

    def to_dict(self) -> dict:
        return {"query": self.query, "answer": self.text, "answered_by": self.route.answered_by,
                "reason": self.route.reason, "checks": [asdict(c) for c in self.route.checks]}


def decide(logprobs: torch.Tensor, indicators: Indicators, threshold: float | None = None) -> tuple[str, float, float]:
    """Verdict from next-token log-probs at the last k+1 positions (k = shared indicator prefix).

    Greedy: the shared prefix must itself be the argmax at its positions; then the argmax at the
    decision position is `pos`, `neg` or neither. A threshold only makes a claim stricter: when the
    argmax is an indicator, the query is claimed iff P(pos) / (P(pos) + P(neg)) >= threshold, else
    passed on; an expert that produces neither indicator still sends the query to the base model
    (passing such queries on let the first expert, which never saw a negative, claim 89 of 100
    OOD queries in the SuperNI benchmark).
    """
    prefix = indicators.shared_prefix
    final = logprobs[len(prefix)]
    p_pos = math.exp(float(final[indicators.pos_id]))
    p_neg = math.exp(float(final[indicators.neg_id]))
    for position, token in enumerate(prefix):
        if int(logprobs[position].argmax()) != token:
            return "neither", p_pos, p_neg
    return indicator_verdict(int(final.argmax()), p_pos, p_neg, indicators, threshold), p_pos, p_neg


def indicator_verdict(top: int, p_pos: float, p_neg: float, indicators: Indicators,
                      threshold: float | None = None) -> str:
    """The rule at the decision position (after the shared prefix was produced), given its argmax
    token `top`: neither indicator -> "neither"; otherwise the argmax, or with a threshold "pos"
    iff P(pos) / (P(pos) + P(neg)) >= threshold. Shared by every backend."""
    if top not in (indicators.pos_id, indicators.neg_id):
        return "neither"
    if threshold is not None:
        total = p_pos + p_neg
        return "pos" if total > 0 and p_pos / total >= threshold else "neg"
    return "pos" if top == indicators.pos_id else "neg"


CheckFn = Callable[[str, list[int]], list[Check]]
# One threshold for every expert, one per expert (calibrated), or None for the greedy indicator.
Thresholds = float | dict[str, float] | None


def threshold_for(thresholds: Thresholds, expert: str) -> float | None:
    return thresholds.get(expert) if isinstance(thresholds, dict) else thresholds


def walk(n_queries: int, experts_newest_first: Sequence[str], check: CheckFn) -> list[Route]:
    """Route every query: `check(expert, query_indices)` is asked for the still-open queries."""
    trails: list[list[Check]] = [[] for _ in range(n_queries)]
    routes: list[Route | None] = [None] * n_queries
    open_queries = list(range(n_queries))
    for expert in experts_newest_first:
        if not open_queries:
            break
        results = check(expert, open_queries)
        still_open = []
        for index, result in zip(open_queries, results):
            trails[index].append(result)
            if result.verdict == "pos":
                routes[index] = Route(expert, "claimed", trails[index])
            elif result.verdict == "neg":
                still_open.append(index)
            else:
                routes[index] = Route(BASE, "exception", trails[index])
        open_queries = still_open
    reason = "all_negative" if experts_newest_first else "no_experts"
    for index in open_queries:
        routes[index] = Route(BASE, reason, trails[index])
    return routes  # type: ignore[return-value]


class SequentialRouter:
    """Reference router over a PEFT model holding one adapter per expert (oldest first)."""

    def __init__(self, model, formatter: PromptFormatter, experts: Sequence[str],
                 threshold: Thresholds = None, batch_size: int = 16):
        self.model = model
        self.formatter = formatter
        self.indicators: Indicators = formatter.indicators  # type: ignore[assignment]
        self.experts = list(experts)
        self.threshold = threshold
        self.batch_size = batch_size
        self.pad_id = formatter.tokenizer.pad_token_id

    def _use(self, expert: str | None):
        """Context with `expert`'s adapter active, or the plain base model for None."""
        if expert is None:
            return self.model.disable_adapter() if hasattr(self.model, "disable_adapter") \
                else contextlib.nullcontext()
        self.model.set_adapter(expert)
        return contextlib.nullcontext()

    def check(self, expert: str, prompts: list[list[int]]) -> list[Check]:
        prefix = list(self.indicators.shared_prefix)
        with self._use(expert):
            logprobs = last_logprobs(self.model, [p + prefix for p in prompts], len(prefix) + 1,
                                     self.pad_id, self.batch_size)
        threshold = threshold_for(self.threshold, expert)
        return [Check(expert, *decide(lp, self.indicators, threshold)) for lp in logprobs]

    def route(self, queries: Sequence[str]) -> tuple[list[list[int]], list[Route]]:
        prompts = [self.formatter.prompt_ids(q) for q in queries]
        routes = walk(len(queries), self.experts[::-1],
                      lambda expert, idx: self.check(expert, [prompts[i] for i in idx]))
        return prompts, routes

    def ask(self, queries: Sequence[str], max_new_tokens: int | Sequence[int] = 64) -> list[Answer]:
        """Answer a batch of queries; every answer carries its route."""
        budgets = [max_new_tokens] * len(queries) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        prompts, routes = self.route(queries)
        texts = [""] * len(queries)
        for responder in [*self.experts, BASE]:
            members = [i for i, r in enumerate(routes) if r.answered_by == responder]
            if not members:
                continue
            pos = list(self.indicators.pos_ids) if responder != BASE else []
            with self._use(None if responder == BASE else responder):
                outputs = greedy_generate(self.model, [prompts[i] + pos for i in members],
                                          [budgets[i] for i in members], self.formatter.eos_id,
                                          self.pad_id, self.batch_size, self.indicators.blocked_in_answers)
            for index, tokens in zip(members, outputs):
                texts[index] = self.formatter.decode(tokens)
        return [Answer(q, t, r) for q, t, r in zip(queries, texts, routes)]
