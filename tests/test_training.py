"""The trainer: stratified, length-grouped and seeded batch plans; losses equal to their full-logit
references (sparse, aLoRA, shared prefixes); accumulation; only the new adapter changes."""

import pytest
import torch

from oracles import reference_loss
from seecl.adapters import add_expert, invocation_tokens
from seecl.config import AdapterConfig, TrainConfig
from seecl.data.prompts import Example, PromptFormatter
from seecl.data.synthetic import make_task
from seecl.loss import SupervisedLoss, invocation_starts, prefix_groups
from seecl.training import collate, plan_batches, train


def assert_loss_and_grads_equal_reference(model, loss, batch) -> dict:
    """`loss` (already computed on `batch`) and its gradients equal the full-logits reference."""
    reference = reference_loss(model, batch)
    assert torch.allclose(loss, reference, rtol=1e-5), (loss, reference)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    reference_loss(model, batch).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[n], p.grad, atol=1e-6), n
    return grads


def fake_examples(n_pos, n_neg, pos_len=10, neg_len=30):
    pos = [
        Example(tuple(range(pos_len + i % 3)), tuple([-100] * (pos_len - 2) + [1, 2] + [3] * (i % 3)), True)
        for i in range(n_pos)
    ]
    neg = [
        Example(tuple(range(neg_len + i % 5)), tuple([-100] * (neg_len - 2) + [4, 2] + [-100] * (i % 5)), False)
        for i in range(n_neg)
    ]
    return pos + neg


@pytest.mark.parametrize("n_pos, n_neg, batch", [(100, 30, 4), (100, 10, 8), (40, 40, 8), (50, 7, 4)])
def test_stratified_batches_mix_classes_in_proportion(n_pos, n_neg, batch):
    examples = fake_examples(n_pos, n_neg)
    for epoch in range(3):
        batches = plan_batches(examples, batch, seed=0, epoch=epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(examples))), "every example once per epoch"
        share = n_neg / len(examples)
        n_batches = len(batches)
        for b in batches:
            negatives = sum(not examples[i].positive for i in b)
            positives = len(b) - negatives
            assert n_neg // n_batches <= negatives <= -(-n_neg // n_batches)
            assert n_pos // n_batches <= positives <= -(-n_pos // n_batches)
            if share >= 1 / batch:
                assert positives and negatives, "no single-class batch when both classes fit"


def test_length_grouping_alone_segregates_longer_negatives():
    examples = fake_examples(100, 30)
    batches = plan_batches(examples, 4, seed=0, epoch=0, mode="length")
    all_negative = sum(all(not examples[i].positive for i in b) for b in batches)
    assert all_negative >= 5, "the failure mode that stratified batching exists to prevent"


def test_stratified_batches_group_lengths_inside_classes():
    examples = fake_examples(160, 40)
    batches = plan_batches(examples, 5, seed=0, epoch=0)
    random_batches = plan_batches(examples, 5, seed=0, epoch=0, mode="random")

    def padding(plan):
        return sum(
            max(len(examples[i]) for i in b if examples[i].positive == cls)
            * sum(examples[i].positive == cls for i in b)
            - sum(len(examples[i]) for i in b if examples[i].positive == cls)
            for b in plan
            for cls in (True, False)
            if any(examples[i].positive == cls for i in b)
        )

    assert padding(batches) < padding(random_batches)


def test_plan_is_seeded():
    examples = fake_examples(30, 10)
    assert plan_batches(examples, 4, 1, 0) == plan_batches(examples, 4, 1, 0)
    assert plan_batches(examples, 4, 1, 0) != plan_batches(examples, 4, 1, 1)


def _tiny_expert(base):
    cfg = AdapterConfig(r=4, alpha=8, dropout=0.0)
    model = add_expert(base.model, "e", cfg, base.indicators, seed=0)
    with torch.no_grad():  # a non-trivial adapter, so the comparison means something
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_sparse_supervised_loss_equals_full_logits_loss(fresh_tiny_base):
    base = fresh_tiny_base
    model = _tiny_expert(base)
    fmt = PromptFormatter(base.tokenizer, base.indicators)
    task = make_task("add", "train", 6)
    examples = [fmt.see_example(i.query, i.response if k % 2 else None) for k, i in enumerate(task.instances)]
    batch = collate(examples, base.tokenizer.pad_token_id)
    assert_loss_and_grads_equal_reference(model, SupervisedLoss(model)(**batch), batch)


