"""The vLLM backend without vLLM: request construction, the walk over a fake `LLM`, refusal of
experts with their own token rows, and the exported base (tiny model, no network). The same engine
on a real vLLM is tested under `make test-vllm` (tests/real_vllm/)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from seecl.data.synthetic import make_task
from seecl.errors import SeeclError
from seecl.model.indicators import Indicators
from seecl.see.store import FORMAT
from seecl.serving.routing import BASE, Sampling, decide
from seecl.serving.vllm_engine import VllmEngine
from seecl.serving.vllm_export import export_base
from seecl.serving.vllm_llm import (
    INSTALL_HINT,
    check_servable,
    llm_kwargs,
    lora_settings,
    lora_table,
    token_row_tensors,
    vllm_available,
)
from seecl.serving.vllm_requests import (
    answer_params,
    answer_requests,
    check_params,
    check_requests,
    cut_at_stop,
    generation_params,
    prefix_requests,
    verdict,
)

ADDED = Indicators("added", "<<pos>>", "<<neg>>", (300,), (301,))
# «pos»/«neg» style: two shared tokens, then the decision token
MULTI = Indicators("nonsemantic", "«pos»", "«neg»", (3, 4, 5), (3, 4, 6))
LORA = ("e1", 1, "/ens/experts/e1")


# -- a hand-written ensemble: manifest, LoRA-only adapters, exported tokenizer ----------------------------
def write_adapter(directory, r=8, rows=False, saved_modules=False):
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    prefix = "base_model.model.model.layers.0.self_attn"
    tensors = {f"{prefix}.{m}.lora_A.weight": torch.zeros(r, 64) for m in ("q_proj", "v_proj")}
    tensors.update({f"{prefix}.{m}.lora_B.weight": torch.zeros(64, r) for m in ("q_proj", "v_proj")})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    if rows:
        tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = torch.zeros(2, 64)
        config["trainable_token_indices"] = [258, 259]
    if saved_modules:  # a whole module trained and saved beside the LoRA matrices
        tensors["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(260, 64)
        config["modules_to_save"] = ["lm_head"]
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config))


def write_ensemble(root, names, rows=(), ranks=None, kind="added", saved_modules=()):
    from seecl.model.indicators import INDICATOR_STRINGS
    from seecl.model.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    texts = INDICATOR_STRINGS[kind]
    if kind == "added":
        tokenizer.add_tokens(list(texts), special_tokens=True)
    tokenizer.save_pretrained(root / "base")
    (root / "base" / "config.json").write_text(json.dumps({"vocab_size": len(tokenizer)}))
    pos, neg = (tokenizer.encode(t, add_special_tokens=False) for t in texts)
    for name in names:
        write_adapter(root / "ens" / "experts" / name, (ranks or {}).get(name, 8), name in rows, name in saved_modules)
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


def output(tokens, logprobs=None, max_tokens=None):
    steps = [{t: SimpleNamespace(logprob=v) for t, v in logprobs.items()}] if logprobs is not None else None
    reason = "length" if max_tokens is not None and len(tokens) >= max_tokens else "stop"
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(tokens), logprobs=steps, finish_reason=reason)])


class FakeLLM:
    """Answers like `vllm.LLM.generate`: each query's prompt has an owner expert (or none). A check
    that may go on past its first token (a combined check) answers after `<<pos>>` as an answer
    request would; `blocked_at` puts a masked token into such an answer at that position."""

    def __init__(self):
        self.calls = []
        self.owners = {}  # prompt ids -> owning expert, "nobody", "confused" or "off-prefix"
        self.blocked_at = None

    def setup(self, engine, owners):
        self.engine = engine
        self.owners = {tuple(engine.formatter.prompt_ids(q)): o for q, o in owners.items()}

    def owner(self, ids):
        return next(o for key, o in self.owners.items() if tuple(ids[: len(key)]) == key)

    def answer(self, name, params, head=()):
        fmt = self.engine.formatter
        tokens = fmt.text_ids(name)[len(head) :]
        if self.blocked_at is not None and "bad_words" not in params:
            tokens = tokens[: self.blocked_at] + [self.engine.indicators.pos_id] + tokens[self.blocked_at :]
        return (tokens + [fmt.eos_id])[: params["max_tokens"]]

    def generate(self, prompts, sampling_params, lora_request=None, use_tqdm=True):
        self.calls.append((prompts, sampling_params, lora_request))
        ind = self.engine.indicators
        results = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            ids, name = prompt["prompt_token_ids"], lora_request[i][0] if lora_request and lora_request[i] else BASE
            limit = params["max_tokens"]
            if "stop_token_ids" not in params and "max_tokens" in params and params.get("ignore_eos"):
                # the greedy shared-prefix request
                prefix = list(ind.shared_prefix) if self.owner(ids) != "off-prefix" else [65, 66]
                results.append(output(prefix[:limit]))
            elif "logprob_token_ids" in params or "logprobs" in params:
                owner = self.owner(ids)
                if owner in (name, "off-prefix"):
                    answer = self.answer(name, {**params, "max_tokens": limit - 1}) if limit > 1 else []
                    tokens = [ind.pos_id, *answer]
                    results.append(output(tokens, {ind.pos_id: math.log(0.9), ind.neg_id: math.log(0.05)}, limit))
                elif owner == "confused":
                    results.append(output([65], {65: math.log(0.5), ind.neg_id: math.log(0.2)}))
                else:
                    results.append(output([ind.neg_id], {ind.pos_id: math.log(0.1), ind.neg_id: math.log(0.8)}))
            else:
                pos = list(ind.pos_ids)
                at = next((k for k in range(len(ids)) if ids[k : k + len(pos)] == pos), len(ids))
                head = ids[at + len(pos) :] if name != BASE else []
                results.append(output(self.answer(name, params, head), max_tokens=limit))
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
    with pytest.raises(SeeclError, match=r"not installed: pip install 'seecl\[vllm\]'.*make vllm-venv") as error:
        VllmEngine(tmp_path / "ens", tmp_path / "base")
    assert "\n" not in str(error.value) and INSTALL_HINT in str(error.value)


# -- request construction ----------------------------------------------------------------------------------
def test_one_lora_request_per_adapter_file_with_stable_ids_and_paths(tmp_path):
    ens, _ = write_ensemble(tmp_path / "one", ["a", "b", "c", "d"])
    table = lora_table(ens, ["a", "b", "c"])
    assert [v[0] for v in table.values()] == ["a", "b", "c"]
    assert len({v[1] for v in table.values()}) == 3
    assert table["b"][2] == str((ens / "experts" / "b").resolve())
    assert lora_table(ens, ["a", "b", "c", "d"])["c"] == table["c"], "adding an expert keeps the ids"
    other, _ = write_ensemble(tmp_path / "two", ["a"])
    assert lora_table(other, ["a"])["a"][1] != table["a"][1], "vLLM caches by id: one id per adapter file"


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
    checks = check_requests([[1, 2], [7]], MULTI, LORA, True)
    assert [r.prompt_token_ids for r in checks] == [[1, 2, 3, 4], [7, 3, 4]]
    assert checks[0].params["logprob_token_ids"] == [5, 6] and checks[0].params["max_tokens"] == 1
    prefixes = prefix_requests([[1, 2], [7]], MULTI, LORA)
    assert [r.prompt_token_ids for r in prefixes] == [[1, 2], [7]]
    assert all(r.params["max_tokens"] == 2 and r.params["temperature"] == 0.0 and r.lora == LORA for r in prefixes)


def test_generation_stops_at_eos_with_a_budget_per_query():
    params = generation_params(9, eos_id=2)
    assert params["stop_token_ids"] == [2] and params["ignore_eos"] and params["max_tokens"] == 9
    assert params["temperature"] == 0.0 and "bad_words" not in params and "seed" not in params
    expert = answer_requests([[1], [4, 5]], [3, 7], 2, ADDED.pos_ids, LORA, ["<<pos>>", "<<neg>>"])
    assert [r.prompt_token_ids for r in expert] == [[1, 300], [4, 5, 300]]
    assert [r.params["max_tokens"] for r in expert] == [3, 7] and all(r.lora == LORA for r in expert)
    assert all(r.params["bad_words"] == ["<<pos>>", "<<neg>>"] for r in expert), "answers never hold indicators"
    base = answer_requests([[1]], [4], 2)
    assert base[0].prompt_token_ids == [1] and base[0].lora is None


def test_a_sampling_maps_onto_sampling_params_and_routing_stays_greedy():
    sampled = answer_params(Sampling(max_tokens=5, temperature=0.7, top_p=0.9, seed=3, stop=("\n\n",)), 2)
    assert sampled == {
        "max_tokens": 5,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 3,
        "stop": ["\n\n"],
        "stop_token_ids": [2],
        "ignore_eos": True,
        "detokenize": True,
    }
    assert answer_params(Sampling(max_tokens=5, temperature=0.0, top_p=0.5), 2)["temperature"] == 0.0
    with pytest.raises(ValueError, match="logprobs"):
        answer_params(Sampling(logprobs=2), 2)
    assert cut_at_stop("a, b. c. d", [". ", "x"]) == "a, b" and cut_at_stop("abc", ["z"]) == "abc"
    # found before the answer's trailing whitespace is dropped, as the PEFT engine finds it
    assert cut_at_stop("LE ", ["E "]) == "L" and cut_at_stop("  LE LET ", ["E "]) == "L"
    assert cut_at_stop(" ab \n", []) == "ab"


def test_llm_kwargs_from_the_config():
    from seecl.config import VllmConfig

    lora = {"enable_lora": True, "max_lora_rank": 8}
    cpu = llm_kwargs(VllmConfig(), lora, cpu=True)
    assert cpu == {
        **lora,
        "enable_prefix_caching": True,
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.25,
        "enforce_eager": True,
        "block_size": 32,
    }
    gpu = llm_kwargs(VllmConfig(tensor_parallel_size=2, dtype="bfloat16", llm_args={"swap_space": 0}), lora, cpu=False)
    assert gpu == {
        **lora,
        "enable_prefix_caching": True,
        "tensor_parallel_size": 2,
        "dtype": "bfloat16",
        "swap_space": 0,
    }
    small = llm_kwargs(VllmConfig(max_model_len=512, kv_cache_memory_bytes=1 << 26, enforce_eager=False), lora, True)
    assert small["max_model_len"] == 512 and small["kv_cache_memory_bytes"] == 1 << 26
    assert small["enforce_eager"] is False


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
    ind, eos = engine.indicators, engine.formatter.eos_id
    assert engine.experts() == ["e1", "e2", "e3"]
    queries = ["for e3", "for e1", "unknown", "odd", "for e1"]
    answers = engine.ask(queries, [5, 6, 7, 8, 0])
    checks = [c for c in llm.calls if "logprob_token_ids" in c[1][0]]
    assert [c[2][0] for c in checks] == [engine.loras[e] for e in ("e3", "e2", "e1")]
    assert [len(c[0]) for c in checks] == [5, 3, 3], "claimed and undecided queries leave the walk"
    assert all(p["logprob_token_ids"] == [ind.pos_id, ind.neg_id] for c in checks for p in c[1])
    # A greedy answer's check goes on into the answer: a claimant's check is its answer's prompt
    # pass; a check that only routes asks for one token.
    first = checks[0][1]
    assert [p["max_tokens"] for p in first] == [6, 7, 8, 9, 1]
    assert all(p["stop_token_ids"] == [eos, ind.neg_id] and p["temperature"] == 0.0 for p in first[:4])
    assert "stop_token_ids" not in first[4]
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
    assert [a.token_ids for a in answers[:2]] == [engine.formatter.text_ids("e3"), engine.formatter.text_ids("e1")]
    assert [a.finish_reason for a in answers] == ["stop"] * 5
    [base] = llm.calls[len(checks) :]  # the claimants answered in their checks; the base alone after them
    prompts, params, loras = base
    assert loras is None, "never base and LoRA requests in the engine together"
    assert [p["prompt_token_ids"] for p in prompts] == [engine.formatter.prompt_ids(q) for q in ("odd", "unknown")]
    assert [p["max_tokens"] for p in params] == [8, 7], "in the order their walks ended"
    assert all(p["stop_token_ids"] == [eos] and p["temperature"] == 0.0 for p in params)
    assert all(p["bad_words"] == ["<<pos>>", "<<neg>>"] for p in params), "answers never hold indicators"
    assert [r.answered_by for r in engine.route(queries)] == [a.route.answered_by for a in answers]


def test_a_combined_check_is_the_masked_answer_cut_before_a_blocked_token_and_continued(fake):
    engine, llm = fake
    llm.blocked_at = 1  # the unmasked answer would hold <<pos>> after its first token
    [answer] = engine.ask(["for e3"], 9)
    text_ids = engine.formatter.text_ids("e3")
    assert answer.token_ids == text_ids and answer.text == "e3"
    check, continued = llm.calls
    assert continued[0][0]["prompt_token_ids"] == [
        *engine.formatter.prompt_ids("for e3"),
        *engine.indicators.pos_ids,
        *text_ids[:1],
    ], "goes on after the part that equals the masked answer, with the mask"
    assert continued[1][0]["max_tokens"] == 8 and continued[1][0]["bad_words"] == ["<<pos>>", "<<neg>>"]


def test_a_combined_check_answer_that_fills_its_budget_ends_by_length(fake):
    engine, llm = fake
    [answer] = engine.ask(["for e3"], 1)
    assert answer.token_ids == engine.formatter.text_ids("e3")[:1] and answer.finish_reason == "length"
    assert len(llm.calls) == 1


def test_a_claim_by_threshold_alone_gets_an_answer_of_its_own(tmp_path):
    ens, base = write_ensemble(tmp_path, ["e1"])
    llm = FakeLLM()
    engine = VllmEngine(ens, base, llm=llm, logprob_token_ids=True, threshold=0.05)
    llm.setup(engine, {"unknown": "nobody"})
    [answer] = engine.ask(["unknown"], 4)  # <<neg>> first, yet P(pos) / (P(pos) + P(neg)) = 0.11 >= 0.05
    assert (answer.route.answered_by, answer.route.reason) == ("e1", "claimed")
    check, answered = llm.calls
    assert answered[0][0]["prompt_token_ids"][-1] == engine.indicators.pos_id and answered[1][0]["max_tokens"] == 4
    assert answer.text == "e1"


def test_a_multi_token_indicator_claims_only_after_its_greedy_prefix(tmp_path):
    ens, base = write_ensemble(tmp_path, ["e1", "e2"], kind="nonsemantic")
    llm = FakeLLM()
    engine = VllmEngine(ens, base, llm=llm, logprob_token_ids=True)
    prefix = list(engine.indicators.shared_prefix)
    assert len(prefix) == 2, "«pos»/«neg» share the two UTF-8 bytes of «"
    llm.setup(engine, {"for e1": "e1", "drifts": "off-prefix", "odd": "confused"})
    answers = engine.ask(["for e1", "drifts", "odd"], 4)
    checks, prefixes = llm.calls[:2]  # expert e2's
    prompts = [engine.formatter.prompt_ids(q) for q in ("for e1", "drifts", "odd")]
    assert [p["prompt_token_ids"] for p in checks[0]] == [p + prefix for p in prompts]
    assert [p["max_tokens"] for p in checks[1]] == [1, 1, 1]
    assert [p["prompt_token_ids"] for p in prefixes[0]] == prompts[:2], "a second call, where the prompts are cached"
    assert [p["max_tokens"] for p in prefixes[1]] == [2, 2], "'odd' produced no indicator: neither, whatever the prefix"
    routes = [(a.route.answered_by, a.route.reason) for a in answers]
    assert routes == [("e1", "claimed"), (BASE, "exception"), (BASE, "exception")]
    assert [c.verdict for c in answers[1].route.checks] == ["neither"], "the decision token alone is not enough"
    e1_answer = next(c for c in llm.calls if c[2] and "stop_token_ids" in c[1][0])
    assert e1_answer[0][0]["prompt_token_ids"] == prompts[0] + list(engine.indicators.pos_ids)
    assert "bad_words" not in e1_answer[1][0], "in-vocabulary indicators are ordinary text in answers"


def test_lora_settings_cover_every_expert(tmp_path):
    ens, _ = write_ensemble(tmp_path, ["a", "b"], ranks={"b": 12})
    settings = lora_settings([ens / "experts" / "a", ens / "experts" / "b"])
    assert settings.targets == ["q_proj", "v_proj"] and settings.max_rank == 12
    assert settings.llm_kwargs() == {"enable_lora": True, "max_lora_rank": 16, "max_loras": 2, "max_cpu_loras": 2}


def test_weights_beyond_lora_matrices_and_indicator_rows_are_refused_by_name(tmp_path):
    ens, base = write_ensemble(tmp_path, ["plain", "rowed", "saved"], rows=["rowed"], saved_modules=["saved"])
    check_servable("plain", ens / "experts" / "plain")
    check_servable("rowed", ens / "experts" / "rowed")  # indicator rows: rewritten as LoRA
    assert token_row_tensors(ens / "experts" / "rowed") == [
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    ]
    with pytest.raises(SeeclError, match=r"expert 'saved' cannot be served.*modules_to_save.*seecl learn"):
        VllmEngine(ens, base, llm=FakeLLM(), logprob_token_ids=True)


@pytest.mark.parametrize("config_text", ["{not json", "[1, 2]", '{"r": 8}', "\udcff"])
def test_an_unreadable_adapter_config_is_refused_naming_the_file(tmp_path, config_text):
    ens, _ = write_ensemble(tmp_path, ["broken"])
    config = ens / "experts" / "broken" / "adapter_config.json"
    config.write_bytes(config_text.encode("utf-8", "surrogateescape"))
    with pytest.raises(SeeclError, match=r"broken/adapter_config.json: (unreadable|not a PEFT) adapter config"):
        check_servable("broken", config.parent)
    config.unlink()
    with pytest.raises(SeeclError, match=r"broken/adapter_config.json: unreadable adapter config"):
        check_servable("broken", config.parent)


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


def test_experts_trained_with_indicator_rows_are_served_through_their_lora_rewrite(tiny_ensemble, tmp_path):
    store = tiny_ensemble.store
    assert any("trainable_tokens" in n for n in token_row_tensors(store.expert_dir("uppercase")))
    base = export_base(store.root, tmp_path / "base")
    engine = VllmEngine(store.root, base, llm=FakeLLM(), logprob_token_ids=True)
    assert engine.loras["add"][2] == str(store.expert_dir("add").resolve()), "plain LoRA: served as saved"
    rewritten = Path(engine.loras["uppercase"][2])
    assert rewritten == (store.root / "vllm-experts" / "uppercase").resolve()
    assert token_row_tensors(rewritten) == [], "LoRA matrices only"


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


def test_an_expert_published_while_the_engine_runs_is_asked_from_the_next_call(tmp_path):
    ens, base = write_ensemble(tmp_path, ["e1", "e2"])
    llm = FakeLLM()
    engine = VllmEngine(ens, base, llm=llm, logprob_token_ids=True, threshold={"e1": 0.99})
    llm.setup(engine, {"for e3": "e3", "for e1": "e1"})
    assert [a.route.reason for a in engine.ask(["for e3", "for e1"], 2)] == ["all_negative", "all_negative"]
    manifest = json.loads((ens / "manifest.json").read_text())
    write_adapter(ens / "experts" / "e3")
    manifest["experts"].append({"name": "e3", "dir": "experts/e3"})
    (ens / "manifest.json.new").write_text(json.dumps(manifest))
    (ens / "manifest.json.new").replace(ens / "manifest.json")  # as the store publishes it
    assert engine.experts() == ["e1", "e2", "e3"]
    routes = engine.route(["for e3", "for e1"])
    assert [(r.answered_by, r.reason) for r in routes] == [("e3", "claimed"), (BASE, "all_negative")]
    assert [c.expert for c in routes[1].checks] == ["e3", "e2", "e1"], "the newest expert is asked first"

    write_adapter(ens / "experts" / "e4", saved_modules=True)
    manifest["experts"].append({"name": "e4", "dir": "experts/e4"})
    (ens / "manifest.json.new").write_text(json.dumps(manifest))
    (ens / "manifest.json.new").replace(ens / "manifest.json")
    with pytest.raises(SeeclError, match=r"expert 'e4' cannot be served.*modules_to_save"):
        engine.route(["for e3"])


def test_a_base_that_changes_under_a_running_engine_stops_it(tmp_path):
    ens, base = write_ensemble(tmp_path, ["e1"])
    engine = VllmEngine(ens, base, llm=FakeLLM(), logprob_token_ids=True)
    manifest = json.loads((ens / "manifest.json").read_text())
    manifest["indicator_rows"] = {"file": "indicator_rows.safetensors", "digest": "abc", "trained_by": "e1"}
    (ens / "indicator_rows.safetensors").write_bytes(b"rows")
    (ens / "manifest.json.new").write_text(json.dumps(manifest))
    (ens / "manifest.json.new").replace(ens / "manifest.json")
    with pytest.raises(SeeclError, match=r"base of .* changed after this vLLM engine started.*restart"):
        engine.experts()


def test_an_added_expert_above_the_started_rank_is_refused_by_name(tmp_path):
    ens, base = write_ensemble(tmp_path, ["e1", "e2"], ranks={"e2": 32})
    engine = VllmEngine(ens, base, llm=FakeLLM(), logprob_token_ids=True, experts=["e1"])
    assert engine.experts() == ["e1"], "a fixed expert list does not follow the manifest"
    engine.max_rank = 8
    with pytest.raises(SeeclError, match=r"expert 'e2' has LoRA rank 32.*vllm.max_lora_rank=32"):
        engine._register(["e2"])


def test_an_interrupted_export_leaves_nothing_that_looks_complete(tiny_ensemble, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from seecl.serving.vllm_export import ensure_base

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerFast, "save_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            export_base(tiny_ensemble.store.root, tmp_path / "base")
    assert list(tmp_path.iterdir()) == [], "the model was written, but only into a staging directory"
    killed = tmp_path / ".base.staging-999999999-0123abcd"  # what an export killed mid-way leaves
    (killed / "model.safetensors").parent.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    out = ensure_base(tiny_ensemble.store.root, tmp_path / "base")
    assert out == tmp_path / "base" and (out / "seecl-export.json").is_file() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["base"], "the dead writer's staging directory is removed"


def test_the_default_export_follows_the_ensembles_base(tiny_ensemble, tmp_path):
    import shutil

    from seecl.serving.vllm_export import default_base_dir, ensure_base, is_current

    root = tmp_path / "ens"
    shutil.copytree(tiny_ensemble.store.root, root, ignore=shutil.ignore_patterns("vllm-base"))
    out = ensure_base(root)
    assert out == default_base_dir(root) == root / "vllm-base" and is_current(out, root)
    written = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_base(root) == out and (out / "model.safetensors").stat().st_mtime_ns == written, "exported once"
    explicit = ensure_base(root, tmp_path / "elsewhere")
    (root / "indicator_rows.safetensors").write_bytes(b"rows shared by every expert")  # the base changed
    assert not is_current(out, root)
    assert ensure_base(root) == out and is_current(out, root), "the default export is renewed (swapped in)"
    assert [p.name for p in root.iterdir() if p.name.startswith(".vllm-base")] == []
    with pytest.raises(SeeclError, match=r"elsewhere is an export of an earlier state.*remove it"):
        ensure_base(root, explicit)
