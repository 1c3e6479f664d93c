"""The fast engine gives the reference router's routes and greedy answers, with less work."""

import pytest
import torch

from seecl.data.synthetic import make_task
from seecl.see.ensemble import SeeEnsemble
from seecl.serving.engine import RoutingEngine
from seecl.serving.routing import BASE, Query

NAMES = ["reverse_list", "uppercase", "add"]


def _learn(root, *overrides):
    from conftest import TINY, learn_ensemble

    # the paper's recipe: greedy indicators, so the reference router and the engine built here agree
    return learn_ensemble(root, TINY + ["see.calibrate=false", "see.general_negatives=0", *overrides], NAMES)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    return _learn(tmp_path_factory.mktemp("engine") / "ens")


def _queries():
    queries = [inst.query for n in NAMES for inst in make_task(n, "eval", 4).instances]
    # unclaimed prompts of very different lengths: left padding and the base path
    return queries + ["Hi", "Tell me a long story about a lighthouse keeper and the sea " * 3]


def _engine(ens, **kwargs):
    args = dict(threshold=None, batch_size=5, prefix_cache_tokens=4096, prefix_block=8)
    args.update(kwargs)
    return RoutingEngine(ens.model, ens.formatter(), ens.experts(), **args)


def _assert_same(fast, reference):
    assert len(fast) == len(reference)
    for f, r in zip(fast, reference):
        assert f.route.answered_by == r.route.answered_by, f.query
        assert f.route.reason == r.route.reason
        assert [c.expert for c in f.route.checks] == [c.expert for c in r.route.checks]
        for cf, cr in zip(f.route.checks, r.route.checks):
            assert cf.verdict == cr.verdict
            assert cf.p_pos == pytest.approx(cr.p_pos, abs=1e-4)
            assert cf.p_neg == pytest.approx(cr.p_neg, abs=1e-4)
        assert f.text == r.text, f.query


def test_engine_equals_reference_routes_and_answers(learned):
    queries = _queries()
    budgets = [6 if i % 2 else 9 for i in range(len(queries))]  # mixed budgets in one batch
    reference = learned.router().ask(queries, budgets)
    assert {a.route.answered_by for a in reference} >= set(NAMES), "the fixture must exercise every expert"
    _assert_same(_engine(learned).ask(queries, budgets), reference)


def test_engine_without_prefix_cache_and_other_batch_sizes(learned):
    queries = _queries()
    reference = learned.router().ask(queries, 7)
    for batch_size in (1, 3, 64):
        _assert_same(_engine(learned, batch_size=batch_size, prefix_cache_tokens=0).ask(queries, 7), reference)


def test_prefill_in_chunks_decodes_the_batch_together_with_the_same_answers(learned):
    queries = _queries()
    budgets = [6 if i % 2 else 9 for i in range(len(queries))]
    reference = learned.router().ask(queries, budgets)
    for cache_tokens in (0, 4096):  # chunks on top of a cached shared head, and without one
        engine = _engine(learned, batch_size=64, prefill_tokens=40, prefix_cache_tokens=cache_tokens)
        _assert_same(engine.ask(queries, budgets), reference)


def test_a_batch_decodes_its_answers_together_whoever_claimed_them(learned):
    queries = _queries()
    threshold = {"reverse_list": 0.999999}  # its queries go on to the base
    reference = learned.router(threshold).ask(queries, 6)
    engine = _engine(learned, batch_size=64, threshold=threshold)
    owners_per_decode = []
    plain_decode = engine._decode

    def spy(state, first, rows, ignore_eos=False, owners=None):
        owners_per_decode.append(list(owners))
        return plain_decode(state, first, rows, ignore_eos, owners)

    engine._decode = spy
    answers = engine.ask(queries, 6)
    _assert_same(answers, reference)
    assert len(owners_per_decode) == 1, "one decode for the whole batch"
    owners = set(owners_per_decode[0])
    assert owners == {a.route.answered_by for a in reference}
    assert BASE in owners and len(owners) >= 3, owners


