"""The fast routing engine: the routes and greedy answers of `routing.SequentialRouter`, with less work.

Owns how a batch of queries is routed through the experts of a PEFT model and answered:

- batched routing: the still-open queries go through the newest expert together; claimed ones
  leave, the rest go on (the walk itself is `routing.walk`, shared with the reference);
- the indicator check computes logits at the decision positions only;
- a claimed query continues decoding from the KV cache of its own routing pass (no second prefill);
  a batch whose queries one expert claimed decodes in the buffers of that expert's check;
- after the walk, a batch's answers are decoded together, each row under the expert that claimed
  it (or the base): PEFT mixed-adapter batches, one stream of the weights per step; each row
  decodes greedily or samples as its `Sampling` says (`decoding`), and `on_token` sees it grow;
- a query that names its owner (`Query.owner`) skips the walk, and a conversation (`Query.history`)
  is routed on its last user turn, then prefilled whole by its owner (the base, or the claiming
  expert after its `<<pos>>`) to be answered after every turn;
- activated-LoRA experts (PEFT aLoRA, invoked by the assistant-turn header): the prompt body is
  prefilled once by the base (an aLoRA adapter leaves it to the base), then the checks of up to
  `check_group` experts run in one forward after it, each as a segment under its own expert's
  LoRA over the same body KV (`alora_batch`); the claiming checks' positions are moved to right
  after the body and the whole batch decodes in those same buffers.

Does not own the decision rule (`routing.decide`), prompts (`PromptFormatter`), loading experts,
the forwards themselves (prefill chunks, in-place KV buffers, the prefix cache: `forwards`) or
how a forward runs under one expert or a per-row mix of them (`owners`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from seecl.data.prompts import PromptFormatter
from seecl.model.kv import kv_over
from seecl.progress import advance
from seecl.serving.alora_batch import check_logprobs
from seecl.serving.batch_kv import Rows, gather
from seecl.serving.decoding import AnswerDecoding, choose_tokens, decodings_for
from seecl.serving.forwards import BatchForwards
from seecl.serving.prefix_cache import batch_order
from seecl.serving.routing import (
    BASE,
    Answer,
    Budget,
    Check,
    OnToken,
    Query,
    Route,
    Sampling,
    Thresholds,
    as_query,
    budgets_for,
    check_owners,
    decide,
    samplings_for,
    threshold_for,
    walk,
)


@dataclass
class _Group:
    """Rows of a batch ready to decode: their owners, query indices, decoding state and first tokens."""

    owners: list[str]
    rows: list[int]
    state: Rows
    first: list[list[int]]


def _continues(decoding: AnswerDecoding) -> bool:
    """Whether a claimed query's answer continues from its own routing pass: it wants an answer,
    after the very prompt routing read (a conversation is answered after all of its turns)."""
    return decoding.sampling.max_tokens > 0 and not decoding.query.history


class RoutingEngine(BatchForwards):
    """Batched SEE routing and generation over a PEFT model holding one adapter per expert."""

    def __init__(
        self,
        model,
        formatter: PromptFormatter,
        experts: Sequence[str],
        threshold: Thresholds = None,
        batch_size: int = 16,
        prefix_cache_tokens: int = 4096,
        prefix_block: int = 8,
        prefill_tokens: int = 512,
        check_group: int = 32,
    ):
        super().__init__(
            model, experts, formatter.tokenizer.pad_token_id, prefix_cache_tokens, prefix_block, prefill_tokens
        )
        self.formatter = formatter
        self.indicators = formatter.indicators
        self._experts = list(experts)
        self.threshold, self.batch_size = threshold, batch_size
        self.check_group = check_group  # aLoRA experts whose checks share one forward (their KV shares the buffers)
        self.eos_id = formatter.eos_id
        self.blocked = torch.tensor(self.indicators.blocked_in_answers if self.indicators else [], dtype=torch.long)
        invocations = {tuple(v) for v in self.alora.values()}
        # Shared-body routing needs every expert to be aLoRA with one invocation sequence.
        self.invocation = list(next(iter(invocations))) if len(invocations) == 1 and () not in invocations else None

    @torch.inference_mode()
    def _decode(
        self,
        state: Rows,
        first: Sequence[Sequence[int]],
        rows: Sequence[AnswerDecoding],
        ignore_eos: bool = False,
        owners: list[str] | None = None,
    ) -> None:
        """Continue every row: feed its `first` tokens, then generate (greedily or sampled, as each
        row's Sampling says) until its end of turn, budget or stop string (exactly its budget with
        `ignore_eos`), in the state's own buffers. `owners` (the rows' owners under `_use_rows`) is
        kept in step with the rows as they finish."""
        live = list(range(len(rows)))
        for decoding in rows:
            if decoding.sampling.max_tokens <= 0:
                decoding.finish("length")
        state, logprobs = self._extend(state, first, 1)
        while live:
            scores = logprobs[:, -1]
            if len(self.blocked):  # an answer never holds an indicator token
                scores = scores.index_fill(-1, self.blocked.to(scores.device), float("-inf"))
            tokens = choose_tokens(scores, [rows[i] for i in live])
            keep_rows = []
            for row, (index, token) in enumerate(zip(live, tokens)):
                decoding = rows[index]
                if decoding.done:
                    continue
                if token == self.eos_id and not ignore_eos:
                    decoding.finish("stop")
                elif decoding.push(token, scores[row]):
                    keep_rows.append(row)
            if not keep_rows:
                break
            if len(keep_rows) < len(live):
                state.narrow(keep_rows)
                live = [live[r] for r in keep_rows]
                if owners is not None:
                    owners[:] = [owners[r] for r in keep_rows]
                tokens = [tokens[r] for r in keep_rows]
            state, logprobs = self._extend(state, [[t] for t in tokens], 1)

    def _answer(self, groups: list[_Group], decodings: list[AnswerDecoding], budget: int) -> None:
        """The answers of one batch's rows, decoded together whichever owner each has.

        One decode of all of them streams the weights once per step, where a decode per expert
        would stream them once per step per expert.
        """
        room = max(len(f) for group in groups for f in group.first) + budget
        state = (
            groups[0].state.take(range(len(groups[0].rows)), room)
            if len(groups) == 1
            else gather([(group.state, range(len(group.rows))) for group in groups], room)
        )
        owners = [owner for group in groups for owner in group.owners]
        rows = [decodings[index] for group in groups for index in group.rows]
        first = [tokens for group in groups for tokens in group.first]
        groups.clear()  # the decoding state is all that is needed now
        with torch.inference_mode(), self._use_rows(owners):
            self._decode(state, first, rows, owners=owners)

    @torch.inference_mode()
    def _fresh(self, owner: str, rows: list[int], prompts, budget: int) -> _Group:
        """Rows whose answer does not continue a routing pass (a named owner, a conversation, or
        the base after the walk), prefilled by their owner: an expert after its `<<pos>>`."""
        claim = list(self.indicators.pos_ids) if owner != BASE and self.indicators else []
        full = [list(prompts[i]) + claim for i in rows]
        # an aLoRA adapter acts from its invocation (the prompt's end) on; the last token is fed below
        tail = len(self.alora[owner]) + len(claim) - 1 if self.alora.get(owner) else None
        with self._use(owner):
            state, _ = self._prefill(owner, [p[:-1] for p in full], 1, tail, room=1 + budget)
        return _Group([owner] * len(rows), rows, state, [p[-1:] for p in full])

    # -- routing ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _walk_prompts(self, rows: list[int], prompts, decodings, groups: list[_Group], budget: int) -> list[Route]:
        """LoRA experts: every check is a prefill of the open prompts by that expert. The claimed
        rows that answer their own query keep their check's KV as a group to decode from."""
        prefix = list(self.indicators.shared_prefix)
        continuation = list(self.indicators.pos_ids[len(prefix) :])

        def check(expert: str, idx: list[int]) -> list[Check]:
            batch = [rows[i] for i in idx]
            with self._use(expert):
                state, logprobs = self._prefill(
                    expert,
                    [prompts[i] + prefix for i in batch],
                    len(prefix) + 1,
                    len(self.alora[expert]) + len(prefix),
                    len(continuation) + budget,
                )
            checks = self._verdicts(expert, logprobs)
            claimed = [r for r, c in enumerate(checks) if c.verdict == "pos" and _continues(decodings[batch[r]])]
            if claimed:
                owners, rows_claimed = [expert] * len(claimed), [batch[r] for r in claimed]
                groups.append(_Group(owners, rows_claimed, state.take(claimed), [continuation] * len(claimed)))
            return checks

        return walk(len(rows), self._experts, check)

    @torch.inference_mode()
    def _walk_shared_body(self, chunk: list[int], prompts, decodings, groups: list[_Group], budget: int) -> list[Route]:
        """aLoRA experts: the prompt bodies (everything before the invocation) are prefilled once by
        the base (an aLoRA adapter leaves them to it), then the checks of a group of experts run in
        one forward after them (`alora_batch`), newest group first until no query is open. The
        claiming check's positions are moved to right after the body and the rows decode in the
        bodies' buffers (unclaimed rows leave those positions masked and feed the invocation to the base)."""
        n = len(self.invocation)
        for i in chunk:
            if len(prompts[i]) <= n or list(prompts[i][-n:]) != self.invocation:
                raise ValueError("aLoRA routing needs every prompt to end with the invocation tokens")
        prefix = list(self.indicators.shared_prefix)
        continuation = list(self.indicators.pos_ids[len(prefix) :])
        tail = n + len(prefix)
        group = min(len(self._experts), self.check_group)
        with self._use(BASE):
            bodies, _ = self._prefill(
                BASE,
                [prompts[i][:-n] for i in chunk],
                1,
                room=max(group * tail, n + len(continuation)) + budget,
            )
        body = bodies.length
        verdicts: dict[str, list[Check]] = {}
        segment_of: dict[str, int] = {}  # expert -> its check's segment in the latest forward
        pending: dict[int, int] = {}  # claimed row of the chunk -> its check's segment, not yet set aside
        kept: list[tuple[list[int], list]] = []  # (rows, per-layer KV of their claiming checks)

        def set_aside() -> None:  # before the next forward overwrites the segments
            for segment in sorted(set(pending.values())):
                rows = [row for row, m in pending.items() if m == segment]
                index = torch.tensor(rows, device=self.device)
                start = body + segment * tail
                layers = [
                    (
                        k[:, :, start : start + tail].index_select(0, index),
                        v[:, :, start : start + tail].index_select(0, index),
                    )
                    for k, v in bodies.buffers()
                ]
                kept.append((rows, layers))
            pending.clear()

        def check(expert: str, idx: list[int]) -> list[Check]:
            if expert not in verdicts:  # the next group of experts, newest first, in one forward
                set_aside()
                stop = self._experts.index(expert) + 1
                names = self._experts[max(0, stop - group) : stop]
                logprobs = check_logprobs(self.model, bodies, names, self.invocation + prefix, len(prefix) + 1)
                segment_of.clear()
                for m, name in enumerate(names):
                    segment_of[name] = m
                    verdicts[name] = self._verdicts(name, logprobs[:, m])
            checks = [verdicts[expert][i] for i in idx]
            pending.update({i: segment_of[expert] for i, c in zip(idx, checks) if c.verdict == "pos"})
            return checks

        routes = walk(len(chunk), self._experts, check)
        set_aside()
        answering = [row for row, i in enumerate(chunk) if _continues(decodings[i])]
        if not answering:
            return routes
        claimed = torch.zeros(len(chunk), dtype=torch.long, device=self.device)
        for rows, layers in kept:  # each claiming check's positions right after its body
            index = torch.tensor(rows, device=self.device)
            claimed[index] = 1
            for (k, v), (tail_k, tail_v) in zip(bodies.buffers(), layers):
                k[:, :, body : body + tail].index_copy_(0, index, tail_k)
                v[:, :, body : body + tail].index_copy_(0, index, tail_v)
        bodies.zero((claimed == 0).nonzero().flatten(), body, body + tail)
        state = Rows(
            kv_over(bodies.buffers(), body + tail),
            torch.cat([bodies.mask, claimed[:, None].expand(-1, tail)], dim=1),
            bodies.next_pos + tail * claimed,
        )
        owners = [routes[row].answered_by for row in answering]
        first = [continuation if owner != BASE else list(self.invocation) for owner in owners]
        groups.append(_Group(owners, [chunk[row] for row in answering], state.take(answering), first))
        return routes

    def _verdicts(self, expert: str, logprobs: torch.Tensor) -> list[Check]:
        threshold = threshold_for(self.threshold, expert)
        return [Check(expert, *decide(logprobs[row], self.indicators, threshold)) for row in range(len(logprobs))]

    def _run_chunk(self, chunk: list[int], prompts, answer_prompts, decodings: list[AnswerDecoding]) -> None:
        """Route one batch (the queries that name no owner walk the experts) and decode its answers."""
        budget = max(decodings[i].sampling.max_tokens for i in chunk)
        groups: list[_Group] = []  # rows that continue from their routing pass
        routed = [i for i in chunk if decodings[i].query.owner is None]
        if routed:
            walk_rows = self._walk_shared_body if self.invocation else self._walk_prompts
            for index, route in zip(routed, walk_rows(routed, prompts, decodings, groups, budget)):
                decodings[index].route = route
        for index in chunk:
            if decodings[index].route is None:
                decodings[index].route = Route(decodings[index].query.owner, "requested", [])
        continuing = {index for group in groups for index in group.rows}
        fresh = [i for i in chunk if decodings[i].sampling.max_tokens > 0 and i not in continuing]
        for owner in dict.fromkeys(decodings[i].route.answered_by for i in fresh):
            rows = [i for i in fresh if decodings[i].route.answered_by == owner]
            groups.append(self._fresh(owner, rows, answer_prompts, budget))
        for index in chunk:
            if decodings[index].sampling.max_tokens <= 0:
                decodings[index].finish("length")
        if groups:
            self._answer(groups, decodings, budget)

    def run(
        self, queries: Sequence[str | Query], samplings: Sequence[Sampling], on_token: OnToken | None = None
    ) -> list[Answer]:
        """Answers with their routes; a max_tokens of 0 only routes the query (no answer is generated)."""
        queries = [as_query(q) for q in queries]
        check_owners(queries, self._experts)
        prompts = [self.formatter.prompt_ids(q.text) for q in queries]  # what routing reads
        # What an answer is decoded after: the whole conversation, when there is one.
        answer_prompts = [self.formatter.chat_ids(q.turns()) if q.history else p for q, p in zip(queries, prompts)]
        decodings = decodings_for(queries, samplings, self.formatter.decode, self._piece, on_token)
        # Each batch walks the experts alone, so memory stays bounded by one batch's KV.
        order = batch_order(prompts, self.prefix_cache.block)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            self._run_chunk(chunk, prompts, answer_prompts, decodings)
            advance(len(chunk))
        return [decoding.answer for decoding in decodings]

    def _piece(self, ids: list[int]) -> str:
        return self.formatter.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(
        self,
        owner: str,
        queries: Sequence[str],
        max_new_tokens: int | Sequence[int],
        forced: Sequence[int] = (),
        ignore_eos: bool = False,
    ) -> list[str]:
        """Greedy answers of one adapter (or BASE) without routing, after the `forced` tokens.

        The single-model baseline: the same batching, prefix cache and decoding as routed queries;
        `ignore_eos` decodes exactly `max_new_tokens` per query (equal work for a timing baseline).
        """
        samplings = [Sampling(max_tokens=b) for b in budgets_for(len(queries), max_new_tokens)]
        prompts = [self.formatter.prompt_ids(q) + list(forced) for q in queries]
        decodings = decodings_for(queries, samplings, self.formatter.decode, self._piece, None)
        for decoding in decodings:
            decoding.route = Route(owner, "requested", [])
        order = batch_order(prompts, self.prefix_cache.block)
        # an aLoRA adapter acts from its invocation on (the prompt's end), whose last token is fed below
        tail = len(self.alora[owner]) + len(forced) - 1 if self.alora.get(owner) else None
        with torch.inference_mode(), self._use(owner):
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                budget = max(samplings[i].max_tokens for i in batch)
                state, _ = self._prefill(owner, [prompts[i][:-1] for i in batch], 1, tail, room=1 + budget)
                self._decode(state, [prompts[i][-1:] for i in batch], [decodings[i] for i in batch], ignore_eos)
        return [decoding.answer.text for decoding in decodings]

    def response_nll(
        self, queries: Sequence[str], responses: Sequence[str], owners: Sequence[str]
    ) -> list[tuple[float, int]]:
        """(summed negative log-likelihood, tokens) of each response and its end-of-turn token.

        An expert scores (q, `<<pos>>`, r) with the indicator as given context; BASE scores (q, r).
        """
        out: list[tuple[float, int]] = [(0.0, 0)] * len(queries)
        pos = list(self.indicators.pos_ids)
        for owner in dict.fromkeys(owners):
            members = [i for i, o in enumerate(owners) if o == owner]
            with torch.inference_mode(), self._use(owner):
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    prompts = [self.formatter.prompt_ids(queries[i]) + (pos if owner != BASE else []) for i in batch]
                    targets = [self.formatter.text_ids(responses[i]) + [self.eos_id] for i in batch]
                    width = max(len(t) for t in targets)
                    tail = [len(self.alora.get(owner) or []) + len(pos) + len(t) for t in targets]
                    _, logprobs = self._extend(None, [p + t for p, t in zip(prompts, targets)], width + 1, tail)
                    for row, (index, target) in enumerate(zip(batch, targets)):
                        predicting = logprobs[row, width - len(target) : width]  # positions before each target token
                        nll = -predicting.gather(1, torch.tensor(target)[:, None].to(predicting.device)).sum()
                        out[index] = (float(nll), len(target))
        return out

    def experts(self) -> list[str]:
        return list(self._experts)

    def route(self, queries: Sequence[str | Query]) -> list[Route]:
        return [answer.route for answer in self.run(queries, [Sampling(max_tokens=0)] * len(queries))]

    def perplexity(
        self, queries: Sequence[str], responses: Sequence[str], owners: Sequence[str] | None = None
    ) -> float:
        """Ensemble perplexity (docs/design.md §3): each (q, r) scored by the expert q is routed to
        (`owners`, when those routes are known already)."""
        if owners is None:
            owners = [route.answered_by for route in self.route(list(queries))]
        elif len(owners) != len(queries):
            raise ValueError(f"{len(owners)} owners for {len(queries)} queries")
        scored = self.response_nll(list(queries), list(responses), list(owners))
        return math.exp(sum(n for n, _ in scored) / max(1, sum(t for _, t in scored)))

    def ask(
        self, queries: Sequence[str | Query], max_new_tokens: Budget = 64, on_token: OnToken | None = None
    ) -> list[Answer]:
        """Answer a batch of queries; every answer carries its route. `on_token` sees each answer grow."""
        return self.run(list(queries), samplings_for(len(queries), max_new_tokens), on_token)
