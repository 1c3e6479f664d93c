"""One conformance suite for every routing backend: the same checks, whichever computes the route.

The reference router is the oracle: every other backend must give its routes (verdicts and indicator
probabilities) and greedy answers, for greedy and thresholded decisions, when an expert produces
neither indicator, when every expert declines, with no experts and with answer budgets of 0. The
vLLM engine runs through the same checks (tests/backend_checks.py) under `make test-vllm`
(tests/real_vllm/), where hooks cannot force an output: there the trained experts' own routes cover
"neither" and all-negative.
"""

import contextlib

import pytest

from backend_checks import (
    check_mixed_budgets,
    check_no_experts,
    check_owners_and_conversations,
    check_protocol,
    check_routes_and_greedy_answers,
    same_routes,
)
from seecl.data.synthetic import make_task
from seecl.serving.engine import RoutingEngine
from seecl.serving.reference import SequentialRouter
from seecl.serving.routed_by import RoutedBy
from seecl.serving.routing import BASE, RoutingBackend

NAMES = ["reverse_list", "uppercase", "add"]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    from conftest import TINY, learn_ensemble

    return learn_ensemble(tmp_path_factory.mktemp("backends") / "ens", TINY, NAMES)


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
    # one ensemble routing for itself through RoutedBy: the walk's routes, the claimer's answers
    "routed_by": lambda ens, threshold, experts: RoutedBy(
        RoutingEngine(ens.model, ens.formatter(), experts, threshold, batch_size=4), reference(ens, None, experts)
    ),
}


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
    check_protocol(make, NAMES)
    assert ensemble.experts() == NAMES


@pytest.mark.parametrize("threshold", [None, 0.999, {"reverse_list": 0.6, "uppercase": 0.999, "add": 0.5}])
def test_routes_and_greedy_answers_equal_the_reference(make, ensemble, threshold):
    check_routes_and_greedy_answers(make, lambda t, e=None: reference(ensemble, t, e), queries(), threshold, NAMES)


def test_mixed_budgets_and_a_zero_budget_only_routes(make, ensemble):
    check_mixed_budgets(make, lambda t, e=None: reference(ensemble, t, e), queries())


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


def test_named_owners_and_conversations(make, ensemble):
    check_owners_and_conversations(make, lambda t, e=None: reference(ensemble, t, e), queries(), NAMES)


def test_no_experts(make, ensemble):
    check_no_experts(make, lambda t, e=None: reference(ensemble, t, e))


def test_the_ensemble_itself_is_a_backend(ensemble):
    assert isinstance(ensemble, RoutingBackend)
    qs = queries()
    same_routes(ensemble.route(qs), reference(ensemble).route(qs))
