"""The OpenAI API as this server speaks it: request fields in, response and error shapes out.

Owns what a /v1/completions or /v1/chat/completions body may hold and what it means (`parse`): the
queries (a conversation becomes a `Query` routed on its last user turn), who answers (`model`:
the ensemble routes, `<ensemble>/<expert>` or `<ensemble>/base` answers without routing), one
`Sampling` per choice, streaming options. A field this server does not implement gets a 400 that
names it, unless it has its neutral value (e.g. `presence_penalty: 0`, `tools: []`); nothing is
silently ignored but `user` and `metadata`, which never change an answer. Also renders choices,
chunks, logprobs and usage. Does not batch, route or decode (server.py, the engine).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fastapi.responses import JSONResponse

from seecl.config import ServerConfig
from seecl.data.formats import content_text
from seecl.serving.routing import BASE, Answer, Query, Sampling, TokenLogprob


class ApiError(Exception):
    """A client error, answered in OpenAI's error shape."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


_JSON_TYPES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    type(None): "null",
}

COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user"}
COMMON |= {"logprobs", "frequency_penalty", "presence_penalty", "logit_bias"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice"}
CHAT_FIELDS |= {"parallel_tool_calls", "functions", "function_call", "metadata", "store", "service_tier", "modalities"}
# Fields accepted only at a value that changes nothing: (allowed values, why another one is refused).
NEUTRAL: dict[str, tuple[tuple, str]] = {
    "frequency_penalty": ((0, 0.0), "repetition penalties are not implemented"),
    "presence_penalty": ((0, 0.0), "repetition penalties are not implemented"),
    "logit_bias": (({},), "logit biases are not implemented"),
    "echo": ((False,), "echoing the prompt is not implemented"),
    "suffix": (("",), "insertion (suffix) is not implemented"),
    "response_format": (({"type": "text"},), "structured output (json_object, json_schema) is not implemented"),
    "tools": (([],), "tool calling is not implemented"),
    "functions": (([],), "function calling is not implemented"),
    "tool_choice": (("none", "auto"), "tool calling is not implemented"),
    "function_call": (("none", "auto"), "function calling is not implemented"),
    "store": ((False,), "stored completions are not implemented"),
    "service_tier": (("auto", "default"), "service tiers are not implemented"),
    "modalities": ((["text"],), "only text output is implemented"),
}


def get(body: dict, name: str, kinds: tuple[type, ...], default: Any) -> Any:
    """body[name] if it has one of `kinds` (bool is not a number here), `default` if absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        wanted = " or ".join(_JSON_TYPES[k] for k in kinds)
        raise ApiError(
            f"'{name}' must be {wanted}, got {_JSON_TYPES.get(type(value), type(value).__name__)}",
            param=name,
            code="invalid_type",
        )
    return value


def text_field(value: str, where: str) -> str:
    """A client string that a tokenizer can take: valid Unicode (a lone surrogate such as a JSON
    "\\ud800" escape is not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(
            f"{where} holds an unpaired surrogate (\\ud800-\\udfff): not valid Unicode text",
            param=where.split("[")[0].split(".")[0],
            code="invalid_value",
        ) from None
    return value


def check_fields(body: dict, allowed: set[str], endpoint: str, neutral: dict = NEUTRAL) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(
            f"unsupported field(s) {', '.join(repr(u) for u in unknown)} for {endpoint}; this server "
            f"takes {', '.join(sorted(allowed))}",
            param=unknown[0],
            code="unsupported_field",
        )
    for name, (values, why) in neutral.items():
        if name in body and body[name] is not None and body[name] not in values:
            raise ApiError(f"'{name}'={json.dumps(body[name])[:80]} is not supported: {why}", param=name)
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise ApiError("'best_of' is not supported (send n instead)", param="best_of", code="unsupported_value")


@dataclass
class Parsed:
    """A request as this server answers it: one query and one Sampling per choice."""

    chat: bool
    prompts: list[str | Query]  # one per prompt (a chat has one)
    n: int  # choices per prompt: choice i * n + j is copy j of prompt i
    samplings: list[Sampling]  # one per choice
    stream: bool
    include_usage: bool
    model: str  # as the response names it
    prompt_field: str = "prompt"  # the request field the prompts came from, for errors about them

    @property
    def queries(self) -> list[str | Query]:
        return [prompt for prompt in self.prompts for _ in range(self.n)]


def resolve_model(name: str, model_id: str, experts: Sequence[str]) -> str | None:
    """Who answers a request for model `name`: None (routing) or an expert / BASE."""
    if name == model_id:
        return None
    prefix = f"{model_id}/"
    if name.startswith(prefix) and name[len(prefix) :] in (*experts, BASE):
        return name[len(prefix) :]
    known = [model_id, *(prefix + e for e in [*experts, BASE])]
    raise ApiError(
        f"model {name!r} not found; this server serves {', '.join(repr(k) for k in known)}",
        404,
        param="model",
        code="model_not_found",
    )


def _completion_prompts(body: dict, cfg: ServerConfig) -> list[str]:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError("missing required field 'prompt'", param="prompt", code="missing_field")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ApiError(
            "'prompt' must be a string or an array of strings (token-id prompts are not supported)",
            param="prompt",
            code="invalid_type",
        )
    if not 1 <= len(prompts) <= cfg.max_prompts:
        raise ApiError(
            f"'prompt' holds {len(prompts)} prompts; this server takes 1 to {cfg.max_prompts} per request",
            param="prompt",
            code="invalid_value",
        )
    for index, text in enumerate(prompts):
        text_field(text, f"prompt[{index}]")
        if not text.strip():
            raise ApiError(f"prompt {index} is empty", param="prompt", code="invalid_value")
    return prompts


def _message_text(message: dict, where: str, field: str) -> str:
    try:
        text = content_text(message.get("content"))
    except ValueError as exc:
        raise ApiError(f"{where}: content {exc}", param=field, code="unsupported_value") from None
    except TypeError as exc:
        raise ApiError(f"{where}: content {exc}", param=field, code="invalid_type") from None
    return text_field(text, f"{where}.content")


def chat_query(body: dict, field: str = "messages") -> tuple[str, tuple[tuple[str, str], ...]]:
    """The last user turn (what routing reads) and the earlier user and assistant turns of
    `body[field]` (the Responses API's `input` items arrive here as messages).

    System and developer messages are dropped: the ensemble applies the system prompt its experts
    learned with. The conversation must end with a user turn; tool turns are refused.
    """
    messages = body.get(field)
    if messages is None:
        raise ApiError(f"missing required field '{field}'", param=field, code="missing_field")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(f"'{field}' must be a non-empty array of message objects", param=field, code="invalid_type")
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        role, where = message.get("role"), f"{field}[{index}]"
        if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            raise ApiError(
                f"{where}: tool and function turns are not supported (this server has no tool calling)",
                param=field,
                code="unsupported_value",
            )
        if role not in ("system", "developer", "user", "assistant"):
            raise ApiError(f"{where}: unknown message role {role!r}", param=field, code="invalid_value")
        text = _message_text(message, where, field)
        if role in ("user", "assistant"):
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise ApiError(
            "the conversation must end with a user message (system messages are ignored; continuing an "
            "assistant message is not supported)",
            param=field,
            code="invalid_value",
        )
    if not turns[-1][1].strip():
        raise ApiError("the last user message is empty", param=field, code="invalid_value")
    return turns[-1][1], tuple(turns[:-1])


def samplings(
    body: dict, cfg: ServerConfig, chat: bool, n_prompts: int, max_name: str | None = None
) -> tuple[int, list[Sampling]]:
    """`n` and one Sampling per choice; the answer budget is `body[max_name]` (by default
    max_tokens, or a chat's max_completion_tokens)."""
    default = cfg.default_max_tokens or 64
    name = max_name or (
        "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = get(body, name, (int,), default)
    if not 1 <= max_tokens <= cfg.max_tokens:
        raise ApiError(f"'{name}' must be between 1 and {cfg.max_tokens}, got {max_tokens}", param=name)
    temperature = get(body, "temperature", (int, float), 0.0)
    if not 0 <= temperature <= 2:
        raise ApiError(f"'temperature' must be between 0 and 2, got {temperature}", param="temperature")
    top_p = get(body, "top_p", (int, float), 1.0)
    if not 0 < top_p <= 1:
        raise ApiError(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    n = get(body, "n", (int,), 1)
    if not 1 <= n <= cfg.max_n:
        raise ApiError(f"'n' must be between 1 and {cfg.max_n}, got {n}", param="n")
    seed = get(body, "seed", (int,), None)
    if seed is not None and not 0 <= seed < 2**63:
        raise ApiError(f"'seed' must be between 0 and 2**63 - 1, got {seed}", param="seed")
    stop = get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > cfg.max_stop or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(f"'stop' must be a string or up to {cfg.max_stop} non-empty strings", param="stop")
    for index, text in enumerate(stop):
        text_field(text, f"stop[{index}]")
    if chat:
        wanted = get(body, "logprobs", (bool,), False)
        top = get(body, "top_logprobs", (int,), None)
        if top is not None and not wanted:
            raise ApiError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        logprobs, name = ((top or 0) if wanted else None), "top_logprobs"
    else:
        logprobs, name = get(body, "logprobs", (int,), None), "logprobs"
    if logprobs is not None and not 0 <= logprobs <= cfg.max_logprobs:
        raise ApiError(f"'{name}' must be between 0 and {cfg.max_logprobs}, got {logprobs}", param=name)
    # copy j of every prompt samples with seed + j: n different answers, each one reproducible
    seeds = [None if seed is None else seed + j for j in range(n)]
    per_choice = [
        Sampling(max_tokens, float(temperature), float(top_p), seeds[j], tuple(stop), logprobs)
        for _ in range(n_prompts)
        for j in range(n)
    ]
    return n, per_choice


def parse(body: dict, chat: bool, cfg: ServerConfig, model_id: str, experts: Sequence[str]) -> Parsed:
    """Validate a request body; every problem is an ApiError naming the field."""
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS, endpoint)
    model = get(body, "model", (str,), model_id)
    owner = resolve_model(model, model_id, experts)
    if chat:
        text, history = chat_query(body)
        prompts: list[str | Query] = [Query(text, history, owner) if history or owner else text]
    else:
        prompts = [Query(p, (), owner) if owner else p for p in _completion_prompts(body, cfg)]
    n, per_choice = samplings(body, cfg, chat, len(prompts))
    stream = get(body, "stream", (bool,), False)
    options = get(body, "stream_options", (dict,), {})
    if set(options) - {"include_usage"}:
        raise ApiError(f"unsupported stream_options {sorted(set(options) - {'include_usage'})}", param="stream_options")
    if options and not stream:
        raise ApiError("'stream_options' needs 'stream': true", param="stream_options")
    field = "messages" if chat else "prompt"
    return Parsed(chat, prompts, n, per_choice, stream, bool(options.get("include_usage")), model, field)


# -- responses ----------------------------------------------------------------------------------------
def route_json(answer: Answer) -> dict:
    return {
        "answered_by": answer.route.answered_by,
        "reason": answer.route.reason,
        "checks": [asdict(check) for check in answer.route.checks],
    }


def _finite(value: float) -> float:
    return max(value, -9999.0)  # JSON has no -Infinity; vLLM reports -9999.0 too


def logprobs_json(
    chat: bool, entries: Sequence[TokenLogprob], token_text: Callable[[int], str], offset: int = 0
) -> dict:
    """OpenAI's logprobs of `entries`: chat {"content": [...]}, completions the four parallel lists."""
    if chat:

        def item(token: int, logprob: float) -> dict:
            text = token_text(token)
            return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
            ]
        }
    tokens = [token_text(e.token_id) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(e.logprob) for e in entries],
        "top_logprobs": [{token_text(t): _finite(lp) for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def choice_json(chat: bool, index: int, answer: Answer, token_text: Callable[[int], str]) -> dict:
    content = {"message": {"role": "assistant", "content": answer.text}} if chat else {"text": answer.text}
    logprobs = None if answer.logprobs is None else logprobs_json(chat, answer.logprobs, token_text)
    return {
        "index": index,
        **content,
        "logprobs": logprobs,
        "finish_reason": answer.finish_reason,
        "route": route_json(answer),
    }


def usage_json(prompt_tokens: int, answers: Sequence[Answer]) -> dict:
    """Counts of tokens, the completion's from the generated ids (never from re-tokenized text)."""
    completion = sum(len(answer.token_ids) for answer in answers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def chunk_json(header: dict, chat: bool, index: int, text: str | None, **extra: Any) -> dict:
    """One streamed choice delta; `text` None is a chat stream's opening (role) chunk."""
    if chat:
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": None}
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {**header, "object": kind, "choices": [{**choice, **extra}]}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"
