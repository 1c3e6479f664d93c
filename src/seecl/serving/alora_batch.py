"""Every aLoRA expert's check of a batch in one forward over the batch's shared prompt bodies.

An activated-LoRA expert leaves every position before its invocation (the assistant-turn header) to
the base model, so all experts read the same prefilled body; a check is only the invocation and
indicator-prefix positions after it. Here the checks of all M experts become M segments of one
row per query, appended after the body in its own buffers (the body KV is not copied per expert):
a 4D attention mask lets each segment see the body and itself only, every segment starts at the
body's next position, and each adapted layer applies the segment's own expert's LoRA (stacked
A/B matrices, one einsum per layer) where PEFT would apply one adapter per row. The decision
logits of each segment come from its expert's indicator rows when experts train their own.

The engine walks the verdicts newest first exactly as the sequential walk would (`routing.walk`
over precomputed checks), so routes and answers are those of asking one expert after another.
Owns the segment forward; does not own the decision rule, the walk, or answering.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from seecl.model.kv import cache_keyword
from seecl.serving.batch_kv import Rows
from seecl.serving.owners import grouped_kv_heads


@contextlib.contextmanager
def segment_lora(model, experts: Sequence[str], segment: int) -> Iterator[None]:
    """Within the block, the i-th `segment` positions of every row run under `experts[i]`'s LoRA."""
    from peft.tuners.lora import LoraLayer

    count = len(experts)
    patched = []
    for layer in model.modules():
        if not isinstance(layer, LoraLayer) or not all(name in layer.lora_A for name in experts):
            continue
        rank = max(layer.lora_A[name].weight.shape[0] for name in experts)
        like = layer.lora_A[experts[0]].weight
        a = like.new_zeros((count, rank, like.shape[1]))
        b = like.new_zeros((count, layer.lora_B[experts[0]].weight.shape[0], rank))
        for i, name in enumerate(experts):
            r = layer.lora_A[name].weight.shape[0]
            a[i, :r] = layer.lora_A[name].weight
            b[i, :, :r] = layer.lora_B[name].weight
        scale = torch.tensor([layer.scaling[name] for name in experts], dtype=like.dtype, device=like.device)

        def forward(x, *args, _layer=layer, _a=a, _b=b, _scale=scale, **kwargs):
            result = _layer.base_layer(x, *args)
            rows, length, width = x.shape
            parts = x.view(rows, count, segment, width).to(_a.dtype)
            delta = torch.einsum("bmsi,mri->bmsr", parts, _a)
            delta = torch.einsum("bmsr,mor->bmso", delta, _b) * _scale.view(1, count, 1, 1)
            return result + delta.reshape(rows, length, -1).to(result.dtype)

        layer.forward = forward  # shadows the class's forward for this block only
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward


@contextlib.contextmanager
def segment_indicator_rows(model, experts: Sequence[str], kept_per_segment: int) -> Iterator[None]:
    """The indicator logits of segment i's kept positions come from expert i's own rows (PEFT
    trainable tokens, tied head); every other logit from the base's weights."""
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer) and not m.merged]
    hooks = []

    def substitute(layer, args, output):
        if isinstance(layer.base_layer, torch.nn.Embedding):
            return output  # the segments feed no indicator token (aLoRA invocations are template tokens)
        for i, name in enumerate(experts):
            if name not in layer.trainable_tokens_delta:
                continue
            index = torch.tensor(layer.token_indices[name], device=output.device)
            positions = slice(i * kept_per_segment, (i + 1) * kept_per_segment)
            rows = layer.trainable_tokens_delta[name].to(output.dtype)
            output[:, positions, index] = args[0][:, positions] @ rows.T
        return output

    for layer in layers:
        hooks.append(layer.register_forward_hook(substitute))
        layer.merged_adapters.append("base")  # marked merged with nothing written: the base weights
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for layer in layers:
            layer.merged_adapters.remove("base")


def check_logprobs(model, bodies: Rows, experts: Sequence[str], tokens: Sequence[int], keep: int) -> torch.Tensor:
    """Log-probs [rows, experts, keep, vocab] at the last `keep` positions of each expert's check
    (`tokens`: the invocation and the indicators' shared prefix) after every row's body.

    The checks' KV is written after the bodies, expert i's at positions body + i*len(tokens) onwards
    (`bodies.room` must hold len(experts) * len(tokens) positions); `bodies` itself is left as it was.
    """
    segment, count = len(tokens), len(experts)
    rows, body = bodies.mask.shape
    device = bodies.mask.device
    width = count * segment
    ids = torch.tensor(list(tokens) * count, dtype=torch.long, device=device).expand(rows, width)
    offsets = torch.arange(width, device=device) % segment
    positions = bodies.next_pos[:, None] + offsets[None, :]
    own = torch.arange(width, device=device) // segment
    tails = (own[:, None] == own[None, :]) & (offsets[None, :] <= offsets[:, None])  # [width, width]
    mask = torch.cat(
        [bodies.mask.bool()[:, None, None, :].expand(rows, 1, width, body), tails.expand(rows, 1, width, width)], -1
    )
    kept = torch.tensor(
        [i * segment + segment - keep + j for i in range(count) for j in range(keep)], dtype=torch.long, device=device
    )
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    bodies.rewind()
    with segment_lora(model, experts, segment), segment_indicator_rows(model, experts, keep), grouped_kv_heads(device):
        out = inner(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=kept,
            **{cache_keyword(): bodies.cache},
        )
    bodies.rewind()
    return torch.log_softmax(out.logits.float(), dim=-1).view(rows, count, keep, -1)
