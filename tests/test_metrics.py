"""Scores on known values: ROUGE-L (Spanish too), exact match, AR and BWT, routing F1 with and without
OOD claims."""

import pytest

from seecl.evaluation.metrics import (
    average_score,
    backward_transfer,
    confusion,
    exact_match,
    rb_acc,
    rouge_l,
    routing_accuracy,
    routing_prf,
    routing_prf_from_counts,
)


def test_rouge_l_known_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)
    # LCS "the cat the mat" = 4 of 6 tokens both ways -> F = 4/6
    assert rouge_l("the cat was on the mat", "the cat sat in the mat") == pytest.approx(100 * 4 / 6)
    # stemming: "running" and "runs" share the stem "run"
    assert rouge_l("running", "runs") == pytest.approx(100.0)
    assert rouge_l("x y", ["a b", "x y"]) == pytest.approx(100.0), "max over references"


def test_rouge_l_spanish_keeps_accents():
    # The default English tokenizer erases accented letters ("dónde" -> "d nde"): garbage matches.
    assert rouge_l("d nde", "dónde", language="en") == pytest.approx(100.0)
    assert rouge_l("d nde", "dónde", language="es") == pytest.approx(0.0)
    assert rouge_l("esta casa", "está casa", language="es") == pytest.approx(50.0)
    assert rouge_l("¿Dónde está?", "dónde está", language="es") == pytest.approx(100.0)


def test_exact_match_normalizes_case_and_punctuation():
    assert exact_match("Positive.", "positive") == 100.0
    assert exact_match("negative", ["positive"]) == 0.0


def test_ar_and_bwt_on_a_known_matrix():
    matrix = [[80.0, None, None], [70.0, 60.0, None], [50.0, 55.0, 90.0]]
    assert average_score(matrix) == pytest.approx((50 + 55 + 90) / 3)
    assert backward_transfer(matrix) == pytest.approx(((50 - 80) + (55 - 60)) / 2)
    assert backward_transfer([[10.0]]) is None


def test_routing_f1_on_a_known_confusion():
    truth = ["a", "a", "a", "b", "b", "ood", "ood"]
    routed = ["a", "a", "b", "b", "a", "base", "a"]
    prf = routing_prf(truth, routed, tasks=["a", "b"])
    # a: tp 2, fp 2 (one b, one ood), fn 1 -> P 0.5, R 2/3
    assert prf["a"]["precision"] == pytest.approx(0.5)
    assert prf["a"]["recall"] == pytest.approx(2 / 3)
    assert prf["a"]["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert prf["b"]["precision"] == pytest.approx(0.5) and prf["b"]["recall"] == pytest.approx(0.5)
    assert confusion(truth[:5], routed[:5], ["a", "b"], ["a", "b"]) == [[2, 1, 0], [1, 1, 0]]
    assert rb_acc(routed[5:]) == 0.5
    assert routing_accuracy(truth[:5], routed[:5]) == pytest.approx(3 / 5)


def test_routing_f1_from_counts_with_and_without_ood_claims():
    truth = ["a", "a", "a", "b", "b"]
    routed = ["a", "a", "b", "b", "base"]
    counts = confusion(truth, routed, ["a", "b"], ["a", "b"])

    def mean_f1(ood=None):
        prf = routing_prf_from_counts(counts, ["a", "b"], ["a", "b", "base"], ood)
        return sum(v["f1"] for v in prf.values()) / len(prf)

    in_task, with_ood = mean_f1(), mean_f1({"a": 2, "base": 3})
    f1 = lambda p, r: 2 * p * r / (p + r)
    assert in_task == pytest.approx((f1(1, 2 / 3) + f1(1 / 2, 1 / 2)) / 2)
    # two OOD queries claimed by a: its precision drops to 2/4, b is unchanged
    assert with_ood == pytest.approx((f1(2 / 4, 2 / 3) + f1(1 / 2, 1 / 2)) / 2)
    assert routing_prf_from_counts(counts, ["a", "b"], ["a", "b", "base"]) == routing_prf(truth, routed, ["a", "b"])
