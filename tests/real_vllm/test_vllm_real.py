"""The vLLM engine on a real vLLM (its CPU build is enough): `make test-vllm`, marker `vllm`.

A tiny model vLLM's CPU kernels serve is built in the test and three experts are trained on it the
default way: each trains its own <<pos>>/<<neg>> rows, which reach vLLM rewritten as embedding and
output-head LoRA. One `vllm.LLM` over the exported base serves every engine of the module; the CLI
tests start their own in a subprocess, as a user would. Two more ensembles get their own: one with
`model.indicator_rows=shared` (the first expert's rows exported with the base, every expert a plain
LoRA), one with in-vocabulary «pos»/«neg» (a multi-token indicator, whose experts also say
neither). Routes and greedy answers are compared with the reference router and the PEFT engine in
float32. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from backend_checks import (
    check_mixed_budgets,
    check_no_experts,
    check_owners_and_conversations,
    check_protocol,
    check_routes_and_greedy_answers,
    same_routes,
)
from conftest import TINY, learn_ensemble
from seecl.config import VllmConfig
from seecl.data.synthetic import make_task
from seecl.see.ensemble import SeeEnsemble
from seecl.serving.engine import RoutingEngine
from seecl.serving.reference import SequentialRouter
from seecl.serving.routing import BASE, Query, Sampling

pytestmark = pytest.mark.vllm
# vLLM's CPU build pins its OpenMP threads to cores unless told not to; tests share the machine.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

NAMES = ["reverse_list", "uppercase", "add"]
DEFAULT = TINY  # per-expert indicator rows
SHARED = TINY + ["model.indicator_rows=shared"]
NONSEMANTIC = TINY + ["model.indicator=nonsemantic", "adapter.train_indicator_rows=false", "train.epochs=12"]
# float32 for the PEFT path's numbers; a small context and KV cache start vLLM quickly on a CPU.
VLLM_SETTINGS = {"dtype": "float32", "max_model_len": 512, "kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 16}
CLI_SETTINGS = [f"vllm.{k}={v}" for k, v in VLLM_SETTINGS.items()]


def queries():
    return [inst.query for n in NAMES for inst in make_task(n, "eval", 3).instances] + [
        "Hi",
        "Tell me a long story about a lighthouse keeper and the sea.",
    ]


def tiny_ensemble(root, overrides):
    from seecl.model.tiny import save_servable_tiny_model

    model = save_servable_tiny_model(root / "tiny-model")
    return learn_ensemble(root / "ens", overrides + [f"model.name={model}"], NAMES)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    from seecl.serving.vllm_experts import has_token_rows

    ens = tiny_ensemble(tmp_path_factory.mktemp("vllm-real"), DEFAULT)
    assert all(has_token_rows(ens.store.expert_dir(n)) for n in NAMES), "every expert trains its own rows"
    return ens


def served_llm(ens):
    """A `vllm.LLM` over the ensemble's exported base, for the vLLM form of its experts."""
    from seecl.serving.vllm_experts import ensure_expert
    from seecl.serving.vllm_export import ensure_base
    from seecl.serving.vllm_llm import build_llm

    base = ensure_base(ens.store.root)
    experts = [ensure_expert(ens.store.root, n, base) for n in NAMES]
    return build_llm(base, experts, VllmConfig(**VLLM_SETTINGS))


@pytest.fixture(scope="module")
def llm(ensemble):
    llm = served_llm(ensemble)
    yield llm
    # Stopped here, while pytest still captures output: at interpreter exit vLLM's shutdown
    # logging would write to streams pytest has closed.
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None:
        core.shutdown()


def reference_of(ensemble):
    return lambda threshold, experts=None: SequentialRouter(
        ensemble.model, ensemble.formatter(), ensemble.experts() if experts is None else experts, threshold, 4
    )


@pytest.fixture
def make(ensemble, llm):
    from seecl.serving.vllm_engine import VllmEngine

    return lambda threshold=None, experts=None: VllmEngine(
        ensemble.store.root, threshold=threshold, experts=experts, llm=llm
    )


def test_the_engine_is_a_backend_over_the_ensembles_experts(make):
    check_protocol(make, NAMES)


# These experts claim their queries with P(pos)/(P(pos)+P(neg)) below 0.999: that threshold turns
# every claim into a decline; the per-expert thresholds turn only the uppercase expert's claims
# into declines (which walk on to older experts), whatever the other experts' probabilities are.
@pytest.mark.parametrize("threshold", [None, 0.999, {"reverse_list": 0.5, "uppercase": 0.999, "add": 0.5}])
def test_routes_and_greedy_answers_equal_the_reference_and_the_peft_engine(make, ensemble, threshold):
    qs = queries()
    answers = check_routes_and_greedy_answers(make, reference_of(ensemble), qs, threshold, NAMES)
    engine = RoutingEngine(ensemble.model, ensemble.formatter(), NAMES, threshold, batch_size=4)
    peft = engine.ask(qs, 6)
    same_routes([a.route for a in answers], [a.route for a in peft])
    assert [a.text for a in answers] == [a.text for a in peft]
    assert all(a.finish_reason in ("stop", "length") for a in answers)
    assert all(ensemble.formatter().decode(a.token_ids) == a.text for a in answers)


