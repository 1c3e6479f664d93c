"""Serve a SEE ensemble with vLLM (optional extra `seecl[vllm]`): same routes and answers as the PEFT path.

Owns the vLLM side of serving: exporting the resized base once as a plain HF directory
(`export_base`), refusing experts vLLM cannot serve faithfully (`check_servable`), the LoRA settings
for `vllm.LLM` (`lora_settings`), the request construction (pure functions returning `Request`s,
testable without vLLM) and `VllmEngine`, which walks the experts newest first like
`routing.SequentialRouter`. Does not own the routing rule (`routing.walk`; the verdict mirrors
`routing.decide`), prompts (`PromptFormatter`), training or the ensemble format (`store.py`).

vLLM API facts relied on (read in vLLM's source as of 2026: vllm/sampling_params.py,
vllm/config/lora.py, vllm/v1/core/sched/utils.py; the extra admits vllm>=0.8, so the one newer
feature, `logprob_token_ids`, is detected at run time):

- `LLM.generate(prompts, sampling_params=[...], lora_request=[...] | None, use_tqdm=False)` takes
  one SamplingParams and one LoRARequest per prompt and returns outputs in input order; a prompt
  given as `{"prompt_token_ids": [...]}` (a `TokensPrompt`) is used as is, never re-tokenized.
- `SamplingParams.logprob_token_ids` (added with the generative-scoring endpoint, vllm PR #34539,
  2026) returns the logprobs of exactly those ids plus the sampled token, whatever their rank,
  without a full-vocabulary top-k. Logprobs are computed from the raw logits (default
  `logprobs_mode="raw_logprobs"`), i.e. the full-vocabulary log-softmax `routing.decide` reads.
  Older vLLM only has `logprobs=k` (top-k, capped by `LLM(max_logprobs=...)`, default 20): then an
  indicator outside the top k gets probability 0.0 in the Check (its true value is below the
  smallest returned one). The greedy verdict stays exact either way (the sampled token at
  temperature 0 is the argmax); only the recorded p_pos/p_neg and a `threshold` decision can
  differ from the PEFT path, and only when an indicator falls outside the top k.
- A multi-token indicator (`«pos»`/`«neg»` share a prefix) is checked as `decide` does: the request
  appends the shared prefix and asks for one token; a second request in the same `generate` call
  decodes len(prefix) tokens greedily from the bare prompt, and the prefix counts as produced iff
  they equal it (sequential argmax = argmax at every forced position). With prefix caching the
  two requests, and a claimed query's answer request, can share the prompt's KV blocks.
- `stop_token_ids=[eos]` with `ignore_eos=True` stops at the chat end-of-turn token only, as
  `generation.greedy_generate` does (otherwise vLLM also stops at generation_config's eos ids).
- `LLM(enable_lora=True, max_lora_rank=r, max_loras=n, max_cpu_loras=m)`; `max_lora_rank` must be
  one of 1, 8, 16, 32, 64, 128, 256, 320, 512 (`vllm.config.lora.MaxLoRARanks`).
- vLLM serves LoRA A/B matrices only: per-adapter extra vocabulary is deprecated (removed after
  v0.12) and PEFT trainable-token rows / modules_to_save are rejected or not applied. Hence the
  resized base is exported once, and experts carrying their own indicator rows are refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seecl.data.prompts import PromptFormatter
from seecl.errors import SeeclError
from seecl.model.indicators import Indicators
from seecl.see.store import EnsembleStore
from seecl.serving.routing import BASE, Answer, Check, Route, budgets_for, indicator_verdict, walk

INSTALL_HINT = "pip install seecl[vllm]"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_TOP_K = 20  # vLLM's default max_logprobs: the fallback without logprob_token_ids
SERVABLE_HINT = (
    "train vLLM-servable experts with adapter.train_indicator_rows=false (or build the "
    "ensemble with model.indicator=nonsemantic|semantic)"
)

LoraTuple = tuple[str, int, str]  # LoRARequest(lora_name, lora_int_id, lora_path)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def require_vllm():
    try:
        import vllm
    except ImportError:
        raise SeeclError(f"the vLLM backend needs vLLM, which is not installed: {INSTALL_HINT}") from None
    return vllm


def supports_logprob_token_ids() -> bool:
    from vllm import SamplingParams

    return "logprob_token_ids" in getattr(SamplingParams, "__struct_fields__", ())


# -- experts and LoRA settings ----------------------------------------------------------------------
def lora_table(ensemble_dir: str | Path, experts: Sequence[str]) -> dict[str, LoraTuple]:
    """One LoRARequest tuple per expert; ids 1..M follow the manifest order (oldest first)."""
    store = EnsembleStore(ensemble_dir)
    return {name: (name, i, str(store.expert_dir(name).resolve())) for i, name in enumerate(experts, 1)}


def _adapter_config(directory: Path) -> dict[str, Any]:
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise SeeclError(f"{directory}: adapter_config.json missing")
    return json.loads(path.read_text(encoding="utf-8"))


def token_row_tensors(directory: str | Path) -> list[str]:
    """Names of tensors in adapter_model.safetensors that vLLM would not apply (anything not LoRA A/B)."""
    from safetensors import safe_open

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        raise SeeclError(f"{directory}: adapter_model.safetensors missing (pickled adapters are not served)")
    with safe_open(str(path), framework="pt") as handle:  # reads the header only, never pickle
        names = list(handle.keys())
    return [n for n in names if not (n.endswith(".lora_A.weight") or n.endswith(".lora_B.weight"))]


def check_servable(name: str, directory: str | Path) -> None:
    """Raise if vLLM would serve expert `name` differently from PEFT (its routing would change)."""
    directory = Path(directory)
    config = _adapter_config(directory)
    extra = token_row_tensors(directory)
    if config.get("trainable_token_indices"):
        extra.append("trainable_token_indices in adapter_config.json")
    if config.get("modules_to_save"):
        extra.append(f"modules_to_save={config['modules_to_save']}")
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        raise SeeclError(
            f"expert {name!r} cannot be served with vLLM: its adapter carries per-adapter "
            f"token rows or embedding weights ({shown}) that vLLM ignores, so its routing "
            f"would silently change; {SERVABLE_HINT}"
        )
    if config.get("alora_invocation_tokens"):
        # vLLM would apply an activated LoRA to the whole prompt: different outputs than PEFT.
        raise SeeclError(
            f"expert {name!r} is an activated LoRA (adapter.kind=alora), which this backend "
            "does not serve; use the PEFT engine or train it with adapter.kind=lora"
        )


@dataclass(frozen=True)
class LoraSettings:
    """What `vllm.LLM` must know about the experts' adapters."""

    targets: list[str]
    max_rank: int
    n_experts: int
    max_loras_cap: int = 8

    @property
    def vllm_rank(self) -> int:
        for rank in VLLM_LORA_RANKS:
            if rank >= self.max_rank:
                return rank
        raise SeeclError(f"LoRA rank {self.max_rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")

    def llm_kwargs(self) -> dict[str, Any]:
        # Every generate call uses one expert, so one GPU slot suffices; more slots and a CPU cache
        # of all experts avoid reloading adapters from disk at every switch.
        slots = max(1, min(self.n_experts, self.max_loras_cap))
        return {
            "enable_lora": True,
            "max_lora_rank": self.vllm_rank,
            "max_loras": slots,
            "max_cpu_loras": max(slots, self.n_experts),
        }


