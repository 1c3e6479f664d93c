"""RoutedBy: the router's routes, the answerer's answers (aLoRA checks in front of LoRA experts)."""

import pytest

from conftest import TINY, learn_ensemble
from seecl.data.synthetic import make_task
from seecl.errors import ConfigError
from seecl.serving.routed_by import RoutedBy
from seecl.serving.routing import BASE, Query, Sampling

NAMES = ["reverse_list", "uppercase", "add"]
GREEDY = TINY + ["see.calibrate=false", "see.general_negatives=0"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("routed_by")
    answerer = learn_ensemble(root / "lora", GREEDY, NAMES)
    router = learn_ensemble(root / "alora", GREEDY + ["adapter.kind=alora"], NAMES)
    return router, answerer


def _queries():
    queries = [inst.query for n in NAMES for inst in make_task(n, "eval", 4).instances]
    return queries + ["Hi", "Tell me a long story about a lighthouse keeper and the sea"]


def test_routes_are_the_routers_and_answers_the_answerers_own_where_both_route_alike(pair):
    router, answerer = pair
    queries = _queries()
    combined = RoutedBy(router, answerer).ask(queries, 8)
    routes = router.route(queries)
    own = answerer.ask(queries, 8)
    alike = 0
    for answer, route, mine, query in zip(combined, routes, own, queries):
        assert answer.query == query
        assert answer.route == route, "the answer carries the router's route, checks and all"
        if route.answered_by == mine.route.answered_by:
            alike += 1
            assert answer.text == mine.text, query
        else:
            (named,) = answerer.ask([Query(query, owner=route.answered_by)], 8)
            assert answer.text == named.text, "answered by the expert the router chose"
    # the tiny aLoRA router claims some queries for other experts than the LoRA walk: both cases occur
    assert 0 < alike < len(queries)


def test_owned_queries_skip_routing_and_budget_zero_only_routes(pair):
    router, answerer = pair
    backend = RoutedBy(router, answerer)
    queries = [Query(_queries()[0], owner="add"), _queries()[5], Query("Hi", owner=BASE)]
    answers = backend.ask(queries, [6, 0, 6])
    assert [a.route.reason for a in answers][::2] == ["requested", "requested"]
    assert answers[0].text == answerer.ask([queries[0]], 6)[0].text
    assert answers[1].route.answered_by == router.route([queries[1]])[0].answered_by
    assert answers[1].text == "" and answers[1].token_ids == []


def test_streamed_answers_end_with_the_routers_route(pair):
    router, answerer = pair
    queries = _queries()[:6]
    closing = {}

    def on_token(index, delta):
        if delta.answer is not None:
            closing[index] = delta.answer

    answers = RoutedBy(router, answerer).ask(queries, [Sampling(max_tokens=5)] * len(queries), on_token)
    assert sorted(closing) == list(range(len(queries)))
    routes = router.route(queries)
    for index, answer in enumerate(answers):
        assert closing[index].route == answer.route == routes[index]
        assert closing[index].text == answer.text


def test_ensembles_with_other_experts_are_refused_with_both_lists(pair, tmp_path):
    router, _ = pair
    partial = learn_ensemble(tmp_path / "two", GREEDY, NAMES[:2])
    with pytest.raises(ConfigError, match=r"router's experts .*'add'.* and the answerer's .*differ"):
        RoutedBy(router, partial).ask(["Hi"], 4)