def test_named_owners_and_conversations_equal_the_reference(make, ensemble):
    check_owners_and_conversations(make, reference_of(ensemble), queries(), NAMES)


def test_all_negative_routes_equal_the_reference(make, ensemble):
    """No hook can force vLLM's outputs: a threshold no claim reaches turns every claim into a decline."""
    qs = queries()
    expected = reference_of(ensemble)(0.99999).route(qs)
    same_routes(make(0.99999).route(qs), expected)
    assert {r.reason for r in expected} == {"all_negative"}


def test_a_shared_rows_ensemble_equals_the_reference_and_the_peft_engine(tmp_path):
    """model.indicator_rows=shared: the first expert's rows are exported with the base and every
    expert is a plain LoRA adapter, served as saved."""
    from seecl.serving.vllm_engine import VllmEngine

    ens = tiny_ensemble(tmp_path, SHARED)
    assert ens.store.manifest()["indicator_rows"]["trained_by"] == NAMES[0]
    llm = served_llm(ens)
    try:
        qs = queries()
        engine = VllmEngine(ens.store.root, llm=llm)
        assert all(engine.loras[n][2] == str(ens.store.expert_dir(n).resolve()) for n in NAMES)
        answers = engine.ask(qs, 6)
        peft = RoutingEngine(ens.model, ens.formatter(), NAMES, None, batch_size=4).ask(qs, 6)
        same_routes([a.route for a in answers], [a.route for a in peft])
        assert [a.text for a in answers] == [a.text for a in peft]
        assert len({a.route.answered_by for a in peft}) >= 3
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_a_multi_token_indicator_and_neither_equal_the_reference(tmp_path):
    """«pos»/«neg» share their first two tokens (decided after a greedy prefix), and these experts
    sometimes produce neither indicator: the query goes to the base model at once."""
    from seecl.serving.vllm_engine import VllmEngine

    ens = tiny_ensemble(tmp_path, NONSEMANTIC)
    assert len(ens.base.indicators.shared_prefix) == 2
    llm = served_llm(ens)
    try:
        qs = queries()
        expected = reference_of(ens)(None).ask(qs, 6)
        answers = VllmEngine(ens.store.root, threshold=None, llm=llm).ask(qs, 6)
        same_routes([a.route for a in answers], [a.route for a in expected])
        assert [a.text for a in answers] == [a.text for a in expected]
        assert {"claimed", "exception"} <= {a.route.reason for a in expected}
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_mixed_budgets_and_a_zero_budget_only_routes(make, ensemble):
    check_mixed_budgets(make, reference_of(ensemble), queries())


def test_no_experts(make, ensemble):
    check_no_experts(make, reference_of(ensemble))


def test_sampling_maps_onto_vllm_and_routing_stays_greedy(make, ensemble):
    qs = queries()[:4]
    engine = make()
    greedy = engine.route(qs)
    seeded = [Sampling(max_tokens=8, temperature=1.5, top_p=0.9, seed=7)] * len(qs)
    first, again = engine.ask(qs, seeded), engine.ask(qs, seeded)
    same_routes([a.route for a in first], greedy)
    assert [a.text for a in first] == [a.text for a in again], "a fixed seed gives the same sample"
    short = engine.ask(qs, Sampling(max_tokens=2))
    assert all(a.finish_reason == "length" and len(a.token_ids) == 2 for a in short if a.route.answered_by != BASE)
    full = engine.ask(qs, 8)
    stops = [a.text[1:3] for a in full]
    cut = engine.ask(qs, [Sampling(max_tokens=8, stop=(s,)) if s else 8 for s in stops])
    assert [a.text for a, s in zip(cut, stops) if s] == [a.text[: a.text.find(s)] for a, s in zip(full, stops) if s]


def test_the_added_indicators_are_banned_in_answers_as_single_ids(tmp_path):
    """`bad_words` is the mask only if vLLM turns each word into exactly its one id."""
    from vllm import SamplingParams
    from vllm.tokenizers import get_tokenizer

    from seecl.model.indicators import INDICATOR_STRINGS
    from seecl.model.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    words = list(INDICATOR_STRINGS["added"])
    tokenizer.add_tokens(words, special_tokens=True)
    tokenizer.save_pretrained(tmp_path)
    ids = [tokenizer.convert_tokens_to_ids(w) for w in words]
    params = SamplingParams(bad_words=words)
    params.update_from_tokenizer(get_tokenizer(str(tmp_path)))
    assert params._bad_words_token_ids == [[i] for i in ids]


