"""One shared harness: every method runs two synthetic stages on the tiny model through the protocol."""

import json

import pytest

from conftest import TINY
from seecl.cache import AdapterCache
from seecl.config import load_config
from seecl.data.synthetic import general_task, make_task
from seecl.evaluation.protocol import EvalSet, Protocol
from seecl.methods.base import MethodContext
from seecl.methods.registry import build_method, parse_label
from seecl.training import forbid_training

TASKS = ["uppercase", "add"]
LABELS = ["MTL", "AvgSTL", "Non-rehearsal", "RandSel(25%)", "KMeansSel(25%)", "SSR(25%)", "SEE(25%)", "MoSEs", "SETA"]


def run_protocol(tmp_path, label, tasks=TASKS, **kwargs):
    cfg = load_config(overrides=TINY + ["train.epochs=3", "see.memory_tau=0.25", "generate.max_new_tokens=8"])
    ctx = MethodContext(cfg, tmp_path / "methods" / label, AdapterCache(tmp_path / "cache"), general=general_task())
    method = build_method(label, ctx)
    train = [make_task(n, "train", 16) for n in tasks]
    evals = {n: EvalSet(make_task(n, "eval", 4), budget=6) for n in tasks}
    protocol = Protocol(
        method,
        train,
        evals,
        ctx.workdir,
        ood_queries=[i.query for i in general_task().instances[:4]],
        log=lambda _: None,
        **kwargs,
    )
    return method, protocol, protocol.run()


