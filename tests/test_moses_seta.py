"""MoSEs and SETA on the tiny model: frozen old tasks, the growth rule, sublinear parameters,
elastic anchoring, gate routing, resuming from snapshots and TRACE-format data."""

import json

import pytest
import torch

from conftest import TINY
from seecl import training
from seecl.cache import AdapterCache
from seecl.config import load_config
from seecl.data.formats import load_task
from seecl.data.synthetic import make_task
from seecl.methods.base import MethodContext
from seecl.methods.moses import MoSEs, needs_new_expert, straight_through, top_fraction
from seecl.methods.seta import SETA, anchor_penalty
from seecl.model.generation import left_pad
from seecl.training import forbid_training

NAMES = ("uppercase", "add", "sentiment")


def context(tmp_path, *overrides):
    cfg = load_config(overrides=TINY + ["train.epochs=1", "generate.max_new_tokens=4", *overrides])
    return MethodContext(cfg, tmp_path / "method", AdapterCache(tmp_path / "cache"))


def tasks(split="train", n=12):
    return [make_task(name, split, n) for name in NAMES]


def task_logits(method, queries, task):
    prompts = [method.formatter.prompt_ids(q) for q in queries]
    method.activate(task)
    with torch.no_grad():
        logits = method.model(**left_pad(prompts, method.base.tokenizer.pad_token_id, method.base.device)).logits
    method.activate(None)
    return logits


def routing_accuracy(method, eval_tasks):
    queries = [i.query for t in eval_tasks for i in t.instances]
    truth = [t.name for t in eval_tasks for _ in t.instances]
    routes = method.routes(queries)
    return sum(r.answered_by == t for r, t in zip(routes, truth)) / len(truth)


# ----------------------------------------------------------------------------- MoSEs


def test_growth_rule():
    assert needs_new_expert(0.29, 0.3)
    assert not needs_new_expert(0.3, 0.3) and not needs_new_expert(0.8, 0.3)


