"""SEE's data reconstruction: exactly round(tau*|D_j|) negatives per earlier task, queries only, seeded
and nested samples, pseudo and general negatives."""

import pytest

from seecl.data.synthetic import make_task
from seecl.data.task import Instance, Task
from seecl.errors import StoreError
from seecl.see.reconstruction import (
    build_memory,
    memory_size,
    negatives_count,
    reconstruct,
)


def task(name, n):
    return Task(name, tuple(Instance(f"{name}-{i}", f"{name} query {i}", (f"{name} answer {i}",)) for i in range(n)))


EARLIER = [task("a", 200), task("b", 37), task("c", 1000)]
MEMORIES = [build_memory(t, 0.2, seed=0) for t in EARLIER]


@pytest.mark.parametrize("tau", [0.01, 0.05, 0.1, 0.2])
def test_exact_negative_counts_per_earlier_task(tau):
    rec = reconstruct(task("new", 50), MEMORIES, tau, seed=0)
    counts = {k: len(v) for k, v in rec.negative_ids().items() if v}
    expected = {t.name: round(tau * len(t) + 1e-9) for t in EARLIER if round(tau * len(t) + 1e-9)}
    assert counts == expected
    assert len(rec.positives) == 50


def test_count_rounding():
    assert negatives_count(0.1, 100) == 10  # 0.1 * 100 is 10.000000000000002 in floats
    assert negatives_count(0.01, 50) == 1  # 0.5 rounds up
    assert negatives_count(0.01, 49) == 0
    assert memory_size(0.2, 100) == 20 and memory_size(0.2, 37) == 8


def test_memory_keeps_queries_only_and_enough_for_max_tau():
    for t, mem in zip(EARLIER, MEMORIES):
        assert len(mem.items) == memory_size(0.2, len(t)) >= negatives_count(0.2, len(t))
        assert mem.total == len(t)
        assert not hasattr(mem.items[0], "response")


def test_negatives_carry_no_response_text():
    from seecl.data.prompts import PromptFormatter
    from seecl.model.indicators import Indicators
    from seecl.model.tiny import build_tiny_tokenizer

    rec = reconstruct(task("new", 10), MEMORIES, 0.1, seed=0)
    tokenizer = build_tiny_tokenizer()
    fake = Indicators("semantic", "Yes", "No", (10,), (11,))
    examples = rec.examples(PromptFormatter(tokenizer, fake))
    negatives = [e for e in examples if not e.positive]
    assert len(negatives) == sum(len(v) for v in rec.negative_ids().values())
    for example in negatives:
        supervised = [t for t in example.labels if t != -100]
        assert supervised == [11, tokenizer.eos_token_id]
        assert "answer" not in tokenizer.decode(list(example.input_ids))


def test_seeded_determinism_and_nesting():
    one = reconstruct(task("new", 10), MEMORIES, 0.1, seed=3).negative_ids()
    assert one == reconstruct(task("new", 10), MEMORIES, 0.1, seed=3).negative_ids()
    assert one != reconstruct(task("new", 10), MEMORIES, 0.1, seed=4).negative_ids()
    small = reconstruct(task("new", 10), MEMORIES, 0.05, seed=3).negative_ids()
    for source, ids in small.items():
        assert set(ids) <= set(one[source]), "a smaller tau samples a subset of a larger one"


def test_tau_above_memory_is_an_error():
    with pytest.raises(StoreError, match="memory keeps"):
        reconstruct(task("new", 10), MEMORIES, 0.5, seed=0)


def test_pseudo_and_general_negatives():
    general = make_task("sentiment", "train", 200).instances
    pseudo = reconstruct(task("new", 10), MEMORIES, 0.1, seed=0, general=general, pseudo=True)
    assert set(pseudo.negative_ids()) == {"general"}
    assert len(pseudo.negatives) == sum(negatives_count(0.1, len(t)) for t in EARLIER)
    extra = reconstruct(task("new", 10), MEMORIES, 0.1, seed=0, general=general, n_general=7)
    assert len(extra.negative_ids()["general"]) == 7
    first = reconstruct(task("first", 10), [], 0.1, seed=0, general=general, n_general=7)
    assert len(first.negatives) == 7, "general negatives also reach the first expert"