@pytest.mark.parametrize("label", LABELS)
def test_every_method_through_the_shared_harness(tmp_path, label, monkeypatch):
    method, protocol, summary = run_protocol(tmp_path, label)
    matrix = summary["matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    if method.schedule == "sequential":
        assert matrix[0][0] is not None and None not in matrix[1], "diagonal and final row"
        assert matrix[0][1] is None
        assert summary["BWT"] == pytest.approx(matrix[1][0] - matrix[0][0])
    elif method.schedule == "joint":
        assert matrix[0] == [None, None] and None not in matrix[1] and summary["BWT"] is None
    else:
        assert matrix[0][0] is not None and matrix[1][1] is not None and matrix[1][0] is None
    assert summary["AR"] is not None and 0 <= summary["AR"] <= 100
    assert set(summary["per_task"]) == set(TASKS)
    parameters = summary["trainable_parameters"]
    assert len(parameters) == 2 and parameters[-1] > 0
    assert (parameters[0] is None) == (method.schedule == "joint"), "counts sit at their stage's position"
    if method.routed:
        routing = summary["routing"]
        assert routing["n_ood"] == 4 and 0 <= summary["rb_acc"] <= 1 and 0 <= summary["routing_f1"] <= 1
        assert sum(map(sum, routing["confusion"])) == 8
    else:
        assert summary["routing_f1"] is None and summary["rb_acc"] is None

    # Resume: a new process on the same directory recomputes nothing and trains nothing.
    with forbid_training():
        _, again, resumed = run_protocol(tmp_path, label)
    assert resumed["matrix"] == matrix and resumed["AR"] == summary["AR"]

    # Scoring again from scratch after every stage is trained (a lost protocol.json, a new metric)
    # sees each stage as it was: same scores, same parameter counts, nothing retrained.
    (again.workdir / "protocol.json").unlink()
    with forbid_training():
        _, _, rescored = run_protocol(tmp_path, label)
    assert rescored["matrix"] == matrix
    assert rescored["trainable_parameters"] == summary["trainable_parameters"]


def test_final_routing_is_scored_on_the_final_ensemble_after_an_earlier_stage_is_rescored(tmp_path):
    _, protocol, summary = run_protocol(tmp_path, "SEE(25%)")
    state = json.loads(protocol.path.read_text())
    del state["cells"][f"0:{TASKS[0]}"], state["routing"], state["perplexity"]
    protocol.path.write_text(json.dumps(state))
    _, _, rescored = run_protocol(tmp_path, "SEE(25%)")
    assert rescored["routing"]["confusion"] == summary["routing"]["confusion"]
    assert rescored["perplexity"] == summary["perplexity"]
    assert rescored["matrix"] == summary["matrix"]


def test_the_perplexity_scores_the_final_rows_routes_without_routing_again(tmp_path, monkeypatch):
    from seecl.serving.engine import RoutingEngine

    _, protocol, summary = run_protocol(tmp_path, "SEE(25%)")
    state = json.loads(protocol.path.read_text())
    del state["perplexity"]
    protocol.path.write_text(json.dumps(state))
    monkeypatch.setattr(RoutingEngine, "route", lambda *_: pytest.fail("the perplexity routed the queries again"))
    with forbid_training():
        _, _, rescored = run_protocol(tmp_path, "SEE(25%)")
    assert rescored["perplexity"] == pytest.approx(summary["perplexity"], rel=1e-6)


def test_a_copy_without_ensembles_and_predictions_resumes_from_the_cache(tmp_path, monkeypatch):
    """What a new machine gets of a run (protocol.json and the adapter cache) is enough to go on."""
    import shutil

    _, protocol, summary = run_protocol(tmp_path, "SEE(25%)")
    state = json.loads(protocol.path.read_text())
    del state["routing"], state["perplexity"]  # interrupted after the final row, before routing
    protocol.path.write_text(json.dumps(state))
    shutil.rmtree(protocol.workdir / "ensemble")
    shutil.rmtree(protocol.workdir / "predictions")
    with forbid_training():
        _, _, resumed = run_protocol(tmp_path, "SEE(25%)")
    assert resumed["routing"]["confusion"] == summary["routing"]["confusion"]
    assert resumed["matrix"] == summary["matrix"] and resumed["rb_acc"] == summary["rb_acc"]


def test_interrupted_stage_resumes_without_retraining_the_finished_one(tmp_path, monkeypatch):
    import seecl.training as single

    real_train, calls = single.train, []

    def crash_on_second_stage(model, examples, *args, **kwargs):
        calls.append(len(examples))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during stage 2")
        return real_train(model, examples, *args, **kwargs)

    monkeypatch.setattr(single, "train", crash_on_second_stage)
    with pytest.raises(KeyboardInterrupt):
        run_protocol(tmp_path, "RandSel(25%)")
    state = json.loads((tmp_path / "methods" / "RandSel(25%)" / "protocol.json").read_text())
    assert list(state["cells"]) == ["0:uppercase"], "stage 1 was scored before the crash"
    monkeypatch.setattr(single, "train", real_train)
    calls.clear()
    monkeypatch.setattr(single, "train", lambda m, e, *a, **k: calls.append(len(e)) or real_train(m, e, *a, **k))
    _, _, summary = run_protocol(tmp_path, "RandSel(25%)")
    assert calls == [16 + 4], "only stage 2 trains: 16 new instances + 25% of 16 rehearsed"
    assert None not in summary["matrix"][1]


def test_identical_first_stages_are_trained_once(tmp_path, monkeypatch):
    import seecl.training as single

    real_train, calls = single.train, []
    monkeypatch.setattr(single, "train", lambda m, e, *a, **k: calls.append(len(e)) or real_train(m, e, *a, **k))
    run_protocol(tmp_path, "Non-rehearsal")
    run_protocol(tmp_path, "RandSel(25%)")
    assert calls == [16, 16, 20], "RandSel's stage 1 is Non-rehearsal's stage 1, from the cache"


def test_mtl_is_one_model_whatever_the_task_order(tmp_path):
    _, _, first = run_protocol(tmp_path / "a", "MTL")
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "cache").rename(tmp_path / "b" / "cache")
    with forbid_training():
        _, _, reversed_order = run_protocol(tmp_path / "b", "MTL", tasks=TASKS[::-1])
    assert reversed_order["per_task"] == first["per_task"] and reversed_order["AR"] == first["AR"]


def test_a_finished_ssr_stage_is_found_by_its_inputs_without_synthesizing_again(tmp_path, monkeypatch):
    from seecl.methods.ssr import SelfSynthesizedRehearsal

    _, _, first = run_protocol(tmp_path / "a", "SSR(25%)")
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "cache").rename(tmp_path / "b" / "cache")  # the adapters, not the synthetic text
    # greedy decoding elsewhere may write other synthetic text; a cached stage never asks for any
    monkeypatch.setattr(SelfSynthesizedRehearsal, "synthesize", lambda *a: pytest.fail("synthesized again"))
    with forbid_training():
        _, _, again = run_protocol(tmp_path / "b", "SSR(25%)")
    assert again["matrix"] == first["matrix"] and again["trainable_parameters"] == first["trainable_parameters"]


