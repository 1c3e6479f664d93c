"""OpenAI-compatible HTTP server over a SEE ensemble (`seecl serve`).

Owns the HTTP surface: parsing and limits, OpenAI response and error shapes, SSE streaming and the
batching of concurrent requests into one `ask` call. It does not route or generate: any object
with `ask(queries, max_new_tokens) -> list[Answer]` and `experts()` answers (a SeeEnsemble or a
faster engine with that interface); tokenization comes in as two functions.

POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health. Every choice also
carries its `route`: {answered_by, reason, checks: [{expert, verdict, p_pos, p_neg}]}.
- Chat: SEE routes single-turn queries, so a request holds exactly one user message and no
  assistant or tool turns. System messages are accepted and ignored: the ensemble applies the
  system prompt its experts were trained with.
- Greedy decoding: `temperature` 0 or absent, `n` 1, no `stop`; unknown fields (`user`, ...) are
  ignored. `model` may be omitted, else it must be the ensemble's id: every query is routed.
- Streaming: the engine produces whole answers, so a stream starts once the answer is ready and
  carries it in token-sized pieces, ending with `data: [DONE]`; the chunk with `finish_reason`
  carries the route. usage.completion_tokens is the answer re-tokenized (the engine returns text).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from seecl.serving.routing import BASE, Answer

DEFAULT_MAX_TOKENS = 64
MAX_TOKENS_LIMIT = 1024
BATCH_WINDOW_S = 0.010
MAX_BATCH_QUERIES = 32


@dataclass(frozen=True)
class ServerLimits:
    """What the server accepts and how it batches; a request beyond a limit gets a 4xx error."""

    max_prompt_tokens: int = 2048  # longest query, counted with the system prompt and chat template
    max_tokens: int = MAX_TOKENS_LIMIT  # largest `max_tokens` a request may ask for
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # answer budget when a request names none
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_prompts: int = 32  # prompts in one /v1/completions request
    batch_window_s: float = BATCH_WINDOW_S  # how long the first waiting request waits for company
    max_batch_queries: int = MAX_BATCH_QUERIES  # queries per `ask` call (a larger request goes alone)


class Answerer(Protocol):
    def ask(self, queries: list[str], max_new_tokens: list[int] | int) -> list[Answer]: ...

    def experts(self) -> list[str]: ...


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

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}},
            status_code=self.status,
        )


def count_words(text: str) -> int:  # stand-in token count without a tokenizer (fake answerers)
    return len(text.split())


def split_words(text: str) -> list[str]:  # stand-in token pieces: words with leading whitespace
    return re.findall(r"\s*\S+|\s+", text)


def token_pieces(tokenizer) -> Callable[[str], list[str]]:
    """Text as one piece per token, concatenating to the text. A token ending inside a multi-byte
    character gives "" (the character comes with the token completing it); pieces are differences
    of decoding a short window, so tokenizers that drop a lone word's leading space keep it."""

    def split(text: str) -> list[str]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces: list[str] = []
        prefix = read = 0
        for end in range(1, len(ids) + 1):
            before = tokenizer.decode(ids[prefix:read])
            after = tokenizer.decode(ids[prefix:end])
            if len(after) > len(before) and after.startswith(before) and not after.endswith("\ufffd"):
                pieces.append(after[len(before) :])
                prefix, read = read, end
            else:
                pieces.append("")
        joined = "".join(pieces)
        if not pieces or not text.startswith(joined):
            # Decoding does not reproduce the text (e.g. it normalizes spaces): one whole piece.
            return [text] + [""] * (len(ids) - 1) if text else []
        pieces[-1] += text[len(joined) :]
        return pieces

    return split


@dataclass
class _Job:
    queries: list[str]
    budgets: list[int]
    future: asyncio.Future


