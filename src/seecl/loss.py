"""The training loss: summed cross-entropy over supervised positions, computing only what it needs.

Owns how a micro-batch's loss is computed: logits only at supervised positions, the trained
indicator rows substituted without PEFT's full-matrix copies, shared prompt heads run once, and
for activated-LoRA adapters the prompt bodies run without autograd (the adapter starts at the
invocation, so nothing before it depends on a trained parameter). Does not own batching, the
optimizer or the loop (training.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from seecl.data.prompts import IGNORE, common_prefix_length
from seecl.model.kv import cache_keyword, returned_cache

TOKEN_ROWS = "trainable_tokens_delta"  # PEFT's name for trained embedding rows (the indicators)


def causal_lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone, output head) of a transformers causal LM, through a PEFT wrapper if present."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.base_model, lm.get_output_embeddings()


def is_alora(model: torch.nn.Module) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and getattr(config, "alora_invocation_tokens", None))


def alora_offsets(model: torch.nn.Module, input_ids: torch.Tensor) -> list[int | None]:
    """Per row, how many trailing positions start at the last invocation (None: not found)."""
    from peft.tuners.lora.variants import calculate_alora_offsets

    return calculate_alora_offsets(model.peft_config, model.active_adapter, input_ids)


def invocation_starts(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> list[int | None]:
    """Per row of a training batch, where the active aLoRA adapter's invocation starts: right before
    the row's first supervised token when the invocation tokens end its prompt there, else PEFT's
    last occurrence (None: not found). Searching the whole row would find a one-token invocation
    (a newline) inside the answer, and the adapter would then start there."""
    invocation = list(model.active_peft_config.alora_invocation_tokens)
    n, width = len(invocation), input_ids.shape[1]
    starts = []
    for row, row_labels, offset in zip(input_ids, labels, alora_offsets(model, input_ids)):
        supervised = (row_labels != IGNORE).nonzero()
        first = int(supervised[0]) if len(supervised) else -1
        if first >= n and row[first - n : first].tolist() == invocation:
            starts.append(first - n)
        else:
            starts.append(None if offset is None else width - offset)  # PEFT counts from the padded end
    return starts


def alora_scope(model: torch.nn.Module, input_ids: torch.Tensor, offsets: list[int | None] | None = None):
    """For an active aLoRA adapter, tell its layers where each row's invocation starts.

    PEFT does this in PeftModel.forward; the loss calls the backbone directly, so without this an
    aLoRA adapter would never be applied (nor trained). `offsets` overrides the search.
    """
    if not is_alora(model):
        return contextlib.nullcontext()
    if offsets is None:
        offsets = alora_offsets(model, input_ids)
    return model.base_model._enable_peft_forward_hooks(alora_offsets=offsets)


def prefix_groups(
    rows: list[list[int]], first_targets: list[int], min_tokens: int
) -> tuple[list[tuple[list[int], int]], list[int]]:
    """Rows that share a loss-free head of at least `min_tokens` tokens, and the rest.

    Returns ([(row indices, shared head length), ...], remaining row indices). A head may not reach
    a row's first supervised token's predecessor (`first_targets[i] - 1`): the logits there must
    come from the per-row pass.
    """
    buckets: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(rows):
        if min_tokens > 0 and first_targets[i] - 1 >= min_tokens:
            buckets.setdefault(tuple(row[:min_tokens]), []).append(i)
    groups, grouped = [], set()
    for members in buckets.values():
        if len(members) < 2:
            continue
        head = min(common_prefix_length([rows[i] for i in members]), min(first_targets[i] - 1 for i in members))
        groups.append((members, head))
        grouped.update(members)
    return groups, [i for i in range(len(rows)) if i not in grouped]


def token_rows(module: torch.nn.Module) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor] | None:
    """(layer, token ids, their trained rows) of an unmerged PEFT trainable-tokens layer (or the
    wrapper around one) with one active adapter that trains rows; None for any other module
    (which then runs its own forward)."""
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    layer = getattr(module, "token_adapter", module)  # PEFT's TrainableTokensWrapper around the layer
    if not isinstance(layer, TrainableTokensLayer) or layer.merged or layer.disable_adapters:
        return None
    active = [a for a in layer.active_adapters if a in layer.trainable_tokens_delta]
    if len(active) != 1 or len(active) != len(layer.active_adapters):
        return None
    delta = layer.trainable_tokens_delta[active[0]]
    return layer, torch.tensor(layer.token_indices[active[0]], device=delta.device), delta


def backbone_inputs(backbone: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keyword inputs for the backbone: embeddings with the trained indicator rows substituted.

    PEFT's trainable-tokens layer builds a full copy of the [vocabulary x hidden] embedding matrix
    with the trained rows in it on every forward, and a dense gradient of that size on every
    backward; on a 135M model that is about a tenth of a training step. Looking up the frozen table
    and replacing the indicator positions gives the same embeddings and the same gradients.
    """
    rows = token_rows(backbone.get_input_embeddings())
    if rows is None or not isinstance(rows[0].base_layer, torch.nn.Embedding):
        return {"input_ids": input_ids}
    layer, index, delta = rows
    embeds = layer.base_layer(input_ids)
    replacement = delta.to(embeds.dtype)
    scale = layer._get_embed_scale() if hasattr(layer, "_get_embed_scale") else None
    if scale is not None:  # scaled embeddings (Gemma): PEFT scales the substituted rows as well
        replacement = replacement * scale.to(embeds.dtype)
    match = input_ids[..., None] == index
    # A one-hot product rather than indexing: indexing's backward accumulates into the two rows in
    # a thread-dependent order, which made a resumed run drift from an uninterrupted one.
    substituted = match.to(embeds.dtype) @ replacement
    return {"inputs_embeds": torch.where(match.any(-1, keepdim=True), substituted, embeds)}