def test_straight_through_mask_is_hard_forward_and_identity_backward():
    scores = torch.rand(4, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    mask = straight_through(scores, 0.25)
    assert torch.equal(mask, top_fraction(scores, 0.25).float()) and int(mask.sum()) == 5
    (mask * torch.arange(20.0).view(4, 5)).sum().backward()
    assert torch.equal(scores.grad, torch.arange(20.0).view(4, 5))


def test_moses_freezes_old_tasks_grows_by_rule_and_sublinearly(tmp_path, monkeypatch):
    ctx = context(tmp_path, "moses.grow_below=0.45")
    method = MoSEs(ctx)
    train, evals = tasks(), tasks("eval", 6)
    queries = [[i.query for i in t.instances] for t in evals]
    stages, logits, answers, params = [], {}, {}, []
    for stage in range(3):
        stages.append(method.learn(train[: stage + 1]))
        params.append(method.trainable_parameters())
        logits[stage] = task_logits(method, queries[stage], stage)
        answers[stage] = [a.text for a in method.answer(queries[stage], [4] * 6, task=NAMES[stage])]
        for old in range(stage):
            assert torch.equal(task_logits(method, queries[old], old), logits[old]), f"task {old + 1} changed"
            assert [a.text for a in method.answer(queries[old], [4] * 6, task=NAMES[old])] == answers[old]
    # The rule, end to end: after task 1 half the pool is free (>= 0.45: no growth); after task 2,
    # the second mask's new claims leave less than 0.45 free: one sub-expert joins.
    for metrics in stages:
        assert metrics["grew"] == needs_new_expert(metrics["free_fraction_before"], 0.45)
    assert [m["grew"] for m in stages] == [False, False, True]
    assert [m["experts"] for m in stages] == [2, 2, 3]
    assert stages[0]["free_fraction"] == pytest.approx(0.5)
    assert params[2] < 3 * params[0], f"parameters {params} grow sublinearly"
    accuracy = routing_accuracy(method, evals)
    print(f"MoSEs prototype routing accuracy on 3 synthetic tasks: {accuracy:.2f}")
    assert accuracy >= 0.9

    # A new process on the same directory restores every stage bit-identically, without training.
    again = MoSEs(ctx)
    with forbid_training():
        assert again.learn(train)["cached"] is True
    for stage in range(3):
        assert torch.equal(task_logits(again, queries[stage], stage), logits[stage])
    assert again.trainable_parameters() == params[2]


# ----------------------------------------------------------------------------- SETA


def test_anchor_penalty_is_zero_at_the_anchor_and_grows_with_distance():
    gen = torch.Generator().manual_seed(0)
    anchor = torch.randn(6, 5, generator=gen)
    fisher = torch.rand(6, 5, generator=gen) * (torch.rand(6, 5, generator=gen) > 0.5)
    direction = torch.randn(6, 5, generator=gen)
    values = [float(anchor_penalty(anchor + t * direction, anchor, fisher)) for t in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert values[0] == 0.0
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert float(anchor_penalty(anchor + direction * (fisher == 0), anchor, fisher)) == 0.0, (
        "unanchored entries are free"
    )


def test_seta_gate_routes_tasks_and_unique_experts_stay_frozen(tmp_path, monkeypatch):
    ctx = context(tmp_path, "seta.probe=4")
    method = SETA(ctx)
    penalties = []
    real_train = training.train

    def recording_train(model, examples, cfg, pad_id, regularizer=None, **kwargs):
        before = float(regularizer().detach()) if regularizer else None
        result = real_train(model, examples, cfg, pad_id, regularizer=regularizer, **kwargs)
        penalties.append((before, float(regularizer().detach()) if regularizer else None))
        return result

    monkeypatch.setattr(training, "train", recording_train)
    train, evals = tasks(), tasks("eval", 8)
    stages = [method.learn(train[:1])]
    first = {n: (idx.clone(), val.clone()) for n, (idx, val) in method.uniques[0].items()}
    assert any(val.abs().sum() > 0 for _, val in first.values()), "the unique expert trained"
    stages += [method.learn(train[:2]), method.learn(train[:3])]
    for name, (idx, val) in method.uniques[0].items():
        assert torch.equal(idx, first[name][0]) and torch.equal(val, first[name][1])
    for name in method.layers:
        owned = torch.cat([expert[name][0] for expert in method.uniques]).tolist()
        assert len(owned) == len(set(owned)), "unique experts are disjoint"
    assert penalties[0] == (None, None), "nothing to anchor at the first task"
    assert all(before == 0.0 and after > 0.0 for before, after in penalties[1:]), penalties
    assert stages[1]["shared_entries"] > 0
    params = [s["trainable_parameters"] for s in stages]
    assert params[0] < params[1] < params[2]
    accuracy = routing_accuracy(method, evals)
    print(f"SETA gate routing accuracy on 3 synthetic tasks: {accuracy:.2f}")
    assert accuracy >= 0.9

    again = SETA(ctx)
    with forbid_training():
        assert again.learn(train)["cached"] is True
    assert [r.answered_by for r in again.routes([i.query for t in evals for i in t.instances])] == [
        r.answered_by for r in method.routes([i.query for t in evals for i in t.instances])
    ]
    for k in range(3):
        for name, (_, val) in method.uniques[k].items():
            assert torch.equal(again.uniques[k][name][1], val)


# ----------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("cls", [MoSEs, SETA])
def test_interrupted_stage_resumes_to_the_state_of_an_uninterrupted_run(tmp_path, monkeypatch, cls):
    train, queries = tasks()[:2], [i.query for i in tasks("eval", 4)[1].instances]
    options = ["seta.probe=2"] if cls is SETA else []
    reference = cls(context(tmp_path / "reference", *options))
    reference.learn(train)
    real_train, calls = training.train, []

    def crash_on_second_stage(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during stage 2")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train", crash_on_second_stage)
    with pytest.raises(KeyboardInterrupt):
        cls(context(tmp_path / "run", *options)).learn(train)
    calls.clear()
    monkeypatch.setattr(training, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    resumed = cls(context(tmp_path / "run", *options))
    assert resumed.learn(train)["cached"] is False and calls == [1], "only stage 2 trains"
    assert torch.equal(task_logits(resumed, queries, 1), task_logits(reference, queries, 1))
    assert resumed.trainable_parameters() == reference.trainable_parameters()


# ----------------------------------------------------------------------------- TRACE data


def write_trace(folder, make):
    folder.mkdir(parents=True)
    for split, offset in (("train", 0), ("eval", 100), ("test", 200)):
        items = [make(offset + i) for i in range(8)]
        (folder / f"{split}.json").write_text(json.dumps([{"prompt": p, "answer": a} for p, a in items]))
    return folder


@pytest.mark.parametrize("cls", [MoSEs, SETA])
def test_learn_and_answer_on_trace_folders(tmp_path, cls):
    colors = write_trace(tmp_path / "colors", lambda i: (f"Name the colour of object number {i}.", "red"))
    double = write_trace(tmp_path / "double", lambda i: (f"{i} * 2 = ?", str(2 * i)))
    train = [load_task(colors), load_task(double)]
    assert [t.name for t in train] == ["colors", "double"]
    method = cls(context(tmp_path, *(["seta.probe=2"] if cls is SETA else [])))
    for stage in range(2):
        assert method.learn(train[: stage + 1])["cached"] is False
    queries = [i.query for folder in (colors, double) for i in load_task(folder, split="test").instances[:3]]
    answers = method.answer(queries, [4] * len(queries))
    assert len(answers) == 6 and all(isinstance(a.text, str) for a in answers)
    assert {a.route.answered_by for a in answers} <= {"colors", "double"}
    assert method.trainable_parameters() > 0
