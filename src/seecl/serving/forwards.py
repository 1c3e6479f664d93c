"""How a batch of rows is fed through the shared PEFT model: the forwards the routing engine runs.

Owns the forward of new tokens on top of a batch state (`_extend`: left-padded chunks, position
ids, aLoRA offsets, log-probs at the last positions only), fresh prefills (`_prefill`):

- a batch is prefilled in chunks of at most `prefill_tokens` (rows x padded width), each chunk
  writing into the batch's own buffers (`batch_kv`), sized once for everything the batch will
  append, where a growing cache would copy the whole KV at every forward;
- a prefix cache per owner (an expert, or the base; `prefix_cache.PrefixCache`), so prompts that
  share a task definition or system prompt prefill it once, in a batch or one query at a time; a
  batch that spans two definitions prefills each run of rows on its own head;

and which owner a forward runs under (`_use`, `_use_rows`, through `owners`). Does not route,
choose tokens or know about queries: the engine (`engine.RoutingEngine`) does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from seecl.data.prompts import common_prefix_length
from seecl.model.kv import cache_keyword, kv_cache, kv_over, kv_shape, returned_cache
from seecl.serving.batch_kv import Rows, allocate, row_chunks
from seecl.serving.owners import dense_head_input, grouped_kv_heads, use_owner, use_row_owners
from seecl.serving.prefix_cache import PrefixCache, shared_runs


class BatchForwards:
    """Forwards of batch states over a PEFT model holding one adapter per expert."""

    def __init__(
        self,
        model,
        experts: Sequence[str],
        pad_id: int,
        prefix_cache_tokens: int = 4096,
        prefix_block: int = 8,
        prefill_tokens: int = 512,
    ):
        self.model, self.pad_id, self.prefill_tokens = model, pad_id, prefill_tokens
        self.prefix_cache = PrefixCache(prefix_cache_tokens, prefix_block)
        self.device = next(model.parameters()).device
        self.kv_shape = kv_shape(model)
        self._kv_like = model.get_input_embeddings().weight  # dtype and device of the KV buffers
        # aLoRA experts act only from their invocation tokens (the assistant-turn header) on
        configs = getattr(model, "peft_config", {})
        self.alora = {name: list(getattr(configs[name], "alora_invocation_tokens", None) or []) for name in experts}
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
