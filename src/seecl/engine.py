"""The fast routing engine: the routes and greedy answers of `routing.SequentialRouter`, with less work.

Owns how a batch of queries is pushed through the experts of a PEFT model:

- batched routing: the still-open queries go through the newest expert together; claimed ones
  leave, the rest go on (the walk itself is `routing.walk`, shared with the reference);
- the indicator check computes logits at the decision positions only;
- a batch is prefilled in chunks of at most `prefill_tokens` (rows x padded width), then decoded
  as one batch (chunk states are merged, shorter ones left-padded);
- a claimed query continues decoding from the KV cache of its own routing pass (no second prefill);
- decoding writes each step's KV in place, into buffers sized for the answer budgets
  (`models.kv_buffer`), where a growing cache would copy the whole KV at every token;
- after the walk, a batch's answers are decoded together, each row under the expert that claimed
  it (or the base): PEFT mixed-adapter batches, one stream of the weights per step;
- a prefix cache per owner (an expert, or the base; `prefix_cache.PrefixCache`), so prompts that
  share a task definition or system prompt prefill it once, in a batch or one query at a time; a
  batch that spans two definitions prefills each run of rows on its own head;
- activated-LoRA experts (PEFT aLoRA, invoked by the assistant-turn header): the prompt body is
  prefilled once by the base model and its KV is shared by every expert's check, which then costs
  only the invocation and indicator-prefix positions; unclaimed queries continue on the base KV.

The expert's indicator rows (PEFT trainable tokens) are merged into the shared embedding for the
duration of its pass, and substituted per row in a mixed decode: PEFT would otherwise rebuild the
full embedding matrix at every forward.
Does not own the decision rule (`routing.decide`), prompts (`PromptFormatter`) or loading experts.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from .data.prompts import PromptFormatter, common_prefix_length
from .models import cache_keyword, kv_buffer, kv_cache, returned_cache
from .prefix_cache import PrefixCache, batch_order, shared_runs
from .routing import BASE, Answer, Check, Route, Thresholds, decide, threshold_for, walk


@dataclass
class _Rows:
    """Decoding state of a batch of rows: KV cache, attention mask over it, next position ids."""

    cache: object  # transformers DynamicCache
    mask: torch.Tensor  # [rows, cached tokens], 1 = real token
    next_pos: torch.Tensor  # [rows]

    def fork(self, rows: Sequence[int]) -> "_Rows":
        """A new state holding `rows` (the original stays usable: no forward writes a cache's
        tensors in place, so all rows in order share them and a subset is copied)."""
        if list(rows) == list(range(self.mask.shape[0])):
            return _Rows(kv_cache([(layer.keys, layer.values) for layer in self.cache.layers]),
                         self.mask, self.next_pos)
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        layers = [(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                  for layer in self.cache.layers]
        return _Rows(kv_cache(layers), self.mask.index_select(0, index), self.next_pos.index_select(0, index))

    def narrow(self, rows: Sequence[int]) -> None:
        """Keep only `rows`, in place (for a state whose cache no one else holds)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.next_pos = self.mask.index_select(0, index), self.next_pos.index_select(0, index)


def _state(layers: list, rows: int, length: int, device) -> _Rows:
    """`rows` copies of one cached prefix's per-layer (k, v) as a fresh decoding state."""
    cache = kv_cache([(k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous())
                      for k, v in layers])
    return _Rows(cache, torch.ones((rows, length), dtype=torch.long, device=device),
                 torch.full((rows,), length, dtype=torch.long, device=device))


@contextlib.contextmanager
def _grouped_kv_heads(device: torch.device):
    """On CPU, attention reads a grouped-query model's KV heads as they are.

    For a masked attention over more than one query position (every prefill and check), transformers
    copies the KV heads up to the number of query heads (3x the KV for SmolLM2) unless
    TRANSFORMERS_SDPA_FORCE_GQA is set, in which case torch's SDPA takes the grouped heads directly
    (`enable_gqa`) and gives the same result. Scoped to the engine's forwards.
    """
    name = "TRANSFORMERS_SDPA_FORCE_GQA"
    previous = os.environ.get(name)
    if device.type != "cpu" or previous is not None:
        yield
        return
    os.environ[name] = "1"
    try:
        yield
    finally:
        del os.environ[name]