def test_labels():
    assert parse_label("SEE(10%)-aLoRA") == ("SEE", 0.1, "aLoRA")
    assert parse_label("Non-rehearsal") == ("Non-rehearsal", None, None)
    assert parse_label("SEE(10%)-general-calibrated") == ("SEE", 0.1, "general-calibrated")
    from seecl.errors import ConfigError

    with pytest.raises(ConfigError):
        build_method("Magic(3%)", None)
    for bad in ("SEE(10%)-general-magic", "SEE(10%)-general-general"):
        with pytest.raises(ConfigError):
            build_method(bad, None)


def test_combined_variants_apply_every_switch(tmp_path):
    cfg = load_config(overrides=TINY)
    ctx = MethodContext(
        cfg, tmp_path / "m", AdapterCache(tmp_path / "cache"), general=general_task(), general_negatives=3
    )
    see = build_method("SEE(10%)-general-calibrated", ctx).ensemble.config.see
    assert see.calibrate and see.general_negatives == 3 and see.tau == 0.1
    adapter = build_method("SEE(10%)-aLoRA-lasttoken", ctx).ensemble.config.adapter
    assert adapter.kind == "alora" and adapter.alora_invocation == "last_token"
    from seecl.errors import ConfigError

    with pytest.raises(ConfigError, match="add `aLoRA`"):
        build_method("SEE(10%)-lasttoken", ctx)


def test_cache_keys_of_experts_cached_before_alora_invocation_existed_stay_valid():
    """The setting enters an adapter's cache material only where it changes the adapter."""
    from seecl.adapters import cache_material
    from seecl.config import AdapterConfig

    assert "alora_invocation" not in cache_material(AdapterConfig())
    assert "alora_invocation" not in cache_material(AdapterConfig(kind="alora"))
    assert (
        cache_material(AdapterConfig(kind="alora", alora_invocation="last_token"))["alora_invocation"] == "last_token"
    )


def test_randsel_replays_the_sample_drawn_when_the_task_was_learned():
    """SSR's selection (which the SEE paper follows) draws each task's sample once: by the last
    stage task 1 has exposed tau*|D_1| instances, not a fresh draw at every stage."""
    from seecl.methods.replay import Replay

    cfg = load_config(overrides=TINY)
    tasks = [make_task(n, "train", 40) for n in ["reverse_list", "uppercase", "add", "km_to_m"]]
    replay = Replay(MethodContext(cfg, __import__("pathlib").Path("/nonexistent"), None), "RandSel(10%)", 0.1, "random")
    first = {t.name: [] for t in tasks}
    for stage in range(1, len(tasks)):
        for inst in replay.rehearsal(tasks[:stage], tasks[stage], None):
            first[next(t.name for t in tasks if inst in t.instances)].append(inst.id)
    assert first["reverse_list"][:4] == first["reverse_list"][4:8] == first["reverse_list"][8:], "same 4 each stage"
    assert len(set(first["reverse_list"])) == 4 and len(set(first["uppercase"])) == 4
    fresh = Replay(MethodContext(cfg, __import__("pathlib").Path("/nonexistent"), None), "RandSel(10%)", 0.1, "random")
    assert fresh.rehearsal(tasks[:3], tasks[3], None) == replay.rehearsal(tasks[:3], tasks[3], None), (
        "a resumed run draws the same samples"
    )


def _changed(task, suffix="!"):
    """The task with every response edited: other training data under the same name."""
    from seecl.data.task import Instance, Task

    return Task(task.name, tuple(Instance(i.id, i.query, (i.response + suffix,)) for i in task.instances), task.source)


