"""Which weights a forward of the shared PEFT model runs under: one owner (an expert, or the bare
base), or a different owner per row of the batch.

An expert's indicator rows (PEFT trainable tokens) are merged into the shared embedding for the
duration of its pass, and substituted per row in a mixed batch: PEFT would otherwise rebuild the
full [vocabulary x hidden] embedding matrix at every forward. Also owns two forward-speed switches
for CPU inference (grouped KV heads read as they are, a dense input to the output head).
Does not own which owner answers which query (`routing`, `engine`) or the KV cache (`batch_kv`).
"""

from __future__ import annotations

import contextlib
import os

import torch

from seecl.serving.routing import BASE


@contextlib.contextmanager
def grouped_kv_heads(device: torch.device):
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


def dense_head_input(model) -> None:
    """Give the output head a dense input, once per model.

    The head is given the last `keep` positions of the hidden states as a strided view, which makes
    its [vocabulary x hidden] product several times slower on CPU than a dense input.
    """
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_seecl_dense_input", False):
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]) if args else args)
        head._seecl_dense_input = True


@contextlib.contextmanager
def use_owner(model, owner: str):
    """`owner`'s adapter active (its indicator rows merged), or the bare base for BASE."""
    if owner == BASE:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield
        return
    from peft.tuners.trainable_tokens import TrainableTokensLayer

    model.set_adapter(owner)
    # The owner's indicator rows are written into the shared embedding (and tied head) weight in
    # place and the layers marked merged, so their forward uses the plain weight. PEFT's own
    # merge would allocate a new [vocab x hidden] matrix per switch, and allocated inside
    # inference mode it could not take part in a later training step.
    layers = [
        m
        for m in model.modules()
        if isinstance(m, TrainableTokensLayer) and owner in m.trainable_tokens_delta and not m.merged
    ]
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
def use_row_owners(model, owners: list[str]):
    """Each row of a forward under its own owner (an expert or BASE); `owners` is read at every
    forward, so it may be shortened in place as rows finish.

    The LoRA layers take PEFT's mixed-adapter batches (`adapter_names`). Each expert's indicator
    rows are substituted at its own rows of the embedding output and of the tied head's logits
    (PEFT's mixed trainable tokens would build a [vocabulary x hidden] matrix per expert at
    every forward).
    """
    if len(set(owners)) == 1:
        with use_owner(model, owners[0]):
            yield
        return
    from peft.tuners.lora import LoraLayer
    from peft.tuners.trainable_tokens import TrainableTokensLayer

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

    token_layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer) and not m.merged]
    hooks = [
        m.register_forward_pre_hook(adapter_names, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, LoraLayer)
    ]
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
