"""Serve a SEE ensemble with vLLM: the routes and greedy answers of the PEFT path (docs/vllm.md).

Owns `VllmEngine`, a `RoutingBackend` over a `vllm.LLM` that follows the ensemble's manifest (an
expert added while it runs is asked from the next call on): its experts as LoRA requests, the
tokens answers never hold, and how an answer's tokens become its text. Does not own the requests
(vllm_requests.py), how a batch walks the experts (vllm_walk.py) and reaches vLLM (vllm_loop.py),
the routing rule (`routing.next_in_walk`, `routing.indicator_verdict`), prompts
(`PromptFormatter`), which experts vLLM serves and how the `vllm.LLM` is built (vllm_llm.py), the
exported base (vllm_export.py), training or the ensemble format (see/store.py).
"""

from __future__ import annotations

from collections.abc import Sequence
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
    Query,
    Route,
    Sampling,
    Thresholds,
    as_query,
    check_owners,
    samplings_for,
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
from seecl.serving.vllm_loop import RequestLoop
from seecl.serving.vllm_requests import DEFAULT_TOP_K, Request, cut_at_stop
from seecl.serving.vllm_walk import Walks


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

    def _params(self, params: dict[str, Any], output_kind: str):
        if self._vllm is None:
            return dict(params)
        from vllm.sampling_params import RequestOutputKind

        kind = RequestOutputKind.CUMULATIVE if output_kind == "cumulative" else RequestOutputKind.FINAL_ONLY
        return self._vllm.SamplingParams(**params, output_kind=kind)

    def _loop(self) -> RequestLoop:
        return RequestLoop(self.llm, self._params, self._lora)

    def _generate(self, requests: list[Request]) -> list:
        """The outputs of `requests`, in order, run together."""
        outputs: list = [None] * len(requests)
        loop = self._loop()
        for k, request in enumerate(requests):

            def keep(output, final: bool, k: int = k) -> None:
                outputs[k] = output

            loop.submit(request.prompt_token_ids, request.params, request.lora, keep)
        loop.run()
        return outputs

    def _answers(self, queries: Sequence[str | Query], samplings: Sequence[Sampling]) -> list[Answer]:
        experts = self.experts()
        asked = [as_query(q) for q in queries]
        check_owners(asked, experts)
        answers = [Answer(q, "", Route(BASE, "no_experts")) for q in queries]
        loop = self._loop()
        walks = Walks(self, loop, experts, asked, list(samplings), answers)
        loop.run()
        # The base model's answers run after the experts' requests: vLLM's CPU LoRA ops apply the
        # last loaded adapter to a request without one that shares a batch with LoRA requests.
        walks.answer_base()
        loop.run()
        return answers

    def fill(self, answer: Answer, tokens: list[int], finish_reason: str | None, sampling: Sampling) -> None:
        """`answer`'s text and tokens from its generated ids (up to the end of turn) and how vLLM
        finished it."""
        tokens = [int(t) for t in tokens]
        if self.formatter.eos_id in tokens:
            tokens = tokens[: tokens.index(self.formatter.eos_id)]
        answer.text = cut_at_stop(self.formatter.tokenizer.decode(tokens, skip_special_tokens=True), sampling.stop)
        answer.token_ids = tokens
        answer.finish_reason = "length" if finish_reason == "length" else "stop"

    def route(self, queries: Sequence[str | Query]) -> list[Route]:
        return [a.route for a in self._answers(list(queries), [Sampling(max_tokens=0)] * len(queries))]

    def ask(self, queries: Sequence[str | Query], max_new_tokens: Budget = 64) -> list[Answer]:
        """Answers with their routes; a budget of 0 only routes the query. An int is a greedy budget;
        a `Sampling` maps onto vLLM's temperature/top_p/seed/stop (the routing checks stay greedy)."""
        return self._answers(list(queries), samplings_for(len(queries), max_new_tokens))
