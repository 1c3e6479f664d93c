"""The conformance checks every routing backend must pass, against the reference router.

Shared by tests/test_backends.py (the PEFT backends) and tests/real_vllm/ (the vLLM engine on a real
vLLM): `make(threshold=None, experts=None)` builds the backend under test, `reference(threshold,
experts)` the reference router over the same ensemble. Not a test module itself.
"""

from __future__ import annotations

import pytest

from seecl.serving.routing import BASE, RoutingBackend


def same_routes(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert (g.answered_by, g.reason) == (e.answered_by, e.reason)
        assert [(c.expert, c.verdict) for c in g.checks] == [(c.expert, c.verdict) for c in e.checks]
        for cg, ce in zip(g.checks, e.checks):
            assert cg.p_pos == pytest.approx(ce.p_pos, abs=1e-4) and cg.p_neg == pytest.approx(ce.p_neg, abs=1e-4)


def check_protocol(make, names):
    backend = make()
    assert isinstance(backend, RoutingBackend)
    assert backend.experts() == names


def check_routes_and_greedy_answers(make, reference, queries, threshold, names, budget=6):
    """Routes (verdicts and indicator probabilities) and greedy answers equal the reference's; returns them."""
    expected = reference(threshold).ask(queries, budget)
    backend = make(threshold)
    same_routes(backend.route(queries), [a.route for a in expected])
    answers = backend.ask(queries, budget)
    same_routes([a.route for a in answers], [a.route for a in expected])
    assert [a.text for a in answers] == [a.text for a in expected]
    # usage and finish reasons come from the generated ids, which every backend reports alike
    assert [a.token_ids for a in answers] == [a.token_ids for a in expected]
    assert [a.finish_reason for a in answers] == [a.finish_reason for a in expected]
    assert all(a.finish_reason == ("length" if len(a.token_ids) == budget else "stop") for a in answers)
    if threshold is None:
        assert {a.route.answered_by for a in expected} >= set(names), "every expert answers some query"
    else:
        greedy = reference(None).route(queries)
        assert [r.answered_by for r in greedy] != [a.route.answered_by for a in expected], "thresholds take effect"
    return answers


def check_mixed_budgets(make, reference, queries):
    budgets = [0 if i % 3 == 0 else 4 + i % 2 for i in range(len(queries))]
    expected = reference(None).ask(queries, budgets)
    answers = make().ask(queries, budgets)
    assert [a.text for a in answers] == [a.text for a in expected]
    assert all(a.text == "" for a, b in zip(answers, budgets) if b == 0)


def check_no_experts(make, reference):
    backend = make(experts=[])
    assert backend.experts() == []
    answers = backend.ask(["Hi", "2 + 2"], 3)
    assert all(a.route.answered_by == BASE and a.route.reason == "no_experts" for a in answers)
    assert [a.text for a in answers] == [a.text for a in reference(None, []).ask(["Hi", "2 + 2"], 3)]


def check_owners_and_conversations(make, reference, queries, names):
    """A named owner answers unrouted ("requested"), a conversation is routed on its last user turn
    and answered after all of its turns: answers and routes equal the reference's."""
    from seecl.serving.routing import Query

    asked = [
        Query(queries[0], owner=names[-1]),
        Query(queries[1], owner=BASE),
        Query(queries[2], history=(("user", "Hello"), ("assistant", "Hi! How can I help?"))),
        queries[3],
    ]
    expected = reference(None).ask(asked, 5)
    answers = make().ask(asked, 5)
    same_routes([a.route for a in answers], [a.route for a in expected])
    assert [(a.route.answered_by, a.route.reason) for a in answers[:2]] == [
        (names[-1], "requested"),
        (BASE, "requested"),
    ]
    assert answers[2].route.checks, "a conversation is routed"
    assert [a.text for a in answers] == [a.text for a in expected]
    assert [a.token_ids for a in answers] == [a.token_ids for a in expected]
    with pytest.raises(ValueError, match="no expert named .nobody."):
        make().ask([Query(queries[0], owner="nobody")], 3)
