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


def test_seecl_ask_with_routers_prints_the_routers_routes_and_the_answerers_answers(pair, capsys):
    import json

    from seecl.cli import main

    router, answerer = pair
    queries = _queries()[:2] + _queries()[8:10]
    expected = RoutedBy(router, answerer).ask(queries, 5)
    capsys.readouterr()
    argv = ["ask", "--ensemble", str(answerer.store.root), "--routers", str(router.store.root)]
    assert main([*argv, "--json", "--max-new-tokens", "5", "--set", "see.calibrate=false", *queries]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["answered_by"] for p in printed] == [a.route.answered_by for a in expected]
    assert [p["answer"] for p in printed] == [a.text for a in expected]

    assert main([*argv[:3], "--routers", str(answerer.store.root / "missing"), "Hi"]) != 0
    assert "no ensemble at" in capsys.readouterr().err
    assert main([*argv, "--backend", "vllm", "Hi"]) != 0
    assert "--routers needs --backend peft" in capsys.readouterr().err


def test_a_served_pair_switches_only_once_both_ensembles_learned_the_new_task(tmp_path):
    from seecl.serving.live import LiveEnsemble

    answerer = learn_ensemble(tmp_path / "lora", GREEDY, NAMES[:1])
    router = learn_ensemble(tmp_path / "alora", GREEDY + ["adapter.kind=alora"], NAMES[:1])
    live = LiveEnsemble(answerer, router)
    assert live.experts() == NAMES[:1] and not live.greedy_only
    answerer.learn(make_task(NAMES[1], "train", 48))
    assert not live.refresh() and live.experts() == NAMES[:1], "the router has not learned it yet"
    query = make_task(NAMES[0], "eval", 1).instances[0].query
    assert live.ask([query], 4)[0].route.checks[0].expert == NAMES[0]
    router.learn(make_task(NAMES[1], "train", 48))
    assert live.refresh() and live.experts() == NAMES[:2]
    assert live.ask([query], 4)[0].route.checks[0].expert == NAMES[1], "the newest expert is asked first"

    with pytest.raises(ConfigError, match="differ"):
        LiveEnsemble(learn_ensemble(tmp_path / "other", GREEDY, NAMES[2:]), router)


def test_the_server_answers_with_the_pairs_routes(pair):
    import httpx

    from conftest import running
    from seecl.serving.server import ensemble_app

    router, answerer = pair
    query = _queries()[9]
    (expected,) = RoutedBy(router, answerer).ask([query], 5)
    with running(ensemble_app(answerer, router=router)) as url:
        response = httpx.post(
            f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": query}], "max_tokens": 5}
        )
    assert response.status_code == 200, response.text
    (choice,) = response.json()["choices"]
    assert choice["message"]["content"] == expected.text
    assert choice["route"]["answered_by"] == expected.route.answered_by
    assert [c["expert"] for c in choice["route"]["checks"]] == [c.expert for c in expected.route.checks]
