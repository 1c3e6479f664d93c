"""`model.indicator_rows=shared`: the first expert's trained rows become the ensemble's, every expert
is a plain LoRA adapter (what vLLM serves), and routing is the same from disk as in memory."""

import json

import pytest
from safetensors import safe_open

from seecl.config import load_config
from seecl.data.synthetic import make_task
from seecl.see.ensemble import SeeEnsemble
from seecl.serving.engine import RoutingEngine

NAMES = ["reverse_list", "uppercase", "add"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from conftest import TINY, learn_ensemble

    return learn_ensemble(tmp_path_factory.mktemp("shared") / "ens", TINY + ["model.indicator_rows=shared"], NAMES)


def test_every_expert_is_a_plain_lora_adapter(shared):
    for name in NAMES:
        directory = shared.store.expert_dir(name)
        config = json.loads((directory / "adapter_config.json").read_text())
        assert not config.get("trainable_token_indices"), name
        with safe_open(str(directory / "adapter_model.safetensors"), "pt") as handle:
            assert all(".lora_A." in k or ".lora_B." in k for k in handle.keys()), name
    manifest = shared.store.manifest()
    assert manifest["indicator_rows"]["trained_by"] == NAMES[0]
    assert manifest["model"]["indicator_rows"] == "shared"
    assert not list(shared.store.root.glob(".rows-*")), "no staging left behind"


def test_the_shared_rows_are_the_first_experts_trained_rows_and_live_in_the_base(shared):
    token_ids, rows, _ = shared.store.shared_rows()
    assert token_ids == shared.base.indicators.trainable_token_ids
    ((path, values),) = rows.items()
    weight = shared.base.model.get_submodule(path).weight
    assert weight[token_ids].tolist() == values.tolist()


def test_the_experts_route_their_own_tasks_and_a_reopened_ensemble_routes_the_same(shared, tmp_path):
    queries = [i.query for n in NAMES for i in make_task(n, "eval", 4).instances]
    routes = shared.route(queries)
    correct = sum(r.answered_by == n for r, n in zip(routes, [n for n in NAMES for _ in range(4)]))
    assert correct >= 10, [r.answered_by for r in routes]
    again = SeeEnsemble.open(shared.store.root, ["model.name=tiny-random", "train.progress=false"])
    assert again.config.model.indicator_rows == "shared"
    assert [r.answered_by for r in again.route(queries)] == [r.answered_by for r in routes]
    reference = again.router().ask(queries, 5)
    fast = RoutingEngine(again.model, again.formatter(), again.experts()).ask(queries, 5)
    assert [a.text for a in fast] == [a.text for a in reference]


def test_a_later_expert_trains_lora_weights_only(shared):
    record = shared.store.records()[1]
    first = shared.store.records()[0]
    assert record["trainable_parameters"] < first["trainable_parameters"], "no indicator rows of its own"


def test_records_say_which_expert_trained_the_rows_and_over_which_rows_the_others_trained(shared):
    first, *later = shared.store.records()
    assert first["config"]["adapter"]["train_indicator_rows"] is True and "shared_rows" not in first
    digest = shared.store.manifest()["indicator_rows"]["digest"]
    assert all(r["config"]["adapter"]["train_indicator_rows"] is False for r in later)
    assert all(r["shared_rows"] == digest for r in later)


def test_a_benchmark_run_routes_as_its_ensemble_reopened_from_disk(tmp_path):
    """Through the protocol, with the first expert copied from the adapter cache (as `seecl bench
    --reuse-experts` does): every later expert trains over the shared rows a reader loads, so the
    run's routes are those of the ensemble reopened in a fresh object, and each task reaches its
    expert."""
    from conftest import TINY
    from seecl.cache import AdapterCache
    from seecl.data.synthetic import general_task
    from seecl.evaluation.protocol import EvalSet, Protocol
    from seecl.methods.base import MethodContext
    from seecl.methods.registry import build_method

    queries = [i.query for n in NAMES for i in make_task(n, "eval", 4).instances]
    cache = AdapterCache(tmp_path / "cache")
    routes = {}
    for label in ("SEE(10%)", "SEE(10%)-shared"):
        ctx = MethodContext(load_config(overrides=TINY), tmp_path / label, cache, general=general_task())
        method = build_method(label, ctx)
        train = [make_task(n, "train", 48) for n in NAMES]
        evals = {n: EvalSet(make_task(n, "eval", 4), budget=2) for n in NAMES}
        summary = Protocol(method, train, evals, ctx.workdir, log=lambda _: None).run()
        routes[label] = [r.answered_by for r in method.ensemble.route(queries)]
        reopened = SeeEnsemble.open(method.ensemble.store.root, ["model.name=tiny-random", "train.progress=false"])
        assert [r.answered_by for r in reopened.route(queries)] == routes[label], label
    records = method.ensemble.store.records()
    assert records[0]["from_cache"] and not records[1]["from_cache"], "the first expert came from the cache"
    correct = sum(r == n for r, n in zip(routes["SEE(10%)-shared"], [n for n in NAMES for _ in range(4)]))
    assert correct >= 10, routes
    assert summary["routing"]["confusion"][0][0] >= 3
