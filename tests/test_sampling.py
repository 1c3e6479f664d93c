"""Decoding after routing: sampling, seeds, stop strings, logprobs, streaming deltas, cancelling.

Routing stays the greedy (or thresholded) indicator whatever the answer's Sampling says; greedy
answers are the same with or without logprobs and streaming.
"""

import random

import pytest
import torch

from seecl.data.synthetic import make_task
from seecl.serving.decoding import AnswerDecoding
from seecl.serving.engine import RoutingEngine
from seecl.serving.routing import BASE, Query, Sampling

NAMES = ["reverse_list", "uppercase", "add"]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    from conftest import TINY, learn_ensemble

    return learn_ensemble(tmp_path_factory.mktemp("sampling") / "ens", TINY, NAMES)


def queries():
    """Queries the experts claim, and rows the base answers."""
    claimed = [inst.query for n in NAMES for inst in make_task(n, "eval", 2).instances]
    return claimed + [Query("Hi", (), BASE), Query("What is a lighthouse?", (), BASE)]


def engine(ens, batch_size=4):
    return RoutingEngine(ens.model, ens.formatter(), ens.experts(), None, batch_size, prefix_cache_tokens=256)


def streamed(run):
    """Call `run(on_token)`; returns its answers and the deltas each query received."""
    deltas: dict[int, list] = {}
    answers = run(lambda index, delta: deltas.setdefault(index, []).append(delta))
    return answers, deltas


def test_greedy_answers_are_the_same_with_logprobs_and_streaming(ensemble):
    qs = queries()
    plain = engine(ensemble).ask(qs, 10)
    assert {a.route.reason for a in plain} == {"claimed", "requested"}, "claimed rows and base rows"
    answers, deltas = streamed(lambda cb: engine(ensemble).ask(qs, Sampling(10, logprobs=3), cb))
    assert [a.token_ids for a in answers] == [a.token_ids for a in plain]
    assert [a.text for a in answers] == [a.text for a in plain]
    for index, answer in enumerate(answers):
        mine = deltas[index]
        assert "".join(d.text for d in mine) == answer.text, "the pieces make the answer"
        assert [d.token_id for d in mine[:-1]] == answer.token_ids and mine[-1].answer is answer
        assert [lp.token_id for lp in answer.logprobs] == answer.token_ids
        for entry in answer.logprobs:
            assert len(entry.top) == 3 and entry.top[0] == (entry.token_id, entry.logprob), "greedy takes the top"
            assert entry.logprob <= 0 and sum(torch.tensor([lp for _, lp in entry.top]).exp()) <= 1 + 1e-5


def test_logprobs_are_the_models_distribution_without_the_indicators(ensemble):
    [answer] = engine(ensemble).ask([Query("Hi", (), BASE)], Sampling(3, logprobs=2))
    formatter = ensemble.formatter()
    ids = formatter.prompt_ids("Hi")
    model = ensemble.model
    with torch.inference_mode(), model.disable_adapter():
        logits = model(torch.tensor([ids + answer.token_ids[:1]])).logits[0, -2:].float()
        logits[:, formatter.indicators.blocked_in_answers] = float("-inf")
    expected = torch.log_softmax(logits, -1)
    for position, entry in enumerate(answer.logprobs[:2]):
        assert entry.logprob == pytest.approx(float(expected[position, entry.token_id]), abs=1e-4)


def test_seeded_samples_repeat_and_other_seeds_differ(ensemble):
    qs = queries()
    greedy = engine(ensemble).ask(qs, 12)
    first = engine(ensemble).ask(qs, Sampling(12, temperature=1.0, seed=7))
    again = engine(ensemble, batch_size=64).ask(qs, Sampling(12, temperature=1.0, seed=7))
    other = engine(ensemble).ask(qs, Sampling(12, temperature=1.0, seed=8))
    assert [a.token_ids for a in first] == [a.token_ids for a in again]
    assert [a.token_ids for a in first] != [a.token_ids for a in other]
    assert [a.token_ids for a in first] != [a.token_ids for a in greedy]
    # routing is the greedy indicator whatever the answer samples
    assert [a.route for a in first] == [a.route for a in greedy] == [a.route for a in other]
    blocked = set(ensemble.formatter().indicators.blocked_in_answers)
    assert not blocked & {t for a in first + other for t in a.token_ids}, "a sample never holds an indicator"


