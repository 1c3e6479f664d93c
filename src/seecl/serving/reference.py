"""The reference router: the straightforward implementation every faster backend must equal.

One prompt pass per expert for the still-open queries, then one generation pass per answering
expert and one for the base model, on a PEFT model holding one adapter per expert. Slow, simple and
obviously right; the engine and the vLLM backend are tested against its routes and answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from seecl.data.prompts import PromptFormatter
from seecl.model.generation import greedy_generate, last_logprobs
from seecl.model.indicators import Indicators
from seecl.serving.routing import (
    BASE,
    Answer,
    Budget,
    Check,
    Delta,
    OnToken,
    Query,
    Route,
    Thresholds,
    as_query,
    budgets_for,
    decide,
    routes_with_owners,
    threshold_for,
    walk,
)


class SequentialRouter:
    """Reference router over a PEFT model holding one adapter per expert (oldest first)."""

    def __init__(
        self,
        model,
        formatter: PromptFormatter,
        experts: Sequence[str],
        threshold: Thresholds = None,
        batch_size: int = 16,
    ):
        self.model = model
        self.formatter = formatter
        self.indicators: Indicators = formatter.indicators  # type: ignore[assignment]
        self._experts = list(experts)
        self.threshold = threshold
        self.batch_size = batch_size
        self.pad_id = formatter.tokenizer.pad_token_id

    def _use(self, expert: str | None):
        """Context with `expert`'s adapter active, or the plain base model for None."""
        if expert is None:
            return self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        self.model.set_adapter(expert)
        return contextlib.nullcontext()

    def check(self, expert: str, prompts: list[list[int]]) -> list[Check]:
        prefix = list(self.indicators.shared_prefix)
        with self._use(expert):
            logprobs = last_logprobs(
                self.model, [p + prefix for p in prompts], len(prefix) + 1, self.pad_id, self.batch_size
            )
        threshold = threshold_for(self.threshold, expert)
        return [Check(expert, *decide(lp, self.indicators, threshold)) for lp in logprobs]

    def experts(self) -> list[str]:
        return list(self._experts)

    def _walk(self, prompts: list[list[int]]) -> list[Route]:
        return walk(len(prompts), self._experts, lambda expert, idx: self.check(expert, [prompts[i] for i in idx]))

    def route(self, queries: Sequence[str | Query]) -> list[Route]:
        return self._routes([as_query(q) for q in queries])

    def _routes(self, queries: list[Query]) -> list[Route]:
        return routes_with_owners(
            queries, self._experts, lambda unowned: self._walk([self.formatter.prompt_ids(q.text) for q in unowned])
        )

    def ask(
        self, queries: Sequence[str | Query], max_new_tokens: Budget = 64, on_token: OnToken | None = None
    ) -> list[Answer]:
        """Answer a batch of queries; every answer carries its route. Greedy only; `on_token` is
        called once per query, with the whole answer."""
        budgets = budgets_for(len(queries), max_new_tokens)
        asked = [as_query(q) for q in queries]
        routes = self._routes(asked)
        # A conversation is routed on its last user turn and answered after all of its turns.
        prompts = [self.formatter.chat_ids(q.turns()) for q in asked]
        outputs: list[list[int]] = [[] for _ in asked]
        for responder in [*self._experts, BASE]:
            members = [i for i, r in enumerate(routes) if r.answered_by == responder and budgets[i] > 0]
            if not members:
                continue
            pos = list(self.indicators.pos_ids) if responder != BASE else []
            with self._use(None if responder == BASE else responder):
                generated = greedy_generate(
                    self.model,
                    [prompts[i] + pos for i in members],
                    [budgets[i] for i in members],
                    self.formatter.eos_id,
                    self.pad_id,
                    self.batch_size,
                    self.indicators.blocked_in_answers,
                )
            for index, tokens in zip(members, generated):
                outputs[index] = tokens
        answers = []
        for index, (query, route, tokens) in enumerate(zip(queries, routes, outputs)):
            # greedy_generate cuts at the end of turn: an answer as long as its budget did not reach one
            finish = "length" if len(tokens) >= budgets[index] else "stop"
            answers.append(Answer(query, self.formatter.decode(tokens), route, tokens, finish))
            if on_token is not None:
                on_token(index, Delta(answers[-1].text, None, None, answers[-1]))
        return answers