def head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Output-head logits with the trained indicator rows of a tied head, without PEFT's full copy
    of the head matrix and its dense gradient (see `backbone_inputs`)."""
    rows = token_rows(head)
    if rows is None or not isinstance(rows[0].base_layer, torch.nn.Linear):
        return head(hidden)
    layer, index, delta = rows
    logits = F.linear(hidden, layer.base_layer.weight)  # PEFT's tied head has no bias either
    return logits.index_copy(-1, index, hidden @ delta.to(hidden.dtype).T)


class SupervisedLoss(torch.nn.Module):
    """Summed cross-entropy over supervised positions, computing logits only there.

    Equal to the model's own shifted loss (times the number of supervised tokens), without the
    [batch x length x vocabulary] logits tensor. Rows whose prompts share a head of at least
    `share_prefix_tokens` tokens (a task definition, a system prompt) run that head once and
    continue from its KV cache, with gradients flowing through it. For an aLoRA adapter the
    prompt bodies run without autograd instead (see `_alora_tail_loss`). A module so that DDP sees
    a normal forward. Counts the tokens and causal attention pairs it actually computes.
    """

    def __init__(self, model: torch.nn.Module, share_prefix_tokens: int = 0):
        super().__init__()
        self.model = model
        self.share_prefix_tokens = share_prefix_tokens
        self.computed_tokens = 0
        self.attention_pairs = 0

    def forward(self, input_ids, attention_mask, labels):
        backbone, head = causal_lm_parts(self.model)
        lengths = attention_mask.sum(1).tolist()
        alora = is_alora(self.model)
        invoked = invocation_starts(self.model, input_ids, labels) if alora else None
        starts = self._alora_starts(backbone, input_ids, labels, lengths, invoked) if alora else None
        if starts is not None:
            return self._alora_tail_loss(backbone, head, input_ids, labels, lengths, starts)
        groups, rest = [], list(range(len(lengths)))
        if self.share_prefix_tokens and not alora:
            rows = [input_ids[i, :n].tolist() for i, n in enumerate(lengths)]
            supervised = (labels != IGNORE).int()
            first_targets = [int(supervised[i].argmax()) if supervised[i].any() else n for i, n in enumerate(lengths)]
            groups, rest = prefix_groups(rows, first_targets, self.share_prefix_tokens)
        loss = input_ids.new_zeros((), dtype=torch.float32)
        for members, shared in groups:
            loss = loss + self._shared_head_loss(
                backbone, head, input_ids, attention_mask, labels, members, shared, lengths
            )
        if rest:
            index = torch.tensor(rest, device=input_ids.device)
            width = max(lengths[i] for i in rest)
            ids, mask = input_ids[index, :width], attention_mask[index, :width]
            offsets = [None if invoked[i] is None else width - invoked[i] for i in rest] if alora else None
            with alora_scope(self.model, ids, offsets):
                hidden = backbone(
                    **backbone_inputs(backbone, ids), attention_mask=mask, use_cache=False
                ).last_hidden_state
            loss = loss + self._head_loss(head, hidden[:, :-1], labels[index, 1:width])
            self.computed_tokens += sum(lengths[i] for i in rest)
            self.attention_pairs += sum(lengths[i] * (lengths[i] + 1) // 2 for i in rest)
        return loss

    def _alora_starts(self, backbone, input_ids, labels, lengths, invoked) -> list[int] | None:
        """The invocation starts `invoked`, if every row's body (the positions before its start) can
        run without autograd: nothing before the invocation is supervised (the first invocation
        token's label included) and the body holds no trained token row. None otherwise."""
        rows = token_rows(backbone.get_input_embeddings())
        starts = []
        for i, (length, start) in enumerate(zip(lengths, invoked)):
            if start is None or not 0 < start < length:
                return None
            if (labels[i, : start + 1] != IGNORE).any():
                return None
            if rows is not None and torch.isin(input_ids[i, :start], rows[1]).any():
                return None
            starts.append(start)
        return starts

    def _alora_tail_loss(self, backbone, head, input_ids, labels, lengths, starts):
        """aLoRA: the bodies (left-padded) run once without autograd through the base alone (the
        adapter is inactive before the invocation); the tails (right-padded) continue from their
        KV with the adapter on and gradients. Same loss and gradients as the full pass, without
        the backward through the bodies."""
        n, device = len(lengths), input_ids.device
        body_width, tail_width = max(starts), max(length - start for length, start in zip(lengths, starts))
        body_ids, body_mask = input_ids.new_zeros((n, body_width)), input_ids.new_zeros((n, body_width))
        tail_ids, tail_mask = input_ids.new_zeros((n, tail_width)), input_ids.new_zeros((n, tail_width))
        tail_labels = input_ids.new_full((n, tail_width), IGNORE)
        for i, (length, start) in enumerate(zip(lengths, starts)):
            body_ids[i, body_width - start :], body_mask[i, body_width - start :] = input_ids[i, :start], 1
            tail_ids[i, : length - start], tail_mask[i, : length - start] = input_ids[i, start:length], 1
            tail_labels[i, : length - start] = labels[i, start:length]
        with torch.no_grad():  # no alora_offsets: PEFT's aLoRA layers act as the base model
            body = backbone(
                **backbone_inputs(backbone, body_ids),
                attention_mask=body_mask,
                position_ids=(body_mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
            )
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(tail_width, device=device)
        with alora_scope(self.model, tail_ids, offsets=[tail_width] * n):
            hidden = backbone(
                **backbone_inputs(backbone, tail_ids),
                attention_mask=torch.cat([body_mask, tail_mask], 1),
                position_ids=positions,
                use_cache=True,
                **{cache_keyword(): returned_cache(body)},
            ).last_hidden_state
        self.computed_tokens += sum(lengths)
        self.attention_pairs += sum(length * (length + 1) // 2 for length in lengths)
        return self._head_loss(head, hidden[:, :-1], tail_labels[:, 1:])

    def _shared_head_loss(self, backbone, head, input_ids, attention_mask, labels, members, shared, lengths):
        from transformers import DynamicCache

        index = torch.tensor(members, device=input_ids.device)
        width = max(lengths[i] for i in members)
        prefix = backbone(**backbone_inputs(backbone, input_ids[members[0] : members[0] + 1, :shared]), use_cache=True)
        n = len(members)
        cache = DynamicCache(
            ddp_cache_data=[
                (layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1))
                for layer in returned_cache(prefix).layers
            ]
        )
        hidden = backbone(
            **backbone_inputs(backbone, input_ids[index, shared:width]),
            attention_mask=attention_mask[index, :width],
            use_cache=True,
            **{cache_keyword(): cache},
        ).last_hidden_state
        suffixes = [lengths[i] - shared for i in members]
        self.computed_tokens += shared + sum(suffixes)
        self.attention_pairs += shared * (shared + 1) // 2 + sum(s * shared + s * (s + 1) // 2 for s in suffixes)
        return self._head_loss(head, hidden[:, :-1], labels[index, shared + 1 : width])

    @staticmethod
    def _head_loss(head, hidden, targets):
        keep = targets != IGNORE
        logits = head_logits(head, hidden[keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