def test_supervised_loss_never_materialises_the_embedding_matrix(fresh_tiny_base, monkeypatch):
    """The indicator rows are substituted, not copied into a [vocab x hidden] matrix per forward."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    base = fresh_tiny_base
    model = _tiny_expert(base)
    fmt = PromptFormatter(base.tokenizer, base.indicators)
    examples = [
        fmt.see_example(i.query, i.response if k % 2 else None)
        for k, i in enumerate(make_task("add", "train", 4).instances)
    ]
    batch = collate(examples, base.tokenizer.pad_token_id)
    reference = reference_loss(model, batch)

    def refuse(*args, **kwargs):
        raise AssertionError("full embedding matrix built")

    monkeypatch.setattr(TrainableTokensLayer, "get_merged_weights", refuse)
    loss = SupervisedLoss(model, share_prefix_tokens=4)(**batch)
    loss.backward()
    assert torch.allclose(loss, reference, rtol=1e-5)
    rows = [p for n, p in model.named_parameters() if "trainable_tokens_delta" in n]
    assert rows and all(p.grad is not None and p.grad.abs().sum() > 0 for p in rows)


def test_alora_loss_runs_bodies_without_autograd_and_equals_the_full_pass(fresh_tiny_base, monkeypatch):
    """aLoRA: nothing before the invocation depends on a trained parameter, so the prompt bodies run
    under no_grad; the loss and every gradient equal PEFT's own full-logits aLoRA forward."""
    base = fresh_tiny_base
    fmt = PromptFormatter(base.tokenizer, base.indicators)
    cfg = AdapterConfig(r=4, alpha=8, dropout=0.0, kind="alora")
    model = add_expert(base.model, "e", cfg, base.indicators, seed=0, invocation_tokens=fmt.invocation_ids())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    examples = [
        fmt.see_example(i.query, i.response if k % 2 else None)
        for k, i in enumerate(make_task("uppercase", "train", 6).instances)
    ]
    batch = collate(examples, base.tokenizer.pad_token_id)
    loss_fn = SupervisedLoss(model)
    lengths = batch["attention_mask"].sum(1).tolist()
    backbone = model.get_base_model().base_model
    invoked = invocation_starts(model, batch["input_ids"], batch["labels"])
    starts = loss_fn._alora_starts(backbone, batch["input_ids"], batch["labels"], lengths, invoked)
    assert starts is not None and all(0 < s < n for s, n in zip(starts, lengths)), "the split applies"

    seen_grad_modes = []
    real_forward = type(backbone).forward

    def spy(self, *args, **kwargs):
        seen_grad_modes.append(torch.is_grad_enabled())
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(backbone), "forward", spy)
    loss = loss_fn(**batch)
    monkeypatch.undo()
    assert seen_grad_modes == [False, True], "bodies without autograd, then the tails with it"
    grads = assert_loss_and_grads_equal_reference(model, loss, batch)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n), "the adapter is trained"


def test_a_one_token_alora_invocation_starts_at_the_prompt_end_even_when_the_answer_holds_it(fresh_tiny_base):
    """`adapter.alora_invocation=last_token`: the adapter is invoked by the header's last token (a
    newline), which answers hold too. Training acts from the prompt's end, as routing does, not
    from the token's last occurrence (PEFT's search), and so equals PEFT's forward given the
    prompt-end offsets."""
    base = fresh_tiny_base
    fmt = PromptFormatter(base.tokenizer, base.indicators)
    cfg = AdapterConfig(r=4, alpha=8, dropout=0.0, kind="alora", alora_invocation="last_token")
    invocation = invocation_tokens(cfg, fmt.invocation_ids())
    assert invocation == fmt.invocation_ids()[-1:]
    model = add_expert(base.model, "e", cfg, base.indicators, seed=0, invocation_tokens=invocation)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    newline = base.tokenizer.decode(invocation)
    examples = [fmt.see_example(f"question {k}", f"one{newline}two{newline}three" if k % 2 else None) for k in range(4)]
    assert any(invocation[0] in e.input_ids[len(fmt.prompt_ids(f"question {k}")) :] for k, e in enumerate(examples))
    batch = collate(examples, base.tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    prompt_ends = [len(fmt.prompt_ids(f"question {k}")) for k in range(4)]
    starts = invocation_starts(model, batch["input_ids"], batch["labels"])
    assert starts == [end - 1 for end in prompt_ends]

    def peft_loss(offsets):
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], alora_offsets=offsets
        ).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )

    loss = SupervisedLoss(model)(**batch)
    assert torch.allclose(loss, peft_loss([width - s for s in starts]), rtol=1e-5)
    assert not torch.allclose(loss, reference_loss(model, batch), rtol=1e-3), "PEFT's search starts elsewhere"