@pytest.mark.parametrize("owners", [[NAMES[0], NAMES[1], BASE, NAMES[2], NAMES[0]], [BASE, NAMES[2]]])
def test_mixed_rows_forward_equals_each_owner_alone(learned, owners):
    """Rows under different experts and the base in one forward get each owner's own logits,
    with indicator tokens in the input and the indicator logits of the tied head."""
    engine = _engine(learned)
    pos = list(engine.indicators.pos_ids)
    rows = [engine.formatter.prompt_ids(q) + pos for q in _queries()[-len(owners) :]]  # mixed lengths
    with torch.inference_mode(), engine._use_rows(list(owners)):
        _, mixed = engine._extend(None, rows, 3)
    alone = {}
    for row, owner in enumerate(owners):
        with torch.inference_mode(), engine._use(owner):
            _, alone[row] = engine._extend(None, [rows[row]], 3)
        torch.testing.assert_close(mixed[row], alone[row][0], atol=1e-4, rtol=1e-4)
    ids = list(engine.indicators.trainable_token_ids)
    expert_row = next(r for r, o in enumerate(owners) if o != BASE)
    with torch.inference_mode(), engine._use(BASE):
        _, base = engine._extend(None, [rows[expert_row]], 3)
    assert not torch.allclose(alone[expert_row][0][:, ids], base[0][:, ids], atol=1e-3), "experts' rows differ"


def test_chunks_keep_rows_times_width_within_the_budget():
    from seecl.serving.batch_kv import row_chunks

    widths = [3, 4, 4, 10, 2, 2, 2, 30]
    groups = row_chunks(widths, 12)
    assert [r for g in groups for r in g] == list(range(len(widths)))
    assert all(len(g) == 1 or len(g) * max(widths[r] for r in g) <= 12 for g in groups)
    assert groups == [[0, 1, 2], [3], [4, 5, 6], [7]]


@pytest.mark.parametrize("fixture", ["learned", "learned_alora"])
def test_a_batch_one_expert_claims_decodes_in_its_checks_buffers(fixture, request, monkeypatch):
    """No copy of the batch's KV between its checks and its answers when one expert claims every
    query (LoRA: that check's buffers; aLoRA: the bodies' buffers, extended in place by each check)."""
    import seecl.serving.batch_kv
    import seecl.serving.engine

    ens = request.getfixturevalue(fixture)
    # queries of a task whose every query one expert claims, preferably after the longest walk
    candidates = []
    for name in NAMES:
        queries = [inst.query for inst in make_task(name, "eval", 4).instances]
        reference = ens.router().ask(queries, 6)
        owners = {a.route.answered_by for a in reference}
        if len(owners) == 1 and BASE not in owners:
            candidates.append((len(reference[0].route.checks), queries, reference))
    assert candidates, "the fixture must have a task one expert claims whole"
    walked, queries, reference = max(candidates, key=lambda c: c[0])
    assert walked >= 2, "the batch must pass at least one expert before its claim"
    copies = []

    def counting_gather(parts, room):
        copies.append([len(rows) for _, rows in parts])
        return plain_gather(parts, room)

    plain_gather = seecl.serving.batch_kv.gather
    monkeypatch.setattr(seecl.serving.batch_kv, "gather", counting_gather)
    monkeypatch.setattr(seecl.serving.engine, "gather", counting_gather)
    _assert_same(_engine(ens, batch_size=4).ask(queries, 6), reference)
    assert copies == []


def test_route_only_equals_the_routes_of_ask(learned):
    queries = _queries()
    engine = _engine(learned)
    routes = engine.route(queries)
    reference = learned.router().route(queries)
    assert [r.answered_by for r in routes] == [r.answered_by for r in reference]


def test_prefix_cache_is_used_and_does_not_change_answers(learned):
    queries = [inst.query for inst in make_task("uppercase", "eval", 6).instances]
    engine = _engine(learned, batch_size=3)
    first = engine.ask(queries, 6)
    assert engine.prefix_cache.hits + engine.prefix_cache.misses > 0
    second = engine.ask(queries, 6)
    assert engine.prefix_cache.hits > 0
    assert [a.text for a in first] == [a.text for a in second]
    _assert_same(second, learned.router().ask(queries, 6))


def test_one_query_at_a_time_reuses_the_shared_definition(learned):
    definition = "Definition: write the words of the input in capital letters, keeping their order. "
    queries = [definition + inst.query for inst in make_task("uppercase", "eval", 4).instances]
    engine = _engine(learned, batch_size=1)
    fast = engine.ask(queries, 6)
    # every check after the first query's starts from that query's cached definition
    assert engine.prefix_cache.hits >= sum(len(answer.route.checks) for answer in fast[1:])
    _assert_same(fast, learned.router().ask(queries, 6))