def _chunks(widths: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive row groups whose rows x longest width stays within `budget` (at least one row)."""
    groups: list[list[int]] = []
    widest = 0
    for row, width in enumerate(widths):
        if groups and (len(groups[-1]) + 1) * max(widest, width) <= budget:
            groups[-1].append(row)
            widest = max(widest, width)
        else:
            groups.append([row])
            widest = width
    return groups


def _merge(states: Sequence[_Rows]) -> _Rows:
    """One state holding the rows of `states` in order, shorter ones left-padded (masked out)."""
    if len(states) == 1:
        return states[0]
    width = max(s.mask.shape[1] for s in states)

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    layers = [(torch.cat([pad(s.cache.layers[i].keys, 2) for s in states]),
               torch.cat([pad(s.cache.layers[i].values, 2) for s in states]))
              for i in range(len(states[0].cache.layers))]
    return _Rows(kv_cache(layers), torch.cat([pad(s.mask, 1) for s in states]),
                 torch.cat([s.next_pos for s in states]))


class RoutingEngine:
    """Batched SEE routing and generation over a PEFT model holding one adapter per expert."""

    def __init__(self, model, formatter: PromptFormatter, experts: Sequence[str],
                 threshold: Thresholds = None, batch_size: int = 16, prefix_cache_tokens: int = 4096,
                 prefix_block: int = 8, prefill_tokens: int = 512):
        self.model, self.formatter = model, formatter
        self.indicators = formatter.indicators
        self.experts = list(experts)
        self.threshold, self.batch_size, self.prefill_tokens = threshold, batch_size, prefill_tokens
        self.pad_id = formatter.tokenizer.pad_token_id
        self.eos_id = formatter.eos_id
        self.prefix_cache = PrefixCache(prefix_cache_tokens, prefix_block)
        self.device = next(model.parameters()).device
        # aLoRA experts act only from their invocation tokens (the assistant-turn header) on
        configs = getattr(model, "peft_config", {})
        self.alora = {name: list(getattr(configs[name], "alora_invocation_tokens", None) or [])
                      for name in self.experts}
        invocations = {tuple(v) for v in self.alora.values()}
        # Shared-body routing needs every expert to be aLoRA with one invocation sequence.
        self.invocation = list(next(iter(invocations))) if len(invocations) == 1 and () not in invocations else None
        self._active_alora = False
        # The head is given the last `keep` positions of the hidden states as a strided view, which
        # makes its [vocabulary x hidden] product several times slower on CPU than a dense input.
        head = model.get_output_embeddings()
        if head is not None and not getattr(head, "_seecl_dense_input", False):
            head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]) if args else args)
            head._seecl_dense_input = True

    # -- adapters -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _use(self, owner: str):
        """`owner`'s adapter active (its indicator rows merged), or the bare base for BASE."""
        self._active_alora = bool(self.alora.get(owner))
        if owner == BASE:
            with (self.model.disable_adapter() if hasattr(self.model, "disable_adapter")
                  else contextlib.nullcontext()):
                yield
            return
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        self.model.set_adapter(owner)
        # The owner's indicator rows are written into the shared embedding (and tied head) weight in
        # place and the layers marked merged, so their forward uses the plain weight. PEFT's own
        # merge would allocate a new [vocab x hidden] matrix per switch, and allocated inside
        # inference mode it could not take part in a later training step.
        layers = [m for m in self.model.modules()
                  if isinstance(m, TrainableTokensLayer) and owner in m.trainable_tokens_delta and not m.merged]
        saved = {}
        with torch.no_grad():
            for layer in layers:
                weight = layer.base_layer.weight
                if id(weight) not in saved:
                    index = torch.tensor(layer.token_indices[owner], device=weight.device)
                    saved[id(weight)] = (weight, index, weight.data[index].clone())
                    weight.data.index_copy_(0, index, layer.trainable_tokens_delta[owner].to(weight))
                layer.merged_adapters.append(owner)
        try:
            yield
        finally:
            with torch.no_grad():
                for weight, index, rows in saved.values():
                    weight.data.index_copy_(0, index, rows)
            for layer in layers:
                layer.merged_adapters.remove(owner)

    @contextlib.contextmanager
    def _use_rows(self, owners: list[str]):
        """Each row of a forward under its own owner (an expert or BASE); `owners` is read at every
        forward, so it may be shortened in place as rows finish.

        The LoRA layers take PEFT's mixed-adapter batches (`adapter_names`). Each expert's indicator
        rows are substituted at its own rows of the embedding output and of the tied head's logits
        (PEFT's mixed trainable tokens would build a [vocabulary x hidden] matrix per expert at
        every forward).
        """
        if len(set(owners)) == 1:
            with self._use(owners[0]):
                yield
            return
        from peft.tuners.lora.layer import LoraLayer
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        def adapter_names(module, args, kwargs):
            kwargs["adapter_names"] = ["__base__" if owner == BASE else owner for owner in owners]
            return args, kwargs

        def substitute(layer, args, output):
            for owner in dict.fromkeys(owners):
                if owner not in layer.trainable_tokens_delta:
                    continue
                rows = [row for row, o in enumerate(owners) if o == owner]
                index = torch.tensor(layer.token_indices[owner], device=output.device)
                delta = layer.trainable_tokens_delta[owner].to(output.dtype)
                if isinstance(layer.base_layer, torch.nn.Embedding):
                    scale = layer._get_embed_scale() if hasattr(layer, "_get_embed_scale") else None
                    delta = delta if scale is None else delta * scale.to(output.dtype)
                    for row in rows:
                        match = args[0][row, :, None] == index  # [positions, indicator tokens]
                        hit = match.any(-1)
                        if hit.any():
                            output[row, hit] = match[hit].to(output.dtype) @ delta
                else:  # the tied head: the indicator logits come from the expert's rows
                    for row in rows:
                        output[row, :, index] = args[0][row] @ delta.T
            return output

        self._active_alora = any(self.alora.get(owner) for owner in owners)
        token_layers = [m for m in self.model.modules() if isinstance(m, TrainableTokensLayer) and not m.merged]
        hooks = [m.register_forward_pre_hook(adapter_names, with_kwargs=True)
                 for m in self.model.modules() if isinstance(m, LoraLayer)]
        hooks += [layer.register_forward_hook(substitute) for layer in token_layers]
        for layer in token_layers:  # marked merged with nothing written: their forward is the base's
            layer.merged_adapters.append(BASE)
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for layer in token_layers:
                layer.merged_adapters.remove(BASE)

    # -- forward passes -----------------------------------------------------------------------------
    def _extend(self, state: _Rows | None, chunks: Sequence[Sequence[int]], keep: int,
                tail: int | Sequence[int] | None = None) -> tuple[_Rows, torch.Tensor]:
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
            ids[row, width - len(chunk):] = torch.tensor(list(chunk), dtype=torch.long)
            new_mask[row, width - len(chunk):] = 1
        ids, new_mask = ids.to(self.device), new_mask.to(self.device)
        if state is None:
            state = _Rows(DynamicCache(), new_mask[:, :0], torch.zeros(len(chunks), dtype=torch.long,
                                                                       device=self.device))
        positions = state.next_pos[:, None] + (new_mask.cumsum(-1) - 1).clamp(min=0)
        mask = torch.cat([state.mask, new_mask], dim=1)
        offsets = [width] * len(chunks) if tail is None else [tail] * len(chunks) if isinstance(tail, int) else list(tail)
        kwargs = {"alora_offsets": offsets} if self._active_alora else {}
        with _grouped_kv_heads(self.device):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=keep, **{cache_keyword(): state.cache}, **kwargs)
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)
        return _Rows(returned_cache(out), mask, state.next_pos + new_mask.sum(-1)), logprobs

    def _prefill(self, owner: str, prompts: Sequence[Sequence[int]], keep: int,
                 tail: int | None = None) -> tuple[_Rows, torch.Tensor]:
        """Fresh prefill of `prompts` by `owner` (already active): returns the rows' state and
        log-probs at the last `keep` positions. Runs of prompts that share more than all of them
        do (`prefix_cache.shared_runs`) are prefilled apart, each on its own cached head."""
        if self.prefix_cache.max_tokens == 0 or len(prompts) == 1:
            return self._prefill_shared(owner, prompts, keep, tail)
        parts = [self._prefill_shared(owner, [prompts[r] for r in run], keep, tail)
                 for run in shared_runs(prompts, self.prefix_cache.block)]
        return _merge([state for state, _ in parts]), torch.cat([logprobs for _, logprobs in parts])

    def _prefill_shared(self, owner: str, prompts: Sequence[Sequence[int]], keep: int,
                        tail: int | None = None) -> tuple[_Rows, torch.Tensor]:
        """`_prefill` of prompts prefilled together, reusing a cached shared prefix.

        The block-aligned part of the prompts' common prefix that the cache lacks is stored for
        later prompts. Several prompts compute it once, in a pass of its own before their rests; a
        single prompt computes everything in one pass (a pass streams every weight, which costs as
        much as a few dozen prompt tokens) and the head is cut from its KV afterwards. The head
        never reaches into the last `keep` positions or an aLoRA expert's `tail`.
        """
        shared = min(common_prefix_length(prompts), min(len(p) for p in prompts) - max(keep, tail or 0))
        aligned = max(0, shared) // self.prefix_cache.block * self.prefix_cache.block
        length, layers = self.prefix_cache.lookup(owner, prompts[0][:aligned]) if aligned else (0, None)
        missing = aligned > length and self.prefix_cache.max_tokens > 0
        if missing and len(prompts) > 1:
            head = _state(layers, 1, length, self.device) if layers is not None else None
            head, _ = self._extend(head, [prompts[0][length:aligned]], 1, 0)
            layers, length = [(layer.keys, layer.values) for layer in head.cache.layers], aligned
            self.prefix_cache.store(owner, prompts[0][:aligned], layers)
            missing = False
        parts = []
        for rows in _chunks([len(p) - length for p in prompts], self.prefill_tokens):
            state = _state(layers, len(rows), length, self.device) if layers is not None else None
            parts.append(self._extend(state, [prompts[r][length:] for r in rows], keep, tail))
        state = _merge([state for state, _ in parts])
        logprobs = torch.cat([logprobs for _, logprobs in parts])
        if missing:  # one prompt, no padding: its first `aligned` cached positions are the head
            self.prefix_cache.store(owner, prompts[0][:aligned],
                                    [(layer.keys, layer.values) for layer in state.cache.layers])
        return state, logprobs

    @torch.inference_mode()
    def _decode(self, state: _Rows, first: Sequence[Sequence[int]], budgets: Sequence[int],
                ignore_eos: bool = False, owners: list[str] | None = None) -> list[list[int]]:
        """Greedy continuation: feed `first` tokens per row, then generate up to each row's budget
        (exactly that many tokens with `ignore_eos`). `owners` (the rows' owners under `_use_rows`)
        is kept in step with the rows as they finish."""
        results: list[list[int]] = [[] for _ in budgets]
        live = list(range(len(budgets)))
        # The decode's own copy of the KV, in buffers that each step fills in place
        capacity = state.mask.shape[1] + max(len(f) for f in first) + max(budgets, default=0)
        state = _Rows(kv_buffer([(layer.keys, layer.values) for layer in state.cache.layers], capacity),
                      state.mask, state.next_pos)
        state, logprobs = self._extend(state, first, 1)
        while live:
            tokens = logprobs[:, -1].argmax(-1).tolist()
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

    # -- routing ------------------------------------------------------------------------------------
    def _check(self, expert: str, batch: list[int], prompts, bodies: _Rows | None) -> tuple[list[Check], _Rows]:
        """One expert's pass over the open queries `batch`: its verdicts and the rows' state after it."""
        prefix = list(self.indicators.shared_prefix)
        with torch.inference_mode(), self._use(expert):
            if bodies is not None:  # aLoRA: fork the base's body KV, feed invocation + indicator prefix
                state = bodies.fork([self._rows[i] for i in batch])
                state, logprobs = self._extend(state, [self.invocation + prefix] * len(batch), len(prefix) + 1)
            else:
                tail = len(self.alora[expert]) + len(prefix)
                state, logprobs = self._prefill(expert, [prompts[i] + prefix for i in batch], len(prefix) + 1, tail)
        threshold = threshold_for(self.threshold, expert)
        return [Check(expert, *decide(logprobs[row], self.indicators, threshold)) for row in range(len(batch))], state

    def _base_start(self, batch: list[int], prompts, bodies: _Rows | None) -> tuple[_Rows, list[list[int]]]:
        """The base's state for answering `batch` and the tokens still to feed before its answer."""
        if bodies is not None:  # continue on the base's own body KV
            return bodies.fork([self._rows[i] for i in batch]), [list(self.invocation)] * len(batch)
        with torch.inference_mode(), self._use(BASE):
            state, _ = self._prefill(BASE, [prompts[i][:-1] for i in batch], 1)
        return state, [list(prompts[i][-1:]) for i in batch]

    def _answer(self, groups: list[tuple[str, list[int], _Rows, list[list[int]]]], budgets, texts) -> None:
        """Greedy answers of one batch's routed queries, decoded together whichever owner each has.

        A group is (owner, query indices, their state, tokens to feed first). One decode of all of
        them streams the weights once per step, where a decode per expert would stream them once
        per step per expert.
        """
        owners = [owner for owner, queries, _, _ in groups for _ in queries]
        queries = [index for _, batch, _, _ in groups for index in batch]
        first = [tokens for _, _, _, firsts in groups for tokens in firsts]
        state = _merge([state for _, _, state, _ in groups])
        groups.clear()  # the merged copy is all that decoding needs
        with torch.inference_mode(), self._use_rows(owners):
            answers = self._decode(state, first, [budgets[i] for i in queries], owners=owners)
        for index, tokens in zip(queries, answers):
            texts[index] = self.formatter.decode(tokens)

    def _prefill_bodies(self, batch: list[int], prompts) -> _Rows:
        """aLoRA: the base prefills the prompt bodies (everything before the invocation) once."""
        n = len(self.invocation)
        for i in batch:
            if len(prompts[i]) <= n or list(prompts[i][-n:]) != self.invocation:
                raise ValueError("aLoRA routing needs every prompt to end with the invocation tokens")
        self._rows = {index: row for row, index in enumerate(batch)}
        with torch.inference_mode(), self._use(BASE):
            state, _ = self._prefill(BASE, [prompts[i][:-n] for i in batch], 1)
        return state

    def run(self, queries: Sequence[str], budgets: Sequence[int]) -> tuple[list[str], list[Route]]:
        """Texts and routes; a budget of 0 only routes the query (no answer is generated)."""
        prompts = [self.formatter.prompt_ids(q) for q in queries]
        texts = [""] * len(queries)
        routes: list[Route | None] = [None] * len(queries)
        # Each batch walks the experts alone, so memory stays bounded by one batch's KV.
        order = batch_order(prompts, self.prefix_cache.block)
        continuation = list(self.indicators.pos_ids[len(self.indicators.shared_prefix):])
        for start in range(0, len(order), self.batch_size):
            chunk = order[start: start + self.batch_size]
            bodies = self._prefill_bodies(chunk, prompts) if self.invocation else None
            groups = []  # (owner, queries, state, first tokens): answered together after the walk

            def check(expert: str, idx: list[int]) -> list[Check]:
                batch = [chunk[i] for i in idx]
                checks, state = self._check(expert, batch, prompts, bodies)
                claimed = [row for row, c in enumerate(checks) if c.verdict == "pos" and budgets[batch[row]] > 0]
                if claimed:
                    groups.append((expert, [batch[r] for r in claimed], state.fork(claimed),
                                   [continuation] * len(claimed)))
                return checks

            chunk_routes = walk(len(chunk), self.experts[::-1], check)
            for index, route in zip(chunk, chunk_routes):
                routes[index] = route
            unclaimed = [chunk[i] for i, r in enumerate(chunk_routes)
                         if r.answered_by == BASE and budgets[chunk[i]] > 0]
            if unclaimed:
                groups.append((BASE, unclaimed, *self._base_start(unclaimed, prompts, bodies)))
            bodies = None  # freed before decoding: less memory live while every step reallocates the KV
            if groups:
                self._answer(groups, budgets, texts)
        return texts, routes  # type: ignore[return-value]

    def generate(self, owner: str, queries: Sequence[str], max_new_tokens: int | Sequence[int],
                 forced: Sequence[int] = (), ignore_eos: bool = False) -> list[str]:
        """Greedy answers of one adapter (or BASE) without routing, after the `forced` tokens.

        The single-model baseline: the same batching, prefix cache and decoding as routed queries;
        `ignore_eos` decodes exactly `max_new_tokens` per query (equal work for a timing baseline).
        """
        budgets = [max_new_tokens] * len(queries) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        prompts = [self.formatter.prompt_ids(q) + list(forced) for q in queries]
        texts = [""] * len(queries)
        order = batch_order(prompts, self.prefix_cache.block)
        with torch.inference_mode(), self._use(owner):
            for start in range(0, len(order), self.batch_size):
                batch = order[start: start + self.batch_size]
                state, _ = self._prefill(owner, [prompts[i][:-1] for i in batch], 1)
                answers = self._decode(state, [prompts[i][-1:] for i in batch], [budgets[i] for i in batch],
                                       ignore_eos)
                for index, tokens in zip(batch, answers):
                    texts[index] = self.formatter.decode(tokens)
        return texts

    def response_nll(self, queries: Sequence[str], responses: Sequence[str], owners: Sequence[str]
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
                    batch = members[start: start + self.batch_size]
                    prompts = [self.formatter.prompt_ids(queries[i]) + (pos if owner != BASE else []) for i in batch]
                    targets = [self.formatter.text_ids(responses[i]) + [self.eos_id] for i in batch]
                    width = max(len(t) for t in targets)
                    tail = [len(self.alora.get(owner) or []) + len(pos) + len(t) for t in targets]
                    _, logprobs = self._extend(None, [p + t for p, t in zip(prompts, targets)], width + 1, tail)
                    for row, (index, target) in enumerate(zip(batch, targets)):
                        predicting = logprobs[row, width - len(target): width]  # positions before each target token
                        nll = -predicting.gather(1, torch.tensor(target)[:, None].to(predicting.device)).sum()
                        out[index] = (float(nll), len(target))
        return out

    def route(self, queries: Sequence[str]) -> list[Route]:
        return self.run(queries, [0] * len(queries))[1]

    def ask(self, queries: Sequence[str], max_new_tokens: int | Sequence[int] = 64) -> list[Answer]:
        """Answer a batch of queries; every answer carries its route."""
        budgets = [max_new_tokens] * len(queries) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        texts, routes = self.run(list(queries), budgets)
        return [Answer(q, t, r) for q, t, r in zip(queries, texts, routes)]