class Batcher:
    """Requests arriving within `window_s` of the first waiting one (up to `max_queries` queries)
    are answered by one `ask` call, in one worker thread, one batch at a time: the model is not
    thread-safe. Requests queued while a batch runs form the next one."""

    def __init__(self, answerer: Answerer, window_s: float, max_queries: int):
        self.answerer, self.window_s, self.max_queries = answerer, window_s, max_queries
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._held: _Job | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seecl-answer")

    async def ask(self, queries: list[str], budgets: list[int]) -> list[Answer]:
        job = _Job(queries, budgets, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(job)
        return await job.future

    def _take(self) -> list[_Job]:
        jobs: list[_Job] = []
        size = 0
        while self._held is not None or not self.queue.empty():
            job = self._held if self._held is not None else self.queue.get_nowait()
            self._held = None
            if job.future.done():  # its client went away while waiting
                continue
            if jobs and size + len(job.queries) > self.max_queries:
                self._held = job
                break
            jobs.append(job)
            size += len(job.queries)
        return jobs

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._held is None:
                self._held = await self.queue.get()
            await asyncio.sleep(self.window_s)
            jobs = self._take()
            if not jobs:
                continue
            queries = [q for job in jobs for q in job.queries]
            budgets = [b for job in jobs for b in job.budgets]
            try:
                answers = await loop.run_in_executor(self._executor, self.answerer.ask, queries, budgets)
                if len(answers) != len(queries):
                    raise RuntimeError(f"the answerer returned {len(answers)} answers for {len(queries)} queries")
            except Exception as exc:  # reported to every request of the batch as a server error
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(answers[start : start + len(job.queries)])
                start += len(job.queries)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


_JSON_TYPES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any) -> Any:
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