def test_a_batch_spanning_two_definitions_prefills_each_on_its_own_head(learned):
    from seecl.data.prompts import common_prefix_length

    definitions = {
        "uppercase": "Definition: write the words of the input in capital letters, in order. ",
        "reverse_list": "Definition: list the items of the input from the last to the first. ",
    }
    families = [
        [definition + inst.query for inst in make_task(name, "eval", 3).instances]
        for name, definition in definitions.items()
    ]
    queries = families[0] + families[1]
    engine = _engine(learned, batch_size=len(queries))
    _assert_same(engine.ask(queries, 6), learned.router().ask(queries, 6))
    block = engine.prefix_cache.block
    prompts = [[engine.formatter.prompt_ids(q) for q in family] for family in families]
    batch_head = common_prefix_length(prompts[0] + prompts[1]) // block * block
    newest = learned.experts()[-1]  # every query's first check
    for family in prompts:
        head = common_prefix_length(family) // block * block
        assert head > batch_head
        assert engine.prefix_cache.lookup(newest, family[0])[0] >= head, "the family's own head is cached"


def test_engine_leaves_indicator_rows_unmerged(learned):
    """After a pass the shared embedding holds the base rows again (the base answers stay base)."""
    embedding = learned.model.get_base_model().get_input_embeddings()
    weight = embedding.base_layer.weight if hasattr(embedding, "base_layer") else embedding.weight
    before = weight.detach().clone()
    _engine(learned).ask(_queries()[:4], 3)
    assert torch.equal(weight.detach(), before)


