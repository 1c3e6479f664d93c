"""The vLLM backend without vLLM: request construction, the walk over a fake `LLM`, refusal of
experts with their own token rows, and the exported base (tiny model, no network)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from seecl.data.synthetic import make_task
from seecl.errors import SeeclError
from seecl.model.indicators import Indicators
from seecl.see.store import FORMAT
from seecl.serving.routing import BASE, decide
from seecl.serving.vllm_engine import (
    INSTALL_HINT,
    VllmEngine,
    answer_requests,
    check_params,
    check_requests,
    check_servable,
    export_base,
    generation_params,
    lora_settings,
    lora_table,
    token_row_tensors,
    verdict,
    vllm_available,
)

ADDED = Indicators("added", "<<pos>>", "<<neg>>", (300,), (301,))
# «pos»/«neg» style: two shared tokens, then the decision token
MULTI = Indicators("nonsemantic", "«pos»", "«neg»", (3, 4, 5), (3, 4, 6))
LORA = ("e1", 1, "/ens/experts/e1")


# -- a hand-written ensemble: manifest, LoRA-only adapters, exported tokenizer ----------------------------
def write_adapter(directory, r=8, rows=False):
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    prefix = "base_model.model.model.layers.0.self_attn"
    tensors = {f"{prefix}.{m}.lora_A.weight": torch.zeros(r, 64) for m in ("q_proj", "v_proj")}
    tensors.update({f"{prefix}.{m}.lora_B.weight": torch.zeros(64, r) for m in ("q_proj", "v_proj")})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    if rows:
        tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = torch.zeros(2, 64)
        config["trainable_token_indices"] = [258, 259]
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config))


def write_ensemble(root, names, rows=(), ranks=None, kind="added"):
    from seecl.model.indicators import INDICATOR_STRINGS
    from seecl.model.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    texts = INDICATOR_STRINGS[kind]
    if kind == "added":
        tokenizer.add_tokens(list(texts), special_tokens=True)
    tokenizer.save_pretrained(root / "base")
    pos, neg = (tokenizer.encode(t, add_special_tokens=False) for t in texts)
    for name in names:
        write_adapter(root / "ens" / "experts" / name, (ranks or {}).get(name, 8), name in rows)
    manifest = {
        "format": FORMAT,
        "created": "now",
        "vocab_size": len(tokenizer),
        "model": {"name": "tiny-random", "indicator": kind, "system_prompt": None, "device": "auto", "dtype": "auto"},
        "indicators": {"kind": kind, "pos": texts[0], "neg": texts[1], "pos_ids": pos, "neg_ids": neg},
        "experts": [{"name": n, "dir": f"experts/{n}"} for n in names],
    }
    (root / "ens" / "manifest.json").write_text(json.dumps(manifest))
    return root / "ens", root / "base"


def output(tokens, logprobs=None):
    steps = [{t: SimpleNamespace(logprob=v) for t, v in logprobs.items()}] if logprobs is not None else None
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(tokens), logprobs=steps)])


class FakeLLM:
    """Answers like `vllm.LLM.generate`: each query's prompt has an owner expert (or none)."""

    def __init__(self):
        self.calls = []
        self.owners = {}  # prompt ids -> owning expert, "nobody", "confused" or "off-prefix"

    def setup(self, engine, owners):
        self.engine = engine
        self.owners = {tuple(engine.formatter.prompt_ids(q)): o for q, o in owners.items()}

    def owner(self, ids):
        return next(o for key, o in self.owners.items() if tuple(ids[: len(key)]) == key)

    def generate(self, prompts, sampling_params, lora_request=None, use_tqdm=True):
        self.calls.append((prompts, sampling_params, lora_request))
        ind, fmt = self.engine.indicators, self.engine.formatter
        results = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            ids, name = prompt["prompt_token_ids"], lora_request[i][0] if lora_request else BASE
            if "stop_token_ids" not in params and "max_tokens" in params and params.get("ignore_eos"):
                # the greedy shared-prefix request
                prefix = list(ind.shared_prefix) if self.owner(ids) != "off-prefix" else [65, 66]
                results.append(output(prefix[: params["max_tokens"]]))
            elif "logprob_token_ids" in params or "logprobs" in params:
                owner = self.owner(ids)
                if owner in (name, "off-prefix"):
                    results.append(output([ind.pos_id], {ind.pos_id: math.log(0.9), ind.neg_id: math.log(0.05)}))
                elif owner == "confused":
                    results.append(output([65], {65: math.log(0.5), ind.neg_id: math.log(0.2)}))
                else:
                    results.append(output([ind.neg_id], {ind.pos_id: math.log(0.1), ind.neg_id: math.log(0.8)}))
            else:
                results.append(output(fmt.text_ids(name)[: params["max_tokens"]] + [fmt.eos_id]))
        return results