async def _read_json(request: Request, limit: int) -> dict:
    too_large = ApiError(f"request body exceeds {limit} bytes", 413, code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(bytes(body))
    except ValueError as exc:  # includes bad UTF-8
        raise ApiError(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError("request body must be a JSON object", code="invalid_json")
    return data


def _prompts(body: dict, limits: ServerLimits) -> list[str]:
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
    if not 1 <= len(prompts) <= limits.max_prompts:
        raise ApiError(
            f"'prompt' holds {len(prompts)} prompts; this server takes 1 to {limits.max_prompts} per request",
            param="prompt",
            code="invalid_value",
        )
    return prompts


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ApiError("message content must be a string or an array of text parts", param="messages", code="invalid_type")


def _chat_query(body: dict) -> str:
    messages = body.get("messages")
    if messages is None:
        raise ApiError("missing required field 'messages'", param="messages", code="missing_field")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError("'messages' must be a non-empty array of message objects", param="messages", code="invalid_type")
    roles = [m.get("role") for m in messages]
    for role in roles:
        if role not in ("system", "developer", "user", "assistant", "tool", "function"):
            raise ApiError(f"unknown message role {role!r}", param="messages", code="invalid_value")
    # System messages are dropped: the ensemble applies the system prompt its experts learned with.
    if roles.count("user") != 1 or {"assistant", "tool", "function"} & set(roles):
        raise ApiError(
            "SEE routes single-turn queries: send exactly one user message and no assistant or "
            "tool turns (system messages are ignored)",
            param="messages",
            code="multi_turn",
        )
    return _message_text(messages[roles.index("user")].get("content"))


@dataclass(frozen=True)
class _Options:
    max_tokens: int
    stream: bool
    include_usage: bool


def _options(body: dict, limits: ServerLimits, model_id: str, experts: Callable[[], list[str]]) -> _Options:
    model = _get(body, "model", (str,), model_id)
    if model != model_id:
        detail = (
            "every query is routed through the whole ensemble"
            if model in [*experts(), BASE]
            else f"this server serves {model_id!r}"
        )
        raise ApiError(
            f"model {model!r} not found: {detail}; send model={model_id!r} or omit it",
            404,
            param="model",
            code="model_not_found",
        )
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, name, (int,), limits.default_max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(
            f"'{name}' must be between 1 and {limits.max_tokens}, got {max_tokens}", param=name, code="invalid_value"
        )
    temperature = _get(body, "temperature", (int, float), 0)
    if temperature != 0:
        raise ApiError(
            f"temperature={temperature} is not supported: seecl decodes greedily (send 0 or omit it)",
            param="temperature",
            code="unsupported_value",
        )
    if _get(body, "n", (int,), 1) != 1:
        raise ApiError(
            "'n' must be 1: greedy decoding gives one answer per prompt", param="n", code="unsupported_value"
        )
    if body.get("stop") not in (None, "", []):
        raise ApiError(
            "stop sequences are not supported: answers end at the model's end of turn",
            param="stop",
            code="unsupported_value",
        )
    stream = _get(body, "stream", (bool,), False)
    stream_options = _get(body, "stream_options", (dict,), {})
    return _Options(max_tokens, stream, bool(stream_options.get("include_usage")))


def _route(answer: Answer) -> dict:
    return {
        "answered_by": answer.route.answered_by,
        "reason": answer.route.reason,
        "checks": [asdict(check) for check in answer.route.checks],
    }


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _chunks(
    chat: bool, header: dict, answers: list[Answer], pieces: list[list[str]], finishes: list[str], usage: dict | None
) -> AsyncIterator[str]:
    head = {**header, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(index: int, text: str | None, finish: str | None = None, **extra: Any) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [{**choice, **extra}]})

    for index, answer in enumerate(answers):
        if chat:
            yield chunk(index, None)
        for piece in pieces[index]:
            if piece:
                yield chunk(index, piece)
        yield chunk(index, "", finishes[index], route=_route(answer))
    if usage is not None:
        yield _sse({**head, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


def create_app(
    answerer: Answerer,
    model_id: str,
    limits: ServerLimits | None = None,
    count_tokens: Callable[[str], int] = count_words,
    split_tokens: Callable[[str], list[str]] = split_words,
) -> FastAPI:
    """The server app. `count_tokens(query)` is a query's prompt length in tokens (with the system
    prompt and chat template); `split_tokens(text)` an answer as one text piece per token."""
    limits = limits or ServerLimits()
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Made here, not in create_app, so that the queue belongs to the serving event loop.
        batcher = app.state.batcher = Batcher(answerer, limits.batch_window_s, limits.max_batch_queries)
        worker = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            batcher.close()

    app = FastAPI(title="seecl", lifespan=lifespan, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(f"internal error: {type(exc).__name__}: {exc}", 500, kind="server_error").response()

    async def respond(request: Request, body: dict, queries: list[str], chat: bool):
        options = _options(body, limits, model_id, answerer.experts)
        counts = [count_tokens(query) for query in queries]
        for index, tokens in enumerate(counts):
            if tokens > limits.max_prompt_tokens:
                raise ApiError(
                    f"prompt {index} has {tokens} tokens (with the chat template); this server "
                    f"accepts at most {limits.max_prompt_tokens}",
                    param="messages" if chat else "prompt",
                    code="context_length_exceeded",
                )
        prompt_tokens = sum(counts)
        answers = await request.app.state.batcher.ask(queries, [options.max_tokens] * len(queries))
        pieces = [split_tokens(answer.text) for answer in answers]
        finishes = ["length" if len(p) >= options.max_tokens else "stop" for p in pieces]
        completion_tokens = sum(len(p) for p in pieces)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        header = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model_id,
        }
        if options.stream:
            return StreamingResponse(
                _chunks(chat, header, answers, pieces, finishes, usage if options.include_usage else None),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache"},
            )
        content = (
            (lambda a: {"message": {"role": "assistant", "content": a.text}}) if chat else (lambda a: {"text": a.text})
        )
        choices = [
            {"index": i, **content(a), "logprobs": None, "finish_reason": finishes[i], "route": _route(a)}
            for i, a in enumerate(answers)
        ]
        return {
            **header,
            "object": "chat.completion" if chat else "text_completion",
            "choices": choices,
            "usage": usage,
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_json(request, limits.max_body_bytes)
        return await respond(request, body, _prompts(body, limits), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_json(request, limits.max_body_bytes)
        return await respond(request, body, [_chat_query(body)], chat=True)

    @app.get("/v1/models")
    async def models():
        entry = {"object": "model", "created": started, "owned_by": "seecl"}
        members = [{"id": name, **entry, "parent": model_id} for name in [*answerer.experts(), BASE]]
        return {"object": "list", "data": [{"id": model_id, **entry}, *members]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "experts": answerer.experts()}

    return app


def ensemble_app(ensemble, limits: ServerLimits | None = None, model_id: str | None = None) -> FastAPI:
    """The app over a SeeEnsemble: its id is the directory name, tokens are its tokenizer's."""
    formatter = ensemble.formatter()
    model_id = model_id or Path(ensemble.store.root).resolve().name
    return create_app(
        ensemble,
        model_id,
        limits,
        lambda query: len(formatter.prompt_ids(query)),
        token_pieces(ensemble.base.tokenizer),
    )


def serve(app: FastAPI, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