def test_an_expert_added_while_the_engine_runs_is_asked_first(ensemble, llm, tmp_path):
    from seecl.serving.vllm_engine import VllmEngine

    root = tmp_path / "ens"
    shutil.copytree(ensemble.store.root, root)
    engine = VllmEngine(root, llm=llm)
    qs = queries() + [i.query for i in make_task("sentiment", "eval", 2).instances]
    same_routes(engine.route(qs), reference_of(ensemble)(None).route(qs))
    grown = SeeEnsemble.open(root, [o for o in DEFAULT if not o.startswith("model.")])
    grown.learn(make_task("sentiment", "train", 48))
    assert engine.experts() == [*NAMES, "sentiment"]
    after = engine.ask(qs, 6)
    expected = reference_of(grown)(None).ask(qs, 6)
    same_routes([a.route for a in after], [a.route for a in expected])
    assert [a.text for a in after] == [a.text for a in expected]
    assert all(a.route.checks[0].expert == "sentiment" for a in after), "the newest expert is asked first"


# -- the command line, as a user runs it --------------------------------------------------------------------
def seecl(*args: str) -> list[str]:
    return [sys.executable, "-m", "seecl.cli", *args]


def test_cli_ask_with_vllm_prints_the_peft_engines_routes_and_answers(ensemble, capsys):
    from seecl.cli import main

    qs = queries()[::2]
    assert main(["ask", "--ensemble", str(ensemble.store.root), "--json", "--max-new-tokens", "6", *qs]) == 0
    peft = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    sets = [x for s in CLI_SETTINGS for x in ("--set", s)]
    args = ["ask", "--ensemble", str(ensemble.store.root), "--backend", "vllm", "--json", "--max-new-tokens", "6"]
    run = subprocess.run(seecl(*args, *sets, *qs), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    served = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [(a["answered_by"], a["reason"], a["answer"]) for a in served] == [
        (a["answered_by"], a["reason"], a["answer"]) for a in peft
    ]
    for got, expected in zip(served, peft):
        assert [(c["expert"], c["verdict"]) for c in got["checks"]] == [
            (c["expert"], c["verdict"]) for c in expected["checks"]
        ]
        assert [c["p_pos"] for c in got["checks"]] == pytest.approx([c["p_pos"] for c in expected["checks"]], abs=1e-4)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_with_vllm_answers_openai_chat_and_responses_requests_with_their_route(ensemble):
    import httpx

    port = free_port()
    sets = [x for s in CLI_SETTINGS for x in ("--set", s)]
    args = ["serve", "--ensemble", str(ensemble.store.root), "--backend", "vllm", "--port", str(port), *sets]
    server = subprocess.Popen(seecl(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        query = queries()[0]
        reply = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": query}], "max_tokens": 6},
            timeout=300,
        )
        assert reply.status_code == 200, reply.text
        (choice,) = reply.json()["choices"]
        (expected,) = reference_of(ensemble)(ensemble.thresholds()).ask([query], 6)  # as the server routes
        assert choice["route"]["answered_by"] == expected.route.answered_by
        assert [c["verdict"] for c in choice["route"]["checks"]] == [c.verdict for c in expected.route.checks]
        assert choice["message"]["content"] == expected.text
        response = httpx.post(f"{url}/v1/responses", json={"input": query, "max_output_tokens": 6}, timeout=300)
        assert response.status_code == 200, response.text
        ((part,),) = [item["content"] for item in response.json()["output"]]
        assert part["text"] == expected.text
        assert response.json()["route"]["answered_by"] == expected.route.answered_by
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        model_id = models["data"][0]["id"]
        assert [m["id"] for m in models["data"]][1:] == [f"{model_id}/{n}" for n in [*NAMES, BASE]]
        # A request naming one expert is answered by it, unrouted, as PEFT answers it.
        owner = NAMES[1]
        named = httpx.post(
            f"{url}/v1/completions",
            json={"model": f"{model_id}/{owner}", "prompt": query, "max_tokens": 6},
            timeout=300,
        )
        assert named.status_code == 200, named.text
        (choice,) = named.json()["choices"]
        (expected,) = reference_of(ensemble)(ensemble.thresholds()).ask([Query(query, owner=owner)], 6)
        assert choice["route"]["answered_by"] == owner and choice["route"]["reason"] == "requested"
        assert choice["text"] == expected.text
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode == 0, "a clean exit: the vLLM engine processes were stopped, not orphaned"


def test_the_vllm_routing_benchmark_runs_its_smoke_mode(tmp_path):
    """bench/vllm_routing.py end to end on a tiny ensemble (the timings mean nothing here)."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "vllm_routing.py"
    out = tmp_path / "vllm_routing.json"
    run = subprocess.run(
        [sys.executable, str(script), "--smoke", "--repeats", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(out.read_text())["vllm"]
    assert row["queries"] == 24 and row["routing_accuracy"] > 0.5
    assert row["same_route_as_engine"] == row["same_answer_as_engine"] == 24, "vLLM answers as the PEFT engine"
    for key in ("vllm_qps", "vllm_single_qps", "engine_qps", "overhead_measured", "cost_model_unsimplified_eq8_batch"):
        assert isinstance(row[key], float)