@pytest.fixture
def fake(tmp_path):
    ens, base = write_ensemble(tmp_path, ["e1", "e2", "e3"])
    llm = FakeLLM()
    engine = VllmEngine(ens, base, llm=llm, logprob_token_ids=True)
    llm.setup(engine, {"for e3": "e3", "for e1": "e1", "unknown": "nobody", "odd": "confused"})
    return engine, llm


# -- import guard ------------------------------------------------------------------------------------------
@pytest.mark.skipif(vllm_available(), reason="vLLM is installed")
def test_the_engine_without_vllm_says_how_to_install_it(tmp_path):
    with pytest.raises(SeeclError, match=r"pip install seecl\[vllm\]"):
        VllmEngine(tmp_path / "ens", tmp_path / "base")
    assert INSTALL_HINT == "pip install seecl[vllm]"


# -- request construction ----------------------------------------------------------------------------------
def test_one_lora_request_per_expert_with_stable_ids_and_paths(tmp_path):
    table = lora_table(tmp_path, ["a", "b", "c"])
    assert [v[:2] for v in table.values()] == [("a", 1), ("b", 2), ("c", 3)]
    assert table["b"][2] == str((tmp_path / "experts" / "b").resolve())
    assert lora_table(tmp_path, ["a", "b", "c", "d"])["c"] == table["c"], "adding an expert keeps the ids"


def test_indicator_check_asks_one_greedy_token_and_both_indicator_logprobs():
    params = check_params(ADDED, specific_ids=True)
    assert params["max_tokens"] == 1 and params["temperature"] == 0.0
    assert params["logprob_token_ids"] == [300, 301] and "logprobs" not in params
    fallback = check_params(ADDED, specific_ids=False, top_k=20)
    assert fallback["logprobs"] == 20 and "logprob_token_ids" not in fallback
    requests = check_requests([[1, 2], [7]], ADDED, LORA, True)
    assert [r.prompt_token_ids for r in requests] == [[1, 2], [7]]
    assert all(r.lora == LORA and r.kind == "check" for r in requests)


def test_a_shared_indicator_prefix_is_appended_and_checked_greedily():
    requests = check_requests([[1, 2], [7]], MULTI, LORA, True)
    checks, prefixes = requests[:2], requests[2:]
    assert [r.prompt_token_ids for r in checks] == [[1, 2, 3, 4], [7, 3, 4]]
    assert checks[0].params["logprob_token_ids"] == [5, 6] and checks[0].params["max_tokens"] == 1
    assert [r.prompt_token_ids for r in prefixes] == [[1, 2], [7]]
    assert all(r.params["max_tokens"] == 2 and r.params["temperature"] == 0.0 and r.lora == LORA for r in prefixes)