def lora_settings(expert_dirs: Sequence[str | Path]) -> LoraSettings:
    """Union of target modules and the largest rank (incl. rank_pattern) over the experts."""
    targets: list[str] = []
    max_rank = 1
    for directory in expert_dirs:
        config = _adapter_config(Path(directory))
        modules = config.get("target_modules") or []
        for module in [modules] if isinstance(modules, str) else modules:
            if module not in targets:
                targets.append(module)
        max_rank = max([max_rank, int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
    return LoraSettings(targets, max_rank, len(expert_dirs))


# -- the exported base --------------------------------------------------------------------------------
def export_base(ensemble_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the ensemble's resized base (indicator tokens in the shared vocabulary) + tokenizer.

    The result is a plain HF directory (safetensors) that vLLM loads as the model; written once
    per ensemble, atomically (staging directory + rename). `dtype` float32 keeps the base bit-exact;
    bfloat16 halves it for large models.
    """
    from seecl.config import ModelConfig
    from seecl.model.base import load_base

    store = EnsembleStore(ensemble_dir)
    manifest = store.manifest()
    out = Path(out_dir).expanduser()
    if out.exists():
        raise SeeclError(f"{out} already exists; export the base into a new directory")
    base = load_base(ModelConfig(**{**manifest["model"], "device": "cpu", "dtype": dtype}))
    if base.indicators.to_dict() != manifest["indicators"] or len(base.tokenizer) != manifest["vocab_size"]:
        raise SeeclError(
            f"the base model {manifest['model']['name']!r} no longer resizes to the vocabulary "
            f"of {store.root} (indicators or vocabulary size differ)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex}")
    try:
        base.model.save_pretrained(staging)  # transformers 5 writes safetensors only
        base.tokenizer.save_pretrained(staging)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def check_base(base_dir: str | Path, tokenizer, manifest: dict[str, Any]) -> None:
    """The exported base must tokenize the indicators to the ids the experts were trained with."""
    ind = manifest["indicators"]
    for text, ids in ((ind["pos"], ind["pos_ids"]), (ind["neg"], ind["neg_ids"])):
        if tokenizer.encode(text, add_special_tokens=False) != list(ids):
            raise SeeclError(f"{base_dir}: tokenizer does not map {text!r} to {ids}; run export_base for this ensemble")
    config = Path(base_dir) / "config.json"
    if config.is_file():
        vocab = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
        if vocab is not None and vocab < manifest["vocab_size"]:
            raise SeeclError(
                f"{base_dir}: vocabulary of {vocab} rows, the ensemble needs "
                f"{manifest['vocab_size']}; run export_base for this ensemble"
            )


# -- requests (pure) --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One vLLM request: prompt ids, SamplingParams keyword arguments, LoRARequest tuple or None (base)."""

    prompt_token_ids: list[int]
    params: dict[str, Any]
    lora: LoraTuple | None = None
    kind: str = field(default="generate", compare=False)  # "check" | "prefix" | "generate"


def check_params(indicators: Indicators, specific_ids: bool, top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
    """One greedy token at the decision position, with the logprobs of both indicator ids."""
    params: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0, "detokenize": False}
    if specific_ids:
        params["logprob_token_ids"] = [indicators.pos_id, indicators.neg_id]
    else:
        params["logprobs"] = top_k
    return params


def check_requests(
    prompts: Sequence[Sequence[int]],
    indicators: Indicators,
    lora: LoraTuple,
    specific_ids: bool,
    top_k: int = DEFAULT_TOP_K,
) -> list[Request]:
    """n decision requests (prompt + shared prefix); with a shared prefix, then n prefix requests."""
    prefix = list(indicators.shared_prefix)
    params = check_params(indicators, specific_ids, top_k)
    requests = [Request([*p, *prefix], params, lora, "check") for p in prompts]
    if prefix:
        greedy = {"max_tokens": len(prefix), "temperature": 0.0, "ignore_eos": True, "detokenize": False}
        requests += [Request(list(p), greedy, lora, "prefix") for p in prompts]
    return requests


def generation_params(budget: int, eos_id: int) -> dict[str, Any]:
    return {
        "max_tokens": budget,
        "temperature": 0.0,
        "stop_token_ids": [eos_id],
        "ignore_eos": True,
        "detokenize": False,
    }


def answer_requests(
    prompts: Sequence[Sequence[int]],
    budgets: Sequence[int],
    eos_id: int,
    indicator_ids: Sequence[int] = (),
    lora: LoraTuple | None = None,
) -> list[Request]:
    """Greedy answers; an expert continues after its `<<pos>>` tokens, the base from the bare prompt."""
    return [Request([*p, *indicator_ids], generation_params(b, eos_id), lora) for p, b in zip(prompts, budgets)]


def verdict(
    expert: str,
    sampled: int,
    logprobs: dict[int, float],
    indicators: Indicators,
    prefix_tokens: Sequence[int] | None = None,
    threshold: float | None = None,
) -> Check:
    """`routing.decide` on what vLLM returns: the greedy token, indicator logprobs, greedy prefix."""
    p_pos = math.exp(logprobs[indicators.pos_id]) if indicators.pos_id in logprobs else 0.0
    p_neg = math.exp(logprobs[indicators.neg_id]) if indicators.neg_id in logprobs else 0.0
    produced = not indicators.shared_prefix or list(prefix_tokens or ()) == list(indicators.shared_prefix)
    return Check(expert, indicator_verdict(sampled, p_pos, p_neg, indicators, threshold, produced), p_pos, p_neg)


def _first_token(output) -> tuple[int, dict[int, float]]:
    completion = output.outputs[0]
    steps = completion.logprobs or [{}]
    return int(completion.token_ids[0]), {int(t): float(lp.logprob) for t, lp in steps[0].items()}


def _tokens(output) -> list[int]:
    return [int(t) for t in output.outputs[0].token_ids]


# -- the engine ------------------------------------------------------------------------------------------
class VllmEngine:
    """SEE routing and greedy answers on vLLM: the interface of `RoutingEngine` / `SequentialRouter`.

    `base_dir` is the output of `export_base`. Pass `llm` to reuse an existing `vllm.LLM` (or a
    stand-in with the same `generate`); otherwise one is built with the experts' LoRA settings,
    prefix caching and `llm_kwargs`. Without vLLM installed, an injected `llm` receives plain
    dicts and tuples instead of SamplingParams / LoRARequest objects.
    """

    def __init__(
        self,
        ensemble_dir: str | Path,
        base_dir: str | Path,
        *,
        threshold: float | None = None,
        llm=None,
        logprob_token_ids: bool | None = None,
        top_k: int = DEFAULT_TOP_K,
        **llm_kwargs: Any,
    ):
        vllm = require_vllm() if llm is None or vllm_available() else None
        from transformers import AutoTokenizer

        store = EnsembleStore(ensemble_dir)
        manifest = store.manifest()
        self._experts = store.expert_names()
        for name in self._experts:
            check_servable(name, store.expert_dir(name))
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        check_base(base_dir, tokenizer, manifest)
        ind = manifest["indicators"]
        self.indicators = Indicators(ind["kind"], ind["pos"], ind["neg"], tuple(ind["pos_ids"]), tuple(ind["neg_ids"]))
        self.formatter = PromptFormatter(tokenizer, self.indicators, manifest["model"].get("system_prompt"))
        self.threshold, self.top_k = threshold, top_k
        self.loras = lora_table(store.root, self._experts)
        if logprob_token_ids is None:
            logprob_token_ids = supports_logprob_token_ids() if vllm is not None else True
        self.specific_ids = logprob_token_ids
        self._vllm = vllm
        self._lora_objects: dict[LoraTuple, Any] = {}
        if llm is None:
            settings = lora_settings([store.expert_dir(n) for n in self._experts]).llm_kwargs() if self._experts else {}
            kwargs = {**settings, "enable_prefix_caching": True, **llm_kwargs}
            if not self.specific_ids:
                kwargs.setdefault("max_logprobs", top_k)
            llm = vllm.LLM(model=str(base_dir), tokenizer=str(base_dir), **kwargs)
        self.llm = llm

    def experts(self) -> list[str]:
        return list(self._experts)

    def _lora(self, lora: LoraTuple | None):
        if lora is None or self._vllm is None:
            return lora
        if lora not in self._lora_objects:  # one object per adapter: vLLM keys its caches by int id
            from vllm.lora.request import LoRARequest

            self._lora_objects[lora] = LoRARequest(*lora)
        return self._lora_objects[lora]

    def _generate(self, requests: list[Request]) -> list:
        if not requests:
            return []
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        params = [self._vllm.SamplingParams(**r.params) if self._vllm else dict(r.params) for r in requests]
        loras = [self._lora(r.lora) for r in requests]
        outputs = self.llm.generate(
            prompts,
            sampling_params=params,
            lora_request=None if all(x is None for x in loras) else loras,
            use_tqdm=False,
        )
        return list(outputs)

    def _check(self, expert: str, prompts: list[list[int]]) -> list[Check]:
        outputs = self._generate(
            check_requests(prompts, self.indicators, self.loras[expert], self.specific_ids, self.top_k)
        )
        n = len(prompts)
        prefixes = [_tokens(o) for o in outputs[n:]] if self.indicators.shared_prefix else [None] * n
        return [
            verdict(expert, *_first_token(o), self.indicators, prefix, self.threshold)
            for o, prefix in zip(outputs[:n], prefixes)
        ]

    def run(self, queries: Sequence[str], budgets: Sequence[int]) -> tuple[list[str], list[Route]]:
        """Texts and routes; a budget of 0 only routes the query (no answer is generated)."""
        prompts = [self.formatter.prompt_ids(q) for q in queries]
        routes = walk(len(prompts), self._experts, lambda expert, idx: self._check(expert, [prompts[i] for i in idx]))
        texts = [""] * len(prompts)
        for responder in [*self._experts, BASE]:
            members = [i for i, r in enumerate(routes) if r.answered_by == responder and budgets[i] > 0]
            if not members:
                continue
            expert = responder != BASE
            requests = answer_requests(
                [prompts[i] for i in members],
                [budgets[i] for i in members],
                self.formatter.eos_id,
                self.indicators.pos_ids if expert else (),
                self.loras[responder] if expert else None,
            )
            for index, output in zip(members, self._generate(requests)):
                texts[index] = self.formatter.decode(_tokens(output))
        return texts, routes

    def route(self, queries: Sequence[str]) -> list[Route]:
        return self.run(list(queries), [0] * len(queries))[1]

    def ask(self, queries: Sequence[str], max_new_tokens: int | Sequence[int] = 64) -> list[Answer]:
        """Answer a batch of queries; every answer carries its route."""
        budgets = budgets_for(len(queries), max_new_tokens)
        texts, routes = self.run(list(queries), budgets)
        return [Answer(q, t, r) for q, t, r in zip(queries, texts, routes)]
