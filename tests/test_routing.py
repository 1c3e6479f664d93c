"""The routing rule: greedy and thresholded verdicts, multi-token indicators, the newest-first walk,
and a routed batch equal to routing each query alone."""

import math

import pytest
import torch

from seecl.data.synthetic import make_task
from seecl.model.indicators import Indicators
from seecl.serving.routing import BASE, Check, decide, walk

ADDED = Indicators("added", "<<pos>>", "<<neg>>", (10,), (11,))
MULTI = Indicators("nonsemantic", "«pos»", "«neg»", (7, 20, 9), (7, 21, 9))


def logprobs(*tops, vocab=32):
    """Log-probs with the given argmax (and second) token per position."""
    rows = []
    for top in tops:
        row = torch.full((vocab,), -10.0)
        row[top] = -0.1
        rows.append(row)
    return torch.stack(rows)


def test_decide_greedy_verdicts():
    assert decide(logprobs(10), ADDED)[0] == "pos"
    assert decide(logprobs(11), ADDED)[0] == "neg"
    assert decide(logprobs(3), ADDED)[0] == "neither"
    verdict, p_pos, p_neg = decide(logprobs(10), ADDED)
    assert p_pos == pytest.approx(math.exp(-0.1)) and p_neg == pytest.approx(math.exp(-10))


def test_decide_multi_token_indicator_needs_the_shared_prefix():
    assert decide(logprobs(7, 20), MULTI)[0] == "pos"
    assert decide(logprobs(7, 21), MULTI)[0] == "neg"
    assert decide(logprobs(5, 20), MULTI)[0] == "neither", "prefix not produced greedily"


def test_threshold_compares_pos_against_neg_only_when_an_indicator_wins():
    row = torch.full((1, 32), -20.0)
    row[0, 10], row[0, 11], row[0, 3] = math.log(0.2), math.log(0.15), math.log(0.1)
    assert decide(row, ADDED)[0] == "pos"
    assert decide(row, ADDED, threshold=0.55)[0] == "pos"  # 0.2 / 0.35 = 0.57
    assert decide(row, ADDED, threshold=0.6)[0] == "neg"
    row[0, 3] = math.log(0.5)  # another token wins: no threshold turns that into a claim or a pass
    assert decide(row, ADDED)[0] == "neither"
    assert all(decide(row, ADDED, threshold=t)[0] == "neither" for t in (0.1, 0.5, 0.99))


def scripted(verdicts):
    """A check function answering from a table {expert: {query: verdict}}, logging calls."""
    calls = []

    def check(expert, indices):
        calls.append((expert, list(indices)))
        return [Check(expert, verdicts[expert].get(i, "neg"), 0.0, 0.0) for i in indices]

    return check, calls


def test_walk_asks_newest_first_and_stops_at_the_first_claim():
    check, calls = scripted({"e3": {0: "pos"}, "e2": {1: "pos", 2: "neither"}, "e1": {3: "pos"}})
    routes = walk(5, ["e1", "e2", "e3"], check)
    assert [r.answered_by for r in routes] == ["e3", "e2", BASE, "e1", BASE]
    assert [r.reason for r in routes] == ["claimed", "claimed", "exception", "claimed", "all_negative"]
    assert calls == [("e3", [0, 1, 2, 3, 4]), ("e2", [1, 2, 3, 4]), ("e1", [3, 4])]
    assert [c.expert for c in routes[4].checks] == ["e3", "e2", "e1"]


def test_walk_without_experts_goes_to_base():
    routes = walk(2, [], lambda e, i: [])
    assert [(r.answered_by, r.reason) for r in routes] == [(BASE, "no_experts")] * 2


NAMES = ["reverse_list", "uppercase", "add"]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    from conftest import TINY, learn_ensemble

    return learn_ensemble(tmp_path_factory.mktemp("routing") / "ens", TINY, NAMES)


def test_end_to_end_routing_accuracy_on_the_tiny_model(learned):
    """Three tasks learned in sequence: each eval query must reach its own expert.

    A broken walk (oldest first), missing negatives or untrained indicators leave about one in
    three queries at the right expert; the working implementation routes every one (seeded).
    """
    queries, owners = [], []
    for name in NAMES:
        for inst in make_task(name, "eval", 12).instances:
            queries.append(inst.query)
            owners.append(name)
    answers = learned.ask(queries, 4)
    accuracy = sum(a.route.answered_by == o for a, o in zip(answers, owners)) / len(owners)
    assert accuracy >= 0.95, accuracy
    for answer in answers:
        assert answer.route.checks and answer.route.checks[0].expert == "add", "newest expert is asked first"


def test_a_routed_batch_equals_per_query_routing(learned):
    queries = [make_task(n, "eval", 3).instances[k].query for n in NAMES for k in range(3)]
    queries.append("Hi")  # a much shorter prompt: left padding must not change anything
    batched = learned.ask(queries, 6)
    single = [learned.ask([q], 6)[0] for q in queries]
    for b, s in zip(batched, single):
        assert b.route.answered_by == s.route.answered_by and b.text == s.text
        for cb, cs in zip(b.route.checks, s.route.checks):
            assert cb.verdict == cs.verdict and cb.p_pos == pytest.approx(cs.p_pos, abs=1e-4)