def test_generation_stops_at_eos_with_a_budget_per_query():
    params = generation_params(9, eos_id=2)
    assert params["stop_token_ids"] == [2] and params["ignore_eos"] and params["max_tokens"] == 9
    expert = answer_requests([[1], [4, 5]], [3, 7], 2, ADDED.pos_ids, LORA)
    assert [r.prompt_token_ids for r in expert] == [[1, 300], [4, 5, 300]]
    assert [r.params["max_tokens"] for r in expert] == [3, 7] and all(r.lora == LORA for r in expert)
    base = answer_requests([[1]], [4], 2)
    assert base[0].prompt_token_ids == [1] and base[0].lora is None


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_the_verdict_equals_routing_decide(threshold):
    generator = torch.Generator().manual_seed(0)
    for trial in range(400):
        logprobs = torch.randn(3, 12, generator=generator) * 3
        for row, token in enumerate((3, 4, trial % 3 + 5)):  # make prefix/pos/neg argmaxes common
            if (trial >> row) % 4:
                logprobs[row, token] += 8
        logprobs = torch.log_softmax(logprobs, -1)
        greedy = []
        for row, token in enumerate(MULTI.shared_prefix):  # vLLM decodes the prefix, stops mattering at a miss
            greedy.append(int(logprobs[row].argmax()))
            if greedy[-1] != token:
                break
        final = logprobs[2]
        got = verdict("e", int(final.argmax()), {5: float(final[5]), 6: float(final[6])}, MULTI, greedy, threshold)
        expected = decide(logprobs, MULTI, threshold)
        assert got.verdict == expected[0], trial
        assert (got.p_pos, got.p_neg) == pytest.approx(expected[1:]), trial


def test_an_indicator_outside_the_top_k_counts_as_probability_zero():
    check = verdict("e", 301, {301: math.log(0.7), 17: math.log(0.1)}, ADDED)
    assert (check.verdict, check.p_pos) == ("neg", 0.0) and check.p_neg == pytest.approx(0.7)


# -- the walk on a fake LLM --------------------------------------------------------------------------------
def test_walk_asks_newest_first_and_claimed_queries_leave(fake):
    engine, llm = fake
    assert engine.experts() == ["e1", "e2", "e3"]
    queries = ["for e3", "for e1", "unknown", "odd", "for e1"]
    answers = engine.ask(queries, [5, 6, 7, 8, 0])
    checks = [c for c in llm.calls if "logprob_token_ids" in c[1][0]]
    assert [c[2][0][:2] for c in checks] == [("e3", 3), ("e2", 2), ("e1", 1)]
    assert [len(c[0]) for c in checks] == [5, 3, 3], "claimed and undecided queries leave the walk"
    assert all(
        p["logprob_token_ids"] == [engine.indicators.pos_id, engine.indicators.neg_id] and p["max_tokens"] == 1
        for c in checks
        for p in c[1]
    )
    routes = [(a.route.answered_by, a.route.reason, [c.expert for c in a.route.checks]) for a in answers]
    assert routes == [
        ("e3", "claimed", ["e3"]),
        ("e1", "claimed", ["e3", "e2", "e1"]),
        (BASE, "all_negative", ["e3", "e2", "e1"]),
        (BASE, "exception", ["e3"]),
        ("e1", "claimed", ["e3", "e2", "e1"]),
    ]
    assert answers[1].route.checks[-1].p_pos == pytest.approx(0.9)
    assert [a.text for a in answers] == ["e3", "e1", "base", "base", ""], "budget 0 only routes"
    generations = llm.calls[len(checks) :]
    assert [c[2][0][0] if c[2] else BASE for c in generations] == ["e1", "e3", BASE]
    e1, _, base = generations
    assert e1[0][0]["prompt_token_ids"][-1] == engine.indicators.pos_id, "experts continue after <<pos>>"
    assert [p["max_tokens"] for p in e1[1]] == [6] and [p["max_tokens"] for p in base[1]] == [7, 8]
    assert all(p["stop_token_ids"] == [engine.formatter.eos_id] for p in base[1])
    assert base[0][0]["prompt_token_ids"] == engine.formatter.prompt_ids("unknown")
    assert [r.answered_by for r in engine.route(queries)] == [a.route.answered_by for a in answers]


