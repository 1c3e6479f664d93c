"""One conformance suite for every routing backend: the same checks, whichever computes the route.

The reference router is the oracle: every other backend must give its routes (verdicts and indicator
probabilities) and greedy answers, for greedy and thresholded decisions, when an expert produces
neither indicator, when every expert declines, with no experts and with answer budgets of 0. The
vLLM engine runs through the same suite under the vLLM test target (tests/vllm/).
"""

import contextlib

import pytest

from seecl.data.synthetic import make_task
from seecl.see.ensemble import SeeEnsemble
from seecl.serving.engine import RoutingEngine
from seecl.serving.reference import SequentialRouter
from seecl.serving.routing import BASE, RoutingBackend

NAMES = ["reverse_list", "uppercase", "add"]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    from conftest import TINY
    from seecl.config import load_config

    ens = SeeEnsemble(tmp_path_factory.mktemp("backends") / "ens", load_config(overrides=TINY))
    for name in NAMES:
        ens.learn(make_task(name, "train", 48))
    return ens


def queries():
    return [inst.query for n in NAMES for inst in make_task(n, "eval", 3).instances] + [
        "Hi",
        "Tell me a long story about a lighthouse keeper and the sea.",
    ]


def reference(ens, threshold=None, experts=None):
    return SequentialRouter(ens.model, ens.formatter(), ens.experts() if experts is None else experts, threshold, 4)


BACKENDS = {
    "engine": lambda ens, threshold, experts: RoutingEngine(
        ens.model, ens.formatter(), experts, threshold, batch_size=4, prefix_cache_tokens=256
    ),
    "reference": lambda ens, threshold, experts: reference(ens, threshold, experts),
}


def same_routes(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g.answered_by, g.reason) == (e.answered_by, e.reason)
        assert [(c.expert, c.verdict) for c in g.checks] == [(c.expert, c.verdict) for c in e.checks]
        for cg, ce in zip(g.checks, e.checks):
            assert cg.p_pos == pytest.approx(ce.p_pos, abs=1e-4) and cg.p_neg == pytest.approx(ce.p_neg, abs=1e-4)


@contextlib.contextmanager
def forcing(ens, token_id):
    """Every next-token distribution peaks at `token_id` (an indicator, or an ordinary token)."""
    handle = ens.model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: output.index_add_(
            -1, __import__("torch").tensor([token_id]), __import__("torch").full((*output.shape[:-1], 1), 50.0)
        )
    )
    try:
        yield
    finally:
        handle.remove()


@pytest.fixture(params=sorted(BACKENDS))
def make(request, ensemble):
    return lambda threshold=None, experts=None: BACKENDS[request.param](
        ensemble, threshold, ensemble.experts() if experts is None else experts
    )


def test_backend_implements_the_protocol(make, ensemble):
    backend = make()
    assert isinstance(backend, RoutingBackend)
    assert backend.experts() == ensemble.experts() == NAMES


@pytest.mark.parametrize("threshold", [None, 0.999, {"reverse_list": 0.6, "uppercase": 0.999, "add": 0.5}])
def test_routes_and_greedy_answers_equal_the_reference(make, ensemble, threshold):
    qs = queries()
    expected = reference(ensemble, threshold).ask(qs, 6)
    backend = make(threshold)
    same_routes(backend.route(qs), [a.route for a in expected])
    answers = backend.ask(qs, 6)
    same_routes([a.route for a in answers], [a.route for a in expected])
    assert [a.text for a in answers] == [a.text for a in expected]
    # usage and finish reasons come from the generated ids, which every backend reports alike
    assert [a.token_ids for a in answers] == [a.token_ids for a in expected]
    assert [a.finish_reason for a in answers] == [a.finish_reason for a in expected]
    assert all(a.finish_reason == ("length" if len(a.token_ids) == 6 else "stop") for a in answers)
    if threshold is None:
        assert {a.route.answered_by for a in expected} >= set(NAMES), "every expert answers some query"
    else:
        greedy = reference(ensemble).route(qs)
        assert [r.answered_by for r in greedy] != [a.route.answered_by for a in expected], "thresholds take effect"


def test_mixed_budgets_and_a_zero_budget_only_routes(make, ensemble):
    qs = queries()
    budgets = [0 if i % 3 == 0 else 4 + i % 2 for i in range(len(qs))]
    expected = reference(ensemble).ask(qs, budgets)
    answers = make().ask(qs, budgets)
    assert [a.text for a in answers] == [a.text for a in expected]
    assert all(a.text == "" for a, b in zip(answers, budgets) if b == 0)


def test_an_expert_producing_neither_indicator_sends_the_query_to_the_base(make, ensemble):
    (letter,) = ensemble.formatter().text_ids("z")
    with forcing(ensemble, letter):
        routes = make().route(queries())
    newest = ensemble.experts()[-1]
    assert all(r.answered_by == BASE and r.reason == "exception" for r in routes)
    assert all([c.expert for c in r.checks] == [newest] for r in routes), "the walk stops at the first 'neither'"


def test_every_expert_declining_leaves_the_query_to_the_base(make, ensemble):
    with forcing(ensemble, ensemble.base.indicators.neg_id):
        routes = make().route(queries())
    assert all(r.answered_by == BASE and r.reason == "all_negative" for r in routes)
    assert all([c.expert for c in r.checks] == NAMES[::-1] for r in routes), "asked newest first"


def test_no_experts(make, ensemble):
    backend = make(experts=[])
    assert backend.experts() == []
    answers = backend.ask(["Hi", "2 + 2"], 3)
    assert all(a.route.answered_by == BASE and a.route.reason == "no_experts" for a in answers)
    assert [a.text for a in answers] == [a.text for a in reference(ensemble, experts=[]).ask(["Hi", "2 + 2"], 3)]


def test_the_ensemble_itself_is_a_backend(ensemble):
    assert isinstance(ensemble, RoutingBackend)
    qs = queries()
    same_routes(ensemble.route(qs), reference(ensemble).route(qs))
