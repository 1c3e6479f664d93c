"""Batched greedy decoding and last-position scoring over left-padded prompts.

Owns padding, position ids for left-padded rows, length-sorted batching and cutting answers at the
end-of-turn token. Which adapter is active is the caller's business.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from seecl.progress import advance


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": position_ids.to(device)}


def _batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar prompt length (less padding)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def last_logprobs(
    model, prompts: Sequence[Sequence[int]], positions: int, pad_id: int, batch_size: int = 16
) -> torch.Tensor:
    """Log-probabilities of the next token at each of the last `positions` prompt positions.

    Returns a float tensor [len(prompts), positions, vocab]; only those positions get logits.
    """
    device = _device(model)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for batch in _batches(prompts, batch_size):
        inputs = left_pad([prompts[i] for i in batch], pad_id, device)
        logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, index in enumerate(batch):
            out[index] = logprobs[row]
    return torch.stack(out)  # type: ignore[arg-type]


@torch.inference_mode()
def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    eos_id: int,
    pad_id: int,
    batch_size: int = 16,
    suppress: Sequence[int] = (),
) -> list[list[int]]:
    """Greedy continuation of each prompt, cut after the first end-of-turn token (excluded).

    `max_new_tokens` may differ per prompt; prompts are batched by budget and then by length.
    `suppress` are token ids never generated (the routing indicators, in an answer).
    """
    from transformers import GenerationConfig

    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    device = _device(model)
    results: list[list[int]] = [[] for _ in prompts]
    for budget in sorted(set(budgets)):
        members = [i for i, b in enumerate(budgets) if b == budget]
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=budget,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            suppress_tokens=list(suppress) or None,
        )
        for batch in _batches([prompts[i] for i in members], batch_size):
            indices = [members[i] for i in batch]
            inputs = left_pad([prompts[i] for i in indices], pad_id, device)
            inputs.pop("position_ids")  # generate derives them from the attention mask
            generated = model.generate(**inputs, generation_config=config)
            width = inputs["input_ids"].shape[1]
            for row, index in enumerate(indices):
                tokens = generated[row, width:].tolist()
                if eos_id in tokens:
                    tokens = tokens[: tokens.index(eos_id)]
                results[index] = tokens
            advance(len(indices))
    return results
