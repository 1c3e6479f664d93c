"""The fast routing engine: the routes and greedy answers of `routing.SequentialRouter`, with less work.

Owns how a batch of queries is pushed through the experts of a PEFT model:

- batched routing: the still-open queries go through the newest expert together; claimed ones
  leave, the rest go on (the walk itself is `routing.walk`, shared with the reference);
- the indicator check computes logits at the decision positions only;
- a batch is prefilled in chunks of at most `prefill_tokens` (rows x padded width), each chunk
  writing into the batch's own buffers, then decoded as one batch;
- a claimed query continues decoding from the KV cache of its own routing pass (no second prefill);
- every forward writes its new KV in place, into buffers sized once for the prompts, the checks
  and the answer budgets (`batch_kv`), where a growing cache would copy the whole KV at every
  forward; a batch whose queries one expert claimed decodes in the buffers of that expert's check;
- after the walk, a batch's answers are decoded together, each row under the expert that claimed
  it (or the base): PEFT mixed-adapter batches, one stream of the weights per step;
- a prefix cache per owner (an expert, or the base; `prefix_cache.PrefixCache`), so prompts that
  share a task definition or system prompt prefill it once, in a batch or one query at a time; a
  batch that spans two definitions prefills each run of rows on its own head;
- activated-LoRA experts (PEFT aLoRA, invoked by the assistant-turn header): the prompt body is
  prefilled once, in the newest expert's check (an aLoRA adapter leaves the body to the base),
  into buffers that every later check extends in place at the cost of the invocation and
  indicator-prefix positions only; the claiming checks' positions are written back and the whole
  batch decodes in those same buffers.

Does not own the decision rule (`routing.decide`), prompts (`PromptFormatter`), loading experts, or
how a forward runs under one expert or a per-row mix of them (`owners`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch

from seecl.data.prompts import PromptFormatter, common_prefix_length
from seecl.model.kv import cache_keyword, kv_cache, kv_over, kv_shape, returned_cache
from seecl.progress import advance
from seecl.serving.batch_kv import Rows, allocate, gather, row_chunks
from seecl.serving.owners import (
    dense_head_input,
    grouped_kv_heads,
    use_owner,
    use_row_owners,
)
from seecl.serving.prefix_cache import PrefixCache, batch_order, shared_runs
from seecl.serving.routing import (
    BASE,
    Answer,
    Check,
    Route,
    Thresholds,
    budgets_for,
    decide,
    threshold_for,
    walk,
)


class RoutingEngine:
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
    ):
        self.model, self.formatter = model, formatter
        self.indicators = formatter.indicators
        self._experts = list(experts)
        self.threshold, self.batch_size, self.prefill_tokens = threshold, batch_size, prefill_tokens
        self.pad_id = formatter.tokenizer.pad_token_id
        self.eos_id = formatter.eos_id
        self.blocked = torch.tensor(self.indicators.blocked_in_answers if self.indicators else [], dtype=torch.long)
        self.prefix_cache = PrefixCache(prefix_cache_tokens, prefix_block)
        self.device = next(model.parameters()).device
        self.kv_shape = kv_shape(model)
        self._kv_like = model.get_input_embeddings().weight  # dtype and device of the KV buffers
        # aLoRA experts act only from their invocation tokens (the assistant-turn header) on
        configs = getattr(model, "peft_config", {})
        self.alora = {
            name: list(getattr(configs[name], "alora_invocation_tokens", None) or []) for name in self._experts
        }
        invocations = {tuple(v) for v in self.alora.values()}
        # Shared-body routing needs every expert to be aLoRA with one invocation sequence.
        self.invocation = list(next(iter(invocations))) if len(invocations) == 1 and () not in invocations else None
        self._active_alora = False
        dense_head_input(model)

    # -- adapters -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _use(self, owner: str):
        """`owner`'s adapter active (its indicator rows merged), or the bare base for BASE."""
        self._active_alora = bool(self.alora.get(owner))
        with use_owner(self.model, owner):
            yield

    @contextlib.contextmanager
    def _use_rows(self, owners: list[str]):
        """Each row of a forward under its own owner; `owners` may be shortened in place as rows finish."""
        self._active_alora = any(self.alora.get(owner) for owner in owners)
        with use_row_owners(self.model, owners):
            yield

    # -- forward passes -----------------------------------------------------------------------------
    def _extend(
        self, state: Rows | None, chunks: Sequence[Sequence[int]], keep: int, tail: int | Sequence[int] | None = None
    ) -> tuple[Rows, torch.Tensor]:
        """Feed one chunk of new tokens per row (left-padded among themselves) on top of `state`.

        Returns the new state and log-probs [rows, keep, vocab] at the last `keep` positions. For an
        aLoRA expert, `tail` is how many trailing positions of each chunk come after the invocation
        start (None: all of them; a sequence: one count per row).
        """
        from transformers import DynamicCache

        width = max(len(c) for c in chunks)
        ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long)
        new_mask = torch.zeros((len(chunks), width), dtype=torch.long)
        for row, chunk in enumerate(chunks):
            ids[row, width - len(chunk) :] = torch.tensor(list(chunk), dtype=torch.long)
            new_mask[row, width - len(chunk) :] = 1
        ids, new_mask = ids.to(self.device), new_mask.to(self.device)
        if state is None:
            state = Rows(
                DynamicCache(), new_mask[:, :0], torch.zeros(len(chunks), dtype=torch.long, device=self.device)
            )
        positions = state.next_pos[:, None] + (new_mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([state.mask, new_mask], dim=1)
        offsets = (
            [width] * len(chunks) if tail is None else [tail] * len(chunks) if isinstance(tail, int) else list(tail)
        )
        kwargs = {"alora_offsets": offsets} if self._active_alora else {}
        with grouped_kv_heads(self.device):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=keep,
                **{cache_keyword(): state.cache},
                **kwargs,
            )
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)
        return Rows(returned_cache(out), mask, state.next_pos + new_mask.sum(-1)), logprobs

    def _head(
        self, owner: str, prompts: Sequence[Sequence[int]], keep: int, tail: int | None
    ) -> tuple[int, list | None, int]:
        """The cached head of prompts prefilled together: (its length, per-layer KV or None, and
        how much of the prompt to store once its own pass has computed it, or 0).

        The block-aligned part of the prompts' common prefix that the cache lacks is stored for
        later prompts. Several prompts compute it once, in a pass of its own before their rests; a
        single prompt computes everything in one pass (a pass streams every weight, which costs as
        much as a few dozen prompt tokens) and the head is cut from its KV afterwards. The head
        never reaches into the last `keep` positions or an aLoRA expert's `tail`.
        """
        shared = min(common_prefix_length(prompts), min(len(p) for p in prompts) - max(keep, tail or 0))
        aligned = max(0, shared) // self.prefix_cache.block * self.prefix_cache.block
        length, layers = self.prefix_cache.lookup(owner, prompts[0][:aligned]) if aligned else (0, None)
        if aligned <= length or self.prefix_cache.max_tokens == 0:
            return length, layers, 0
        if len(prompts) == 1:
            return length, layers, aligned
        head = (
            None
            if layers is None
            else Rows(
                kv_cache(layers),
                torch.ones((1, length), dtype=torch.long, device=self.device),
                torch.full((1,), length, dtype=torch.long, device=self.device),
            )
        )
        head, _ = self._extend(head, [prompts[0][length:aligned]], 1, 0)
        layers = [(layer.keys, layer.values) for layer in head.cache.layers]
        self.prefix_cache.store(owner, prompts[0][:aligned], layers)
        return aligned, layers, 0

    def _prefill(
        self, owner: str, prompts: Sequence[Sequence[int]], keep: int, tail: int | None = None, room: int = 0
    ) -> tuple[Rows, torch.Tensor]:
        """Fresh prefill of `prompts` by `owner` (already active): returns the rows' state, with
        `room` free positions for what will follow, and log-probs at the last `keep` positions.

        Runs of prompts that share more than all of them do (`prefix_cache.shared_runs`) each start
        from their own cached head; each run is fed in chunks of at most `prefill_tokens`, every
        chunk writing into its rows of the batch's buffers (left-padded to the longest row).
        """
        runs = (
            shared_runs(prompts, self.prefix_cache.block)
            if self.prefix_cache.max_tokens and len(prompts) > 1
            else [list(range(len(prompts)))]
        )
        heads = [self._head(owner, [prompts[r] for r in run], keep, tail) for run in runs]
        total = max(len(p) for p in prompts)
        state = allocate(self._kv_like, self.kv_shape, len(prompts), total + room)
        buffers = state.buffers()
        mask = torch.zeros((len(prompts), total), dtype=torch.long, device=self.device)
        next_pos = torch.zeros(len(prompts), dtype=torch.long, device=self.device)
        logprobs = []
        for run, (length, layers, store) in zip(runs, heads):
            widths = [len(prompts[r]) - length for r in run]
            for chunk in row_chunks(widths, self.prefill_tokens):
                first, stop = run[chunk[0]], run[chunk[-1]] + 1
                # the chunk's head sits right before its tokens, so its forward attends over no
                # column of the longer rows' padding
                at = total - max(widths[i] for i in chunk) - length
                for k, v in buffers:  # masked columns hold zeros, the head its cached KV
                    k[first:stop, :, :at] = 0
                    v[first:stop, :, :at] = 0
                if layers is not None:
                    for (k, v), (head_k, head_v) in zip(buffers, layers):
                        k[first:stop, :, at : at + length] = head_k
                        v[first:stop, :, at : at + length] = head_v
                    mask[first:stop, at : at + length] = 1
                rows = state.view(
                    first,
                    stop,
                    at,
                    length,
                    mask[first:stop, at : at + length],
                    torch.full((stop - first,), length, dtype=torch.long, device=self.device),
                )
                rows, chunk_logprobs = self._extend(rows, [prompts[r][length:] for r in range(first, stop)], keep, tail)
                mask[first:stop, at:], next_pos[first:stop] = rows.mask, rows.next_pos
                logprobs.append(chunk_logprobs)
                if store:  # a run of one prompt, unpadded: its first `store` positions are the head
                    self.prefix_cache.store(
                        owner,
                        prompts[first][:store],
                        [(k[first:stop, :, at : at + store], v[first:stop, :, at : at + store]) for k, v in buffers],
                    )
        return Rows(kv_over(buffers, total), mask, next_pos), torch.cat(logprobs)

    @torch.inference_mode()
    def _decode(
        self,
        state: Rows,
        first: Sequence[Sequence[int]],
        budgets: Sequence[int],
        ignore_eos: bool = False,
        owners: list[str] | None = None,
    ) -> list[list[int]]:
        """Greedy continuation: feed `first` tokens per row, then generate up to each row's budget
        (exactly that many tokens with `ignore_eos`), in the state's own buffers. `owners` (the
        rows' owners under `_use_rows`) is kept in step with the rows as they finish."""
        results: list[list[int]] = [[] for _ in budgets]
        live = list(range(len(budgets)))
        state, logprobs = self._extend(state, first, 1)
        while live:
            scores = logprobs[:, -1]
            if len(self.blocked):  # an answer never holds an indicator token
                scores = scores.index_fill(-1, self.blocked.to(scores.device), float("-inf"))
            tokens = scores.argmax(-1).tolist()
            keep_rows = []
            for row, (index, token) in enumerate(zip(live, tokens)):
                if budgets[index] <= 0 or (token == self.eos_id and not ignore_eos):
                    continue
                results[index].append(token)
                if len(results[index]) < budgets[index]:
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
        return results

    def _answer(
        self, owners: list[str], queries: list[int], state: Rows, first: list[list[int]], budgets, texts
    ) -> None:
        """Greedy answers of one batch's routed queries, decoded together whichever owner each has.

        One decode of all of them streams the weights once per step, where a decode per expert
        would stream them once per step per expert.
        """
        with torch.inference_mode(), self._use_rows(owners):
            answers = self._decode(state, first, [budgets[i] for i in queries], owners=owners)
        for index, tokens in zip(queries, answers):
            texts[index] = self.formatter.decode(tokens)

    # -- routing ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _route_prompts(self, chunk: list[int], prompts, budgets, texts) -> list[Route]:
        """LoRA experts: every check is a prefill of the open prompts by that expert. The claimed
        rows keep their check's KV; the batch's answers are then decoded together."""
        prefix = list(self.indicators.shared_prefix)
        continuation = list(self.indicators.pos_ids[len(prefix) :])
        budget = max(budgets[i] for i in chunk)
        groups: list[tuple[str, list[int], Rows, list[list[int]]]] = []  # owner, queries, state, first tokens

        def check(expert: str, idx: list[int]) -> list[Check]:
            batch = [chunk[i] for i in idx]
            with self._use(expert):
                state, logprobs = self._prefill(
                    expert,
                    [prompts[i] + prefix for i in batch],
                    len(prefix) + 1,
                    len(self.alora[expert]) + len(prefix),
                    len(continuation) + budget,
                )
            checks = self._verdicts(expert, logprobs)
            claimed = [row for row, c in enumerate(checks) if c.verdict == "pos" and budgets[batch[row]] > 0]
            if claimed:
                groups.append((expert, [batch[r] for r in claimed], state.take(claimed), [continuation] * len(claimed)))
            return checks

        routes = walk(len(chunk), self._experts, check)
        unclaimed = [i for i, r in zip(chunk, routes) if r.answered_by == BASE and budgets[i] > 0]
        if unclaimed:
            with self._use(BASE):
                state, _ = self._prefill(BASE, [prompts[i][:-1] for i in unclaimed], 1, room=1 + budget)
            groups.append((BASE, unclaimed, state, [list(prompts[i][-1:]) for i in unclaimed]))
        if groups:
            room = max(len(f) for *_, firsts in groups for f in firsts) + budget
            state = (
                groups[0][2].take(range(len(groups[0][1])), room)
                if len(groups) == 1
                else gather([(s, range(len(q))) for _, q, s, _ in groups], room)
            )
            owners = [owner for owner, queries, _, _ in groups for _ in queries]
            queries = [index for _, batch, _, _ in groups for index in batch]
            first = [tokens for *_, firsts in groups for tokens in firsts]
            groups.clear()  # the decoding state is all that is needed now
            self._answer(owners, queries, state, first, budgets, texts)
        return routes

    @torch.inference_mode()
    def _route_shared_body(self, chunk: list[int], prompts, budgets, texts) -> list[Route]:
        """aLoRA experts: the prompt bodies (everything before the invocation) are prefilled once,
        in the newest expert's check; each later check extends them in place with the invocation
        and indicator prefix, overwriting the previous check's positions. The claiming checks'
        positions are kept, written back for their rows, and the batch decodes in the bodies'
        buffers (unclaimed rows leave those positions masked and feed the invocation to the base)."""
        n = len(self.invocation)
        for i in chunk:
            if len(prompts[i]) <= n or list(prompts[i][-n:]) != self.invocation:
                raise ValueError("aLoRA routing needs every prompt to end with the invocation tokens")
        prefix = list(self.indicators.shared_prefix)
        continuation = list(self.indicators.pos_ids[len(prefix) :])
        tail = n + len(prefix)
        budget = max(budgets[i] for i in chunk)
        # The newest expert's check is the bodies' own pass: an aLoRA adapter leaves every position
        # before its invocation to the base, so the bodies' KV is the base's.
        newest = self._experts[-1]
        with self._use(newest):
            first_check = list(
                self._prefill(
                    newest,
                    [prompts[i] + prefix for i in chunk],
                    len(prefix) + 1,
                    tail,
                    room=max(n, len(continuation)) + budget,
                )
            )
        body = first_check[0].length - tail
        bodies = Rows(first_check[0].cache, first_check[0].mask[:, :body], first_check[0].next_pos - tail)
        claims = []  # (rows of the chunk, per-layer KV of their check's tail)

        def check(expert: str, idx: list[int]) -> list[Check]:
            if first_check:
                state, logprobs = first_check
                first_check.clear()
            else:
                with self._use(expert):
                    state = bodies.rewind() if len(idx) == len(chunk) else bodies.take(idx, tail)
                    state, logprobs = self._extend(state, [self.invocation + prefix] * len(idx), len(prefix) + 1)
            checks = self._verdicts(expert, logprobs)
            claimed = [row for row, c in enumerate(checks) if c.verdict == "pos"]
            if claimed:
                index = torch.tensor(claimed, device=self.device)
                claims.append(
                    (
                        [idx[r] for r in claimed],
                        [
                            (
                                layer.keys[:, :, body:].index_select(0, index),
                                layer.values[:, :, body:].index_select(0, index),
                            )
                            for layer in state.cache.layers
                        ],
                    )
                )
            return checks

        routes = walk(len(chunk), self._experts, check)
        answering = [row for row, i in enumerate(chunk) if budgets[i] > 0]
        if not answering:
            return routes
        bodies.rewind()
        claimed = torch.zeros(len(chunk), dtype=torch.long, device=self.device)
        for rows, layers in claims:
            index = torch.tensor(rows, device=self.device)
            claimed[index] = 1
            for (k, v), (tail_k, tail_v) in zip(bodies.buffers(), layers):
                k[:, :, body : body + tail].index_copy_(0, index, tail_k)
                v[:, :, body : body + tail].index_copy_(0, index, tail_v)
        unclaimed = (claimed == 0).nonzero().flatten()
        bodies.zero(unclaimed, body, body + tail)
        state = Rows(
            kv_over(bodies.buffers(), body + tail),
            torch.cat([bodies.mask, claimed[:, None].expand(-1, tail)], dim=1),
            bodies.next_pos + tail * claimed,
        )
        state = state.take(answering)
        owners = [routes[row].answered_by for row in answering]
        first = [continuation if owner != BASE else list(self.invocation) for owner in owners]
        self._answer(owners, [chunk[row] for row in answering], state, first, budgets, texts)
        return routes

    def _verdicts(self, expert: str, logprobs: torch.Tensor) -> list[Check]:
        threshold = threshold_for(self.threshold, expert)
        return [Check(expert, *decide(logprobs[row], self.indicators, threshold)) for row in range(len(logprobs))]

    def run(self, queries: Sequence[str], budgets: Sequence[int]) -> tuple[list[str], list[Route]]:
        """Texts and routes; a budget of 0 only routes the query (no answer is generated)."""
        prompts = [self.formatter.prompt_ids(q) for q in queries]
        texts = [""] * len(queries)
        routes: list[Route | None] = [None] * len(queries)
        # Each batch walks the experts alone, so memory stays bounded by one batch's KV.
        order = batch_order(prompts, self.prefix_cache.block)
        route = self._route_shared_body if self.invocation else self._route_prompts
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for index, chunk_route in zip(chunk, route(chunk, prompts, budgets, texts)):
                routes[index] = chunk_route
            advance(len(chunk))
        return texts, routes  # type: ignore[return-value]

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
        budgets = budgets_for(len(queries), max_new_tokens)
        prompts = [self.formatter.prompt_ids(q) + list(forced) for q in queries]
        texts = [""] * len(queries)
        order = batch_order(prompts, self.prefix_cache.block)
        # an aLoRA adapter acts from its invocation on (the prompt's end), whose last token is fed below
        tail = len(self.alora[owner]) + len(forced) - 1 if self.alora.get(owner) else None
        with torch.inference_mode(), self._use(owner):
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                budget = max(budgets[i] for i in batch)
                state, _ = self._prefill(owner, [prompts[i][:-1] for i in batch], 1, tail, room=1 + budget)
                answers = self._decode(state, [prompts[i][-1:] for i in batch], [budgets[i] for i in batch], ignore_eos)
                for index, tokens in zip(batch, answers):
                    texts[index] = self.formatter.decode(tokens)
        return texts

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

    def route(self, queries: Sequence[str]) -> list[Route]:
        return self.run(queries, [0] * len(queries))[1]

    def perplexity(self, queries: Sequence[str], responses: Sequence[str]) -> float:
        """Ensemble perplexity (docs/design.md §3): each (q, r) scored by the expert q is routed to."""
        owners = [route.answered_by for route in self.route(list(queries))]
        scored = self.response_nll(list(queries), list(responses), owners)
        return math.exp(sum(n for n, _ in scored) / max(1, sum(t for _, t in scored)))

    def ask(self, queries: Sequence[str], max_new_tokens: int | Sequence[int] = 64) -> list[Answer]:
        """Answer a batch of queries; every answer carries its route."""
        budgets = budgets_for(len(queries), max_new_tokens)
        texts, routes = self.run(list(queries), budgets)
        return [Answer(q, t, r) for q, t, r in zip(queries, texts, routes)]