def test_a_tiny_top_p_keeps_only_the_most_likely_token(ensemble):
    qs = queries()
    greedy = engine(ensemble).ask(qs, 8)
    nucleus = engine(ensemble).ask(qs, Sampling(8, temperature=1.5, top_p=1e-6, seed=3))
    assert [a.token_ids for a in nucleus] == [a.token_ids for a in greedy]


def test_a_stop_string_ends_the_answer_before_it(ensemble):
    qs = queries()
    sampled = engine(ensemble).ask(qs, Sampling(16, temperature=1.0, seed=5))  # varied text to cut
    index, text = next((i, a.text) for i, a in enumerate(sampled) if len(a.text) >= 8)
    stop = text[5:7]
    cut = text[: text.find(stop)].rstrip()
    stopping = Sampling(16, temperature=1.0, seed=5, stop=(stop, "never seen"))
    answers, deltas = streamed(lambda cb: engine(ensemble).ask(qs, stopping, cb))
    answer = answers[index]
    assert answer.text == cut and answer.finish_reason == "stop"
    assert answer.token_ids == sampled[index].token_ids[: len(answer.token_ids)]
    assert "".join(d.text for d in deltas[index]) == cut, "nothing of the stop string was streamed"


def test_a_cancelling_callback_stops_only_its_answer(ensemble):
    qs = queries()
    greedy = engine(ensemble).ask(qs, 10)
    counts: dict[int, int] = {}

    def on_token(index, delta):
        counts[index] = counts.get(index, 0) + 1
        return not (index == 0 and counts[index] >= 2)

    answers = engine(ensemble).ask(qs, 10, on_token)
    assert answers[0].finish_reason == "cancelled" and answers[0].token_ids == greedy[0].token_ids[:2]
    assert [a.token_ids for a in answers[1:]] == [a.token_ids for a in greedy[1:]]


def test_an_expert_that_only_wants_indicators_still_answers_with_real_tokens(ensemble):
    """Regression: a claiming expert whose every next token is `<<pos>>` answered "" with
    finish_reason "stop"; the indicators are masked, and the budget is spent on real tokens."""
    pos = ensemble.formatter().indicators.pos_id
    (letter,) = ensemble.formatter().text_ids("z")
    head = ensemble.model.get_output_embeddings()

    def prefer(module, inputs, output):  # <<pos>> first, then "z"
        output[..., pos] += 60.0
        output[..., letter] += 50.0
        return output

    handle = head.register_forward_hook(prefer)
    try:
        answers = engine(ensemble).ask(queries()[:3], 5)
    finally:
        handle.remove()
    for answer in answers:
        assert answer.route.reason == "claimed"  # the indicator is still read at the decision position
        assert answer.token_ids == [letter] * 5 and answer.text == "zzzzz" and answer.finish_reason == "length"


def test_pieces_always_make_the_text_even_for_broken_utf8(tiny_base):
    """Random byte tokens (invalid and split UTF-8 included): streamed pieces concatenate to the
    answer's text, whatever the decoding of the whole answer makes of them."""
    from seecl.data.prompts import PromptFormatter

    tokenizer = tiny_base.tokenizer
    formatter = PromptFormatter(tokenizer, tiny_base.indicators)
    rng = random.Random(0)
    byte_ids = list(range(256))  # the tiny tokenizer has one token per byte
    samples = [[rng.choice(byte_ids) for _ in range(rng.randint(1, 30))] for _ in range(300)]
    samples += [tokenizer.encode(text, add_special_tokens=False) for text in ("  héllo ✓ 日本  ", "\n\na b\n", "€")]
    for ids in samples:
        pieces = []
        decoding = AnswerDecoding(
            "q",
            Sampling(len(ids)),
            formatter.decode,
            lambda part: tokenizer.decode(part, skip_special_tokens=True),
            lambda delta: pieces.append(delta.text),
        )
        for token in ids:
            if not decoding.push(token, torch.zeros(1)):
                break
        assert decoding.answer is not None
        assert "".join(pieces) == decoding.answer.text == formatter.decode(ids)
