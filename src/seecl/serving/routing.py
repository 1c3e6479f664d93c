"""Sequential routing (docs/design.md §1): experts are asked newest first; the first `<<pos>>` answers.

Owns the decision rule (`decide`, `indicator_verdict`), the walk over experts (`walk`, pure and
testable with any check function), what a backend is asked (`Query`, `Sampling`) and returns
(`Check`, `Route`, `Answer`, and `Delta` while an answer is being decoded) and the `RoutingBackend`
protocol they implement. How a check is computed is each backend's business.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import torch

from seecl.model.indicators import Indicators

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
    reason: str  # "claimed" | "all_negative" | "exception" | "no_experts" | "requested" (Query.owner)
    checks: list[Check] = field(default_factory=list)


@dataclass(frozen=True)
class Query:
    """A query with more than its text: a conversation, or an answerer named by the caller.

    Routing reads `text` alone, the last user turn: experts learned to claim single-turn queries.
    The answer is decoded after the whole conversation (`history`, then `text`). `owner` (an expert
    or BASE) answers without routing; the route then says "requested". A plain string is a Query
    with no history and no owner.
    """

    text: str
    history: tuple[tuple[str, str], ...] = ()  # earlier (role, content) turns, role "user" or "assistant"
    owner: str | None = None

    def turns(self) -> list[tuple[str, str]]:
        return [*self.history, ("user", self.text)]


def as_query(query: str | Query) -> Query:
    return query if isinstance(query, Query) else Query(query)


def query_text(query: str | Query) -> str:
    return query.text if isinstance(query, Query) else query


@dataclass(frozen=True)
class Sampling:
    """How one answer is decoded once routing has chosen who answers. The routing decision itself
    is always the greedy (or thresholded) indicator, whatever these say."""

    max_tokens: int = 64  # 0: route only, generate nothing
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # a fixed seed gives the same sample on every call
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and the top k alternatives

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_p <= 0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the `top` most likely tokens at its position, from
    the model's distribution with the indicator tokens removed (before temperature and top_p)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass
class Answer:
    query: str | Query
    text: str
    route: Route
    # The generated ids (no indicator, no end-of-turn); with a stop string, up to the token that
    # completed it (the text ends before the stop string).
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop" (end of turn or a stop string) | "length" (budget) | "cancelled"
    logprobs: list[TokenLogprob] | None = None  # one per token id, when Sampling.logprobs asked for them

    def to_dict(self) -> dict:
        return {
            "query": query_text(self.query),
            "answer": self.text,
            "answered_by": self.route.answered_by,
            "reason": self.route.reason,
            "checks": [asdict(c) for c in self.route.checks],
        }


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
    produced = all(int(logprobs[position].argmax()) == token for position, token in enumerate(prefix))
    return indicator_verdict(int(final.argmax()), p_pos, p_neg, indicators, threshold, produced), p_pos, p_neg


def indicator_verdict(
    top: int,
    p_pos: float,
    p_neg: float,
    indicators: Indicators,
    threshold: float | None = None,
    prefix_produced: bool = True,
) -> str:
    """The decision rule, shared by every backend: `top` is the argmax token at the decision
    position and `prefix_produced` whether the indicators' shared prefix (if any) was the greedy
    continuation before it. Neither indicator, or no prefix -> "neither"; otherwise the argmax, or
    with a threshold "pos" iff P(pos) / (P(pos) + P(neg)) >= threshold."""
    if not prefix_produced or top not in (indicators.pos_id, indicators.neg_id):
        return "neither"
    if threshold is not None:
        total = p_pos + p_neg
        return "pos" if total > 0 and p_pos / total >= threshold else "neg"
    return "pos" if top == indicators.pos_id else "neg"


@dataclass(frozen=True)
class Delta:
    """What one decoding step added to one answer, handed to an `OnToken` callback as it happens.

    `text` concatenates, over a query's deltas, to its answer's text: a piece is held back while it
    may still change (an unfinished multi-byte character, trailing whitespace, the start of a stop
    string), so it may be "" for a token. The last delta of a query carries the whole `answer`.
    """

    text: str
    token_id: int | None = None  # None on the closing delta
    logprob: TokenLogprob | None = None
    answer: Answer | None = None


# Called from the decoding thread as each answer token is produced: (query index, delta). Returning
# False stops that query's answer (finish_reason "cancelled"); None or True go on.
OnToken = Callable[[int, Delta], "bool | None"]


CheckFn = Callable[[str, list[int]], list[Check]]


# One threshold for every expert, one per expert (calibrated), or None for the greedy indicator.
Thresholds = float | dict[str, float] | None


def threshold_for(thresholds: Thresholds, expert: str) -> float | None:
    return thresholds.get(expert) if isinstance(thresholds, dict) else thresholds


def check_owners(queries: Sequence[Query], experts: Sequence[str]) -> None:
    """Every owner a query names is one of `experts` or BASE."""
    for query in queries:
        if query.owner is not None and query.owner != BASE and query.owner not in experts:
            raise ValueError(f"no expert named {query.owner!r} to answer with")


def routes_with_owners(
    queries: Sequence[Query], experts: Sequence[str], walk_unowned: Callable[[list[Query]], list[Route]]
) -> list[Route]:
    """The routes of `queries`: a query that names its owner is answered by it without a walk
    ("requested"); the others get `walk_unowned(those queries)`, in order."""
    check_owners(queries, experts)
    walked = iter(walk_unowned([q for q in queries if q.owner is None]))
    return [Route(q.owner, "requested", []) if q.owner is not None else next(walked) for q in queries]


def next_in_walk(experts: Sequence[str], trail: Sequence[Check]) -> str | Route:
    """One query's walk after the checks in `trail`: the next expert to ask (newest first; `experts`
    oldest first, as an ensemble lists them), or its Route once decided. A `pos` claims, `neither`
    sends the query to the base model, a `neg` passes it on."""
    if trail:
        last = trail[-1]
        if last.verdict == "pos":
            return Route(last.expert, "claimed", list(trail))
        if last.verdict != "neg":
            return Route(BASE, "exception", list(trail))
    if len(trail) < len(experts):
        return experts[len(experts) - 1 - len(trail)]
    return Route(BASE, "all_negative" if experts else "no_experts", list(trail))


def walk(n_queries: int, experts: Sequence[str], check: CheckFn) -> list[Route]:
    """Route every query through `experts`, level by level: `check(expert, query_indices)` is
    asked for the still-open queries only (they all wait for the same expert)."""
    trails: list[list[Check]] = [[] for _ in range(n_queries)]
    routes: list[Route | None] = [None] * n_queries
    while True:
        asked: dict[str, list[int]] = {}
        for index, route in enumerate(routes):
            if route is None:
                step = next_in_walk(experts, trails[index])
                if isinstance(step, Route):
                    routes[index] = step
                else:
                    asked.setdefault(step, []).append(index)
        if not asked:
            return routes  # type: ignore[return-value]
        for expert, indices in asked.items():
            for index, result in zip(indices, check(expert, indices)):
                trails[index].append(result)


# How to answer: a greedy token budget or a Sampling, for every query or one per query.
Budget = int | Sampling | Sequence[int | Sampling]


def samplings_for(n_queries: int, budget: Budget) -> list[Sampling]:
    items = [budget] * n_queries if isinstance(budget, (int, Sampling)) else list(budget)
    if len(items) != n_queries:
        raise ValueError(f"{len(items)} budgets for {n_queries} queries")
    return [item if isinstance(item, Sampling) else Sampling(max_tokens=item) for item in items]


class UnsupportedSampling(ValueError):
    """The backend cannot decode the way a Sampling asks (e.g. a greedy-only backend asked to sample)."""


def budgets_for(n_queries: int, budget: Budget) -> list[int]:
    """Greedy token budgets, for backends that decode greedily only."""
    samplings = samplings_for(n_queries, budget)
    for sampling in samplings:
        if not sampling.greedy or sampling.stop or sampling.logprobs is not None:
            raise UnsupportedSampling("this backend decodes greedily, without stop strings or logprobs")
    return [s.max_tokens for s in samplings]


@runtime_checkable
class RoutingBackend(Protocol):
    """What answers queries through a SEE ensemble: the reference router, the fast engine, the
    vLLM engine and `SeeEnsemble` itself. One return type each; a query's route is the same
    whichever backend computes it (tested in tests/test_backends.py)."""

    def experts(self) -> list[str]:
        """The experts routing asks, oldest first (newest is asked first)."""

    def route(self, queries: Sequence[str]) -> list[Route]:
        """Only the routing decisions, no answers."""

    def ask(
        self, queries: Sequence[str | Query], max_new_tokens: Budget = 64, on_token: OnToken | None = None
    ) -> list[Answer]:
        """Answers with their routes; a budget of 0 only routes the query. An int is a greedy budget.
        `on_token`, when given, sees every answer grow (a backend may call it only once per query,
        with the whole answer, when it cannot stream)."""


@runtime_checkable
class ScoresPerplexity(Protocol):
    """Backends (and methods) that score reference responses: each (q, r) by the expert q is routed to.
    `owners`, when given, are those experts (routes taken earlier on the same model), and nothing is
    routed again."""

    def perplexity(
        self, queries: Sequence[str], responses: Sequence[str], owners: Sequence[str] | None = None
    ) -> float: ...