def test_grouped_kv_heads_switch_is_scoped_to_the_engines_forwards(learned, monkeypatch):
    import os

    from transformers.integrations import sdpa_attention

    monkeypatch.delenv("TRANSFORMERS_SDPA_FORCE_GQA", raising=False)
    seen = []
    plain = sdpa_attention.use_gqa_in_sdpa

    def spy(mask, key, value):
        seen.append(os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA"))
        return plain(mask, key, value)

    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", spy)
    assert learned.model.config.num_key_value_heads < learned.model.config.num_attention_heads
    answers = _engine(learned).ask(_queries(), 5)
    assert seen and set(seen) == {"1"}, "grouped heads read directly in every engine forward"
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    seen.clear()
    _assert_same(answers, learned.router().ask(_queries(), 5))  # the reference repeats the heads
    assert seen and set(seen) == {None}


def test_ensemble_ask_uses_the_fast_engine_by_default(learned):
    queries = _queries()[:5]
    assert learned.config.generate.engine == "fast"
    _assert_same(learned.ask(queries, 5), learned.router().ask(queries, 5))


@pytest.fixture(scope="module")
def learned_alora(tmp_path_factory):
    return _learn(tmp_path_factory.mktemp("engine_alora") / "ens", "adapter.kind=alora")


@pytest.mark.parametrize("check_group", [32, 2, 1])
def test_alora_experts_route_and_answer_like_the_reference(learned_alora, check_group):
    """All checks of a batch in one forward (or in groups of experts, newest group first) give the
    routes and greedy answers of asking one expert after another."""
    engine = _engine(learned_alora, check_group=check_group)
    assert engine.invocation == learned_alora.formatter().invocation_ids()
    queries = _queries()
    seen = set()
    for threshold in (None, 0.999999, {"reverse_list": 0.5, "uppercase": 0.999999, "add": 0.6}):
        reference = learned_alora.router(threshold).ask(queries, 6)
        _assert_same(_engine(learned_alora, threshold=threshold, check_group=check_group).ask(queries, 6), reference)
        seen |= {a.route.answered_by for a in reference}
        routes = [a.route for a in reference]
        assert {len(r.checks) for r in routes} - {1}, "some queries walk past the newest expert"
    assert BASE in seen and len(seen - {BASE}) >= 2, seen


@pytest.fixture(scope="module")
def learned_alora_last_token(tmp_path_factory):
    return _learn(
        tmp_path_factory.mktemp("engine_alora_last") / "ens",
        "adapter.kind=alora",
        "adapter.alora_invocation=last_token",
    )


def test_one_token_alora_experts_route_and_answer_like_the_reference(learned_alora_last_token):
    """Experts invoked by the header's last token alone: each check is one token plus the indicator,
    and the routes and greedy answers are still those of asking one expert after another."""
    ens = learned_alora_last_token
    engine = _engine(ens)
    assert engine.invocation == ens.formatter().invocation_ids()[-1:]
    queries = _queries()
    owners = set()
    for threshold in (None, 0.999999, {"reverse_list": 0.5, "uppercase": 0.999999, "add": 0.6}):
        reference = ens.router(threshold).ask(queries, 6)
        _assert_same(_engine(ens, threshold=threshold).ask(queries, 6), reference)
        owners |= {a.route.answered_by for a in reference}
    assert BASE in owners and len(owners - {BASE}) >= 2, owners
    claimed = [a.route.answered_by for a in ens.router().ask(queries[: 4 * len(NAMES)], 6)]
    assert sum(c == n for c, n in zip(claimed, [n for n in NAMES for _ in range(4)])) >= 8, "the experts learn to route"


def test_batched_alora_checks_equal_one_expert_at_a_time(learned_alora):
    """The segment forward gives every expert's indicator probabilities as its own pass would."""
    queries = _queries()
    wide = _engine(learned_alora, threshold=0.999999).route(queries)  # every expert asked
    for expert in learned_alora.experts():
        alone = (
            _engine(learned_alora)
            .__class__(learned_alora.model, learned_alora.formatter(), [expert], 0.999999, batch_size=5)
            .route(queries)
        )
        for w, a in zip(wide, alone):
            mine = [c for c in w.checks if c.expert == expert]
            if mine:
                assert mine[0].p_pos == pytest.approx(a.checks[0].p_pos, abs=1e-5)
                assert mine[0].p_neg == pytest.approx(a.checks[0].p_neg, abs=1e-5)


def test_calibrate_threshold_from_log_odds():
    import math

    from seecl.see.ensemble import calibrate_threshold
    from seecl.serving.routing import Check

    def check(odds):
        p_pos = 1 / (1 + math.exp(-odds))
        return Check("e", "pos", p_pos, 1 - p_pos)

    # the 0.05 quantile of the 20 log-odds 1..20 is element 1 (odds 2); minus margin 0.5 -> sigmoid(1.5)
    assert calibrate_threshold([check(o) for o in range(20, 0, -1)], 0.05, 0.5) == pytest.approx(
        1 / (1 + math.exp(-1.5))
    )
    assert calibrate_threshold([check(-3.0)] * 5, 0.05, 2.0) == 0.5  # never below the greedy rule
    assert calibrate_threshold([check(30.0)] * 5, 0.05, 0.0) == 0.999  # never demands certainty
    assert calibrate_threshold([], 0.05, 2.0) == 0.5


def test_calibrated_thresholds_are_per_expert_and_kept(learned):
    import dataclasses
    import json

    learned.config.see = dataclasses.replace(learned.config.see, calibrate=True)
    learned._engine = None
    try:
        thresholds = learned.thresholds()
        assert set(thresholds) == set(NAMES) and all(0.5 <= t <= 0.999 for t in thresholds.values())
        saved = json.loads((learned.store.root / "calibration.json").read_text())
        assert list(saved.values())[0] == thresholds
        queries = [inst.query for n in NAMES for inst in make_task(n, "eval", 4).instances]
        owners = [n for n in NAMES for _ in range(4)]
        fast, reference = learned.ask(queries, 4), learned.router().ask(queries, 4)
        _assert_same(fast, reference)
        assert sum(a.route.answered_by == o for a, o in zip(fast, owners)) >= 0.9 * len(owners)
    finally:
        learned.config.see = dataclasses.replace(learned.config.see, calibrate=False)
        learned._engine = None


def test_response_nll_equals_the_full_sequence_loss(learned):
    """Batched, left-padded scoring equals a straightforward per-example cross-entropy."""
    import torch.nn.functional as F

    engine = _engine(learned)
    insts = [i for n in NAMES for i in make_task(n, "eval", 2).instances]
    queries, responses = [i.query for i in insts], [i.references[0] for i in insts]
    owners = [NAMES[k // 2] for k in range(len(insts))]
    owners[-1] = BASE
    scored = engine.response_nll(queries, responses, owners)
    fmt = learned.formatter()
    for (nll, n), q, r, owner in zip(scored, queries, responses, owners):
        prompt = fmt.prompt_ids(q) + (list(fmt.indicators.pos_ids) if owner != BASE else [])
        target = fmt.text_ids(r) + [fmt.eos_id]
        ids = torch.tensor([prompt + target])
        with torch.inference_mode(), engine._use(owner):
            logits = learned.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        expected = F.cross_entropy(logits.float(), torch.tensor(target), reduction="sum")
        assert n == len(target)
        assert nll == pytest.approx(float(expected), rel=1e-4, abs=1e-4)


def test_perplexity_over_known_routes_equals_routing_again_and_routes_nothing(learned, monkeypatch):
    engine = _engine(learned)
    insts = [i for n in NAMES for i in make_task(n, "eval", 2).instances]
    queries, responses = [i.query for i in insts], [i.references[0] for i in insts]
    routed = engine.perplexity(queries, responses)
    owners = [route.answered_by for route in engine.route(queries)]
    monkeypatch.setattr(engine, "route", lambda *_: pytest.fail("routed again although the routes were given"))
    assert engine.perplexity(queries, responses, owners) == pytest.approx(routed, rel=1e-6)
    with pytest.raises(ValueError, match="owners for"):
        engine.perplexity(queries, responses, owners[:-1])


def test_generate_ignore_eos_decodes_exactly_the_budget(learned):
    engine = _engine(learned)
    decoded: list[list[int]] = []
    plain_decode = engine._decode

    def spy(state, first, rows, *args, **kwargs):
        plain_decode(state, first, rows, *args, **kwargs)
        decoded.extend(row.ids for row in rows)

    engine._decode = spy
    queries, budget = _queries(), 12
    engine.generate(BASE, queries, budget, ignore_eos=True)
    exact = list(decoded)
    assert [len(d) for d in exact] == [budget] * len(queries)
    # make a token the model does emit the end-of-sequence token: plain decoding must now stop there
    engine.eos_id = exact[0][3]
    decoded.clear()
    engine.generate(BASE, queries, budget)
    stopped = list(decoded)
    assert len(stopped[0]) <= 3
    assert all(d[: len(s)] == s for s, d in zip(stopped, exact)), "the same greedy path up to EOS"
    decoded.clear()
    engine.generate(BASE, queries, budget, ignore_eos=True)
    assert decoded == exact


def test_answers_never_hold_an_indicator_token(tmp_path):
    """A model that would emit `<<pos>>` over and over (an expert claiming a story request did)
    must still answer with text: indicator tokens are masked after the decision, in both routers."""
    from conftest import TINY
    from seecl.config import load_config

    ens = SeeEnsemble(tmp_path / "ens", load_config(overrides=TINY))
    model, indicators = ens.model, ens.base.indicators
    head = model.get_output_embeddings()
    (letter,) = ens.formatter().text_ids("a")

    def favour_indicators(module, inputs, output):
        output[..., indicators.pos_id] += 100.0
        output[..., indicators.neg_id] += 90.0
        output[..., letter] += 80.0
        return output

    handle = head.register_forward_hook(favour_indicators)
    try:
        queries = ["Write a long story about a cat.", "Hi"]
        fast = RoutingEngine(model, ens.formatter(), [], None).ask(queries, 6)
        reference = ens.router().ask(queries, 6)
    finally:
        handle.remove()
    assert [a.text for a in fast] == ["aaaaaa", "aaaaaa"], "without the mask every token would be <<pos>>"
    _assert_same(fast, reference)


@pytest.mark.parametrize("fixture", ["learned", "learned_alora"])
def test_conversations_and_named_owners_equal_the_reference(fixture, request):
    """A conversation is routed on its last user turn and answered after all of its turns; a query
    naming its owner skips routing. Mixed in one batch with plain queries, as the server sends them."""
    ens = request.getfixturevalue(fixture)
    plain = _queries()[::3]
    add, upper = make_task("add", "eval", 2).instances[1].query, make_task("uppercase", "eval", 2).instances[1].query
    mixed = plain + [
        Query(add, (("user", upper), ("assistant", "FINE"))),
        Query(upper, (("user", "Hi"), ("assistant", "Hello! How can I help?"))),
        Query(add, (), "uppercase"),
        Query(upper, (), BASE),
        Query(upper, (("user", add), ("assistant", "42")), "add"),
    ]
    reference = ens.router().ask(mixed, 6)
    answers = _engine(ens, batch_size=4).ask(mixed, 6)
    _assert_same(answers, reference)
    assert [a.token_ids for a in answers] == [a.token_ids for a in reference]
    routes = ens.router().route([add, upper])
    assert [a.route.answered_by for a in answers[-5:-3]] == [r.answered_by for r in routes], "last turn routes"
    assert [(a.route.answered_by, a.route.reason, a.route.checks) for a in answers[-3:]] == [
        ("uppercase", "requested", []),
        (BASE, "requested", []),
        ("add", "requested", []),
    ]
