"""One batch of queries on its way through the experts on vLLM, each query at its own pace.

Owns `Walks`: every query's next request is sent the moment its previous one finishes
(`RequestLoop`), so one query's next check runs beside another's answer. A query whose answer is
greedy and plain (no stop strings, no logprobs, routed on its whole prompt, one-token indicators)
is checked with requests that go on into the answer when they claim (`claim_and_answer_params`):
the claimant's check is then its answer's prompt pass, and a check that does not claim is stopped
after its first token. Other queries are checked with one-token requests and answered by a request
of their own. Base-model answers are sent by `answer_base` once the experts' requests are done
(vllm_requests.py: vLLM's CPU LoRA ops). Does not own the routing rule (`routing.next_in_walk`,
`verdict`), the requests (vllm_requests.py) or the engine (vllm_engine.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from seecl.serving.routing import BASE, Answer, Query, Route, Sampling, next_in_walk, threshold_for
from seecl.serving.vllm_loop import RequestLoop
from seecl.serving.vllm_requests import (
    answer_from_claim,
    answer_requests,
    check_requests,
    claim_and_answer_params,
    first_token,
    output_tokens,
    prefix_requests,
    verdict,
)

if TYPE_CHECKING:
    from seecl.serving.vllm_engine import VllmEngine


class Walks:
    """Route and answer `queries` (their Answers are filled in place) with `engine`'s experts."""

    def __init__(
        self,
        engine: VllmEngine,
        loop: RequestLoop,
        experts: list[str],
        queries: list[Query],
        samplings: list[Sampling],
        answers: list[Answer],
    ):
        self.engine, self.loop, self.experts = engine, loop, experts
        self.samplings, self.answers = samplings, answers
        formatter = engine.formatter
        self.answer_ids = [formatter.chat_ids(q.turns()) for q in queries]
        self.check_ids = [formatter.prompt_ids(q.text) for q in queries]
        self.trails: list[list] = [[] for _ in queries]
        self.for_base: list[int] = []
        for index, query in enumerate(queries):
            if query.owner is not None:
                self._routed(index, Route(query.owner, "requested", []))
            else:
                self._advance(index)

    def answer_base(self) -> None:
        """Send the base model's answers (run the loop again afterwards)."""
        for index in self.for_base:
            self._answer(index, BASE, [], self.samplings[index])

    # -- one query's walk --------------------------------------------------------------------------------
    def _advance(self, index: int, answered: bool = False) -> None:
        step = next_in_walk(self.experts, self.trails[index])
        if isinstance(step, Route):
            self._routed(index, step, answered)
        else:
            self._check(index, step)

    def _routed(self, index: int, route: Route, answered: bool = False) -> None:
        self.answers[index].route = route
        if answered or self.samplings[index].max_tokens == 0:
            return
        if route.answered_by == BASE:
            self.for_base.append(index)
        else:
            self._answer(index, route.answered_by, [], self.samplings[index])

    def _combines(self, index: int) -> bool:
        sampling = self.samplings[index]
        return (
            sampling.max_tokens > 0
            and sampling.greedy
            and not sampling.stop
            and sampling.logprobs is None
            and not self.engine.indicators.shared_prefix
            and self.check_ids[index] == self.answer_ids[index]
        )

    def _check(self, index: int, expert: str) -> None:
        engine = self.engine
        lora = engine.loras[expert]
        if self._combines(index):
            params = claim_and_answer_params(
                engine.indicators,
                engine.specific_ids,
                engine.top_k,
                self.samplings[index].max_tokens,
                engine.formatter.eos_id,
            )
            claim = _CombinedCheck(self, index, expert)
            self.loop.submit(self.check_ids[index], params, lora, claim.on_output, watch=True)
            return
        [request] = check_requests([self.check_ids[index]], engine.indicators, lora, engine.specific_ids, engine.top_k)

        def checked(output, final: bool) -> None:
            token, logprobs = first_token(output)
            ind = engine.indicators
            if ind.shared_prefix and token in (ind.pos_id, ind.neg_id):
                [greedy] = prefix_requests([self.check_ids[index]], ind, lora)

                def prefixed(prefix_output, final: bool) -> None:
                    self._verdict(index, expert, token, logprobs, output_tokens(prefix_output))
                    self._advance(index)

                self.loop.submit(greedy.prompt_token_ids, greedy.params, lora, prefixed)
            else:
                self._verdict(index, expert, token, logprobs, None)
                self._advance(index)

        self.loop.submit(request.prompt_token_ids, request.params, lora, checked)

    def _verdict(self, index: int, expert: str, token: int, logprobs: dict[int, float], prefix) -> str:
        threshold = threshold_for(self.engine.threshold, expert)
        check = verdict(expert, token, logprobs, self.engine.indicators, prefix, threshold)
        self.trails[index].append(check)
        return check.verdict

    def _answer(self, index: int, responder: str, head: list[int], sampling: Sampling) -> None:
        """The answer of `responder` after `head`, tokens of it already decided."""
        engine, expert = self.engine, responder != BASE
        [request] = answer_requests(
            [[*self.answer_ids[index], *(engine.indicators.pos_ids if expert else ()), *head]],
            [replace(sampling, max_tokens=sampling.max_tokens - len(head))],
            engine.formatter.eos_id,
            (),
            engine.loras[responder] if expert else None,
            engine.blocked_words,
        )

        def answered(output, final: bool) -> None:
            completion = output.outputs[0]
            engine.fill(self.answers[index], head + output_tokens(output), completion.finish_reason, sampling)

        self.loop.submit(request.prompt_token_ids, request.params, request.lora, answered)


class _CombinedCheck:
    """One combined check's outputs: its first token decides; a claim's answer is read as it grows."""

    def __init__(self, walks: Walks, index: int, expert: str):
        self.walks, self.index, self.expert = walks, index, expert
        self.claimed: bool | None = None

    def on_output(self, output, final: bool) -> bool:
        walks, index = self.walks, self.index
        engine = walks.engine
        tokens = output_tokens(output)
        if not tokens:
            return False
        if self.claimed is None:
            token, logprobs = first_token(output)
            claims = walks._verdict(index, self.expert, token, logprobs, None) == "pos"
            # A claim by threshold whose first token is not `<<pos>>` gets an answer request of its own.
            self.claimed = claims and token == engine.indicators.pos_id
            walks._advance(index, answered=self.claimed)
            if not self.claimed:
                return True
        ind = engine.indicators
        answer, goes_on = answer_from_claim(tokens[1:], engine.formatter.eos_id, ind.neg_id, ind.blocked_in_answers)
        sampling = walks.samplings[index]
        if goes_on and len(answer) < sampling.max_tokens:
            walks._answer(index, self.expert, answer, sampling)
            return True
        if final or goes_on:
            reason = "length" if goes_on else output.outputs[0].finish_reason
            engine.fill(walks.answers[index], answer, reason, sampling)
            return True
        return False