def test_results_computed_on_other_data_are_computed_again(tmp_path):
    """Edited data (a label-sorted file fixed in place) must never leave its old scores in a rerun:
    cells whose stage or eval set changed are scored again, the others are kept."""
    cfg = load_config(overrides=TINY + ["train.epochs=2", "generate.max_new_tokens=4"])
    ctx = MethodContext(cfg, tmp_path / "m", AdapterCache(tmp_path / "cache"))
    train = [make_task(n, "train", 12) for n in TASKS]
    evals = {n: EvalSet(make_task(n, "eval", 3), budget=4) for n in TASKS}
    logs = []
    Protocol(build_method("Non-rehearsal", ctx), train, evals, ctx.workdir, log=logs.append).run()
    first = json.loads((ctx.workdir / "protocol.json").read_text())

    edited = [train[0], _changed(train[1])]
    method = build_method("Non-rehearsal", ctx)
    scored = []
    real = method.answer
    method.answer = lambda queries, budgets: scored.append(len(queries)) or real(queries, budgets)
    Protocol(method, edited, evals, ctx.workdir, log=logs.append).run()
    state = json.loads((ctx.workdir / "protocol.json").read_text())
    assert scored == [3, 3], "stage 2's cells only: stage 1 learned the same data"
    assert state["cells"]["0:uppercase"] == first["cells"]["0:uppercase"]
    assert state["stages"]["1"]["fingerprint"] != first["stages"]["1"]["fingerprint"]
    assert any("data changed" in line and "stage 2 add" in line for line in logs)

    # a legacy state without fingerprints is scored again rather than trusted
    for cell in state["cells"].values():
        del cell["fingerprint"]
    (ctx.workdir / "protocol.json").write_text(json.dumps(state))
    method = build_method("Non-rehearsal", ctx)
    scored.clear()
    method.answer = lambda queries, budgets: scored.append(len(queries)) or real(queries, budgets)
    Protocol(method, edited, evals, ctx.workdir, log=logs.append).run()
    assert scored == [3, 3, 3]


def test_a_see_run_rebuilds_its_ensemble_when_a_task_changed(tmp_path):
    cfg = load_config(overrides=TINY + ["train.epochs=2", "see.memory_tau=0.25", "generate.max_new_tokens=4"])
    ctx = MethodContext(cfg, tmp_path / "m", AdapterCache(tmp_path / "cache"))
    train = [make_task(n, "train", 12) for n in TASKS]
    evals = {n: EvalSet(make_task(n, "eval", 3), budget=4) for n in TASKS}
    Protocol(build_method("SEE(25%)", ctx), train, evals, ctx.workdir, log=lambda _: None).run()
    edited = [_changed(train[0]), train[1]]
    method = build_method("SEE(25%)", ctx)
    Protocol(method, edited, evals, ctx.workdir, log=lambda _: None).run()
    experts = method.ensemble.store.records()
    assert [e["data_fingerprint"] for e in experts] == [t.fingerprint() for t in edited]


def test_evaluation_reports_progress_per_batch(tmp_path, monkeypatch):
    """Long evaluations show counts and ETA: every scored cell, the OOD routing and the perplexity
    get a bar that finished batches advance by the queries they held."""
    import seecl.progress

    bars = []

    class Bar:
        def __init__(self, total, desc, enabled):
            self.desc, self.total, self.n = desc, total, 0
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(seecl.progress, "make_bar", Bar)
    run_protocol(tmp_path, "SEE(25%)", progress=True)
    names = [b.desc for b in bars]
    assert names[:3] == ["SEE(25%) stage 1 uppercase", "SEE(25%) stage 2 uppercase", "SEE(25%) stage 2 add"]
    assert "SEE(25%) OOD routing" in names and "SEE(25%) perplexity" in names
    assert all(b.n == b.total > 0 for b in bars if b.desc != "SEE(25%) perplexity"), [
        (b.desc, b.n, b.total) for b in bars
    ]
    # SSR's synthesis, minutes per stage on a CPU, shows the inputs written and the answers too
    bars.clear()
    run_protocol(tmp_path / "ssr", "SSR(25%)", progress=True)
    synthesis = [b for b in bars if b.desc.startswith("SSR(25%) stage 2 uppercase ")]
    # (the answers' bar follows when the tiny random model wrote any usable input)
    assert [b.desc for b in synthesis][:1] == ["SSR(25%) stage 2 uppercase inputs"]
    assert [b.desc for b in synthesis][1:] in ([], ["SSR(25%) stage 2 uppercase answers"])
    assert all(b.n == b.total > 0 for b in synthesis)