def test_a_multi_token_indicator_claims_only_after_its_greedy_prefix(tmp_path):
    ens, base = write_ensemble(tmp_path, ["e1", "e2"], kind="nonsemantic")
    llm = FakeLLM()
    engine = VllmEngine(ens, base, llm=llm, logprob_token_ids=True)
    prefix = list(engine.indicators.shared_prefix)
    assert len(prefix) == 2, "«pos»/«neg» share the two UTF-8 bytes of «"
    llm.setup(engine, {"for e1": "e1", "drifts": "off-prefix"})
    answers = engine.ask(["for e1", "drifts"], 4)
    first = llm.calls[0]
    prompts = [engine.formatter.prompt_ids(q) for q in ("for e1", "drifts")]
    assert [p["prompt_token_ids"] for p in first[0]] == [prompts[0] + prefix, prompts[1] + prefix, *prompts]
    assert [p["max_tokens"] for p in first[1]] == [1, 1, 2, 2], "one generate call: checks, then prefixes"
    assert [(a.route.answered_by, a.route.reason) for a in answers] == [("e1", "claimed"), (BASE, "exception")]
    assert [c.verdict for c in answers[1].route.checks] == ["neither"], "the decision token alone is not enough"
    e1_answer = next(c for c in llm.calls if c[2] and "stop_token_ids" in c[1][0])
    assert e1_answer[0][0]["prompt_token_ids"] == prompts[0] + list(engine.indicators.pos_ids)


def test_lora_settings_cover_every_expert(tmp_path):
    ens, _ = write_ensemble(tmp_path, ["a", "b"], ranks={"b": 12})
    settings = lora_settings([ens / "experts" / "a", ens / "experts" / "b"])
    assert settings.targets == ["q_proj", "v_proj"] and settings.max_rank == 12
    assert settings.llm_kwargs() == {"enable_lora": True, "max_lora_rank": 16, "max_loras": 2, "max_cpu_loras": 2}


def test_hand_written_token_rows_are_refused(tmp_path):
    ens, base = write_ensemble(tmp_path, ["plain", "rowed"], rows=["rowed"])
    check_servable("plain", ens / "experts" / "plain")
    assert token_row_tensors(ens / "experts" / "rowed") == [
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    ]
    with pytest.raises(SeeclError, match=r"expert 'rowed'.*adapter.train_indicator_rows=false"):
        VllmEngine(ens, base, llm=FakeLLM(), logprob_token_ids=True)


# -- a real tiny ensemble: what seecl writes ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory):
    from conftest import TINY
    from seecl.config import load_config
    from seecl.see.ensemble import SeeEnsemble

    ens = SeeEnsemble(
        tmp_path_factory.mktemp("vllm") / "ens",
        load_config(overrides=TINY + ["train.epochs=1", "adapter.train_indicator_rows=false"]),
    )
    ens.learn(make_task("add", "train", 8))
    ens.config.adapter.train_indicator_rows = True
    ens.learn(make_task("uppercase", "train", 8))
    return ens


def test_experts_trained_with_indicator_rows_are_refused(tiny_ensemble, tmp_path):
    store = tiny_ensemble.store
    check_servable("add", store.expert_dir("add"))
    assert any("trainable_tokens" in n for n in token_row_tensors(store.expert_dir("uppercase")))
    base = export_base(store.root, tmp_path / "base")
    with pytest.raises(SeeclError, match=r"expert 'uppercase'.*train_indicator_rows=false"):
        VllmEngine(store.root, base, llm=FakeLLM(), logprob_token_ids=True)


def test_exported_base_loads_with_transformers_and_equals_the_resized_base(tiny_ensemble, tiny_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = tiny_ensemble.store.manifest()
    out = export_base(tiny_ensemble.store.root, tmp_path / "base")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids("<<pos>>") == manifest["indicators"]["pos_ids"][0]
    assert tokenizer.encode("<<neg>>", add_special_tokens=False) == manifest["indicators"]["neg_ids"]
    assert len(tokenizer) == manifest["vocab_size"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tiny_base.tokenizer.encode("<<pos>> hi <<neg>>", add_special_tokens=False)])
    with torch.no_grad():
        assert model(ids).logits.equal(tiny_base.model(ids).logits)
    with pytest.raises(SeeclError, match="already exists"):
        export_base(tiny_ensemble.store.root, out)