def test_prefix_groups_share_only_loss_free_heads():
    rows = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9, 9, 9], [1, 2, 3, 7, 7], [8, 8, 8, 8, 8], [8, 8, 8, 8, 1]]
    first_targets = [5, 6, 4, 2, 4]  # row 3 is supervised from its third token on
    groups, rest = prefix_groups(rows, first_targets, 3)
    assert groups == [([0, 1, 2], 3)] and rest == [3, 4]
    assert prefix_groups(rows, first_targets, 0) == ([], [0, 1, 2, 3, 4])
    groups, _ = prefix_groups(rows[:2], [6, 6], 3)
    assert groups == [([0, 1], 4)]  # the common head, not just the minimum


def test_shared_prefix_loss_equals_per_row_loss(fresh_tiny_base):
    """Rows sharing a task definition run it once; loss and gradients equal the plain computation."""
    base = fresh_tiny_base
    model = _tiny_expert(base)
    fmt = PromptFormatter(base.tokenizer, base.indicators)
    definition = "Definition: add the two numbers and answer with the sum only, in digits. " * 3
    own = [fmt.see_example(definition + i.query, i.response) for i in make_task("add", "train", 4).instances]
    others = [fmt.see_example(i.query, None) for i in make_task("uppercase", "train", 2).instances]
    examples = [own[0], others[0], own[1], own[2], others[1], own[3]]
    assert len({len(e) for e in examples}) > 2  # mixed lengths: right padding inside a group
    batch = collate(examples, base.tokenizer.pad_token_id)
    shared_loss = SupervisedLoss(model, share_prefix_tokens=8)
    loss = shared_loss(**batch)
    assert shared_loss.computed_tokens < sum(len(e) for e in examples) - 2 * 20
    assert_loss_and_grads_equal_reference(model, loss, batch)


def test_training_reduces_loss_and_touches_only_the_new_adapter(fresh_tiny_base):
    base = fresh_tiny_base
    frozen = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    model = add_expert(base.model, "e", AdapterConfig(r=4, alpha=8, dropout=0.0), base.indicators, seed=0)
    fmt = PromptFormatter(base.tokenizer, base.indicators)
    examples = [fmt.see_example(i.query, i.response) for i in make_task("sentiment", "train", 16).instances]
    cfg = TrainConfig(epochs=8, lr=5e-3, batch_size=8, micro_batch_size=4, progress=False)
    result = train(model, examples, cfg, base.tokenizer.pad_token_id)
    assert result.steps == 16 and result.final_loss < result.losses[0] - 0.3
    assert result.supervised_tokens == 8 * sum(e.supervised for e in examples)
    for name, param in model.get_base_model().named_parameters():
        clean = name.replace(".base_layer", "")
        if clean in frozen:
            assert param.equal(frozen[clean]), f"base weight {name} changed"


def test_gradient_accumulation_matches_one_big_batch(fresh_tiny_base):
    base = fresh_tiny_base
    fmt = PromptFormatter(base.tokenizer, base.indicators)
    examples = [fmt.see_example(i.query, i.response) for i in make_task("add", "train", 8).instances]
    finals = []
    model = base.model
    for micro in (8, 2):
        model = add_expert(model, f"m{micro}", AdapterConfig(r=4, alpha=8, dropout=0.0), base.indicators, seed=0)
        cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=8, micro_batch_size=micro, progress=False)
        train(model, examples, cfg, base.tokenizer.pad_token_id)
        finals.append(torch.cat([p.detach().flatten() for n, p in model.named_parameters() if f".m{micro}" in n]))
    assert torch.allclose(finals[0], finals[1], atol=1e-5)
