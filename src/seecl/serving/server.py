"""OpenAI-compatible HTTP server over a SEE ensemble (`seecl serve`); the API is in docs/serving.md.

Owns the app: its endpoints (POST /v1/completions, POST /v1/chat/completions, POST /v1/responses,
GET /v1/models[/{model}], GET /health, GET /metrics), reading bodies within limits, counting
prompt tokens off the event loop, handing queries to the batcher and turning answers into JSON or
an SSE stream whose first chunk leaves as soon as the first answer text exists. Every choice (every response)
also carries its `route`: {answered_by, reason, checks: [{expert, verdict, p_pos, p_neg}]}.

It does not route or generate: any object with `ask(queries, samplings[, on_token])` and
`experts()` answers (a `LiveEnsemble` over a SeeEnsemble, or a fake in tests); one with
`refresh()` is asked, between batches, to pick up experts learned meanwhile. Request fields are
openai_api.py's (responses_api.py's for /v1/responses), batching is batching.py's, the front-door
checks security.py's, the counters metrics.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from seecl.config import ServerConfig
from seecl.serving.batching import Batcher, Job, drain
from seecl.serving.metrics import ServerMetrics, Timing
from seecl.serving.openai_api import (
    ApiError,
    Parsed,
    choice_json,
    chunk_json,
    logprobs_json,
    parse,
    resolve_model,
    route_json,
    sse,
    usage_json,
)
from seecl.serving.responses_api import EventStream, parse_responses, response_json
from seecl.serving.routing import BASE, Answer, Query, UnsupportedSampling, as_query
from seecl.serving.security import Guard, default_hosts

log = logging.getLogger("seecl.server")


class Answerer(Protocol):
    def ask(self, queries: list, max_new_tokens: list) -> list[Answer]: ...

    def experts(self) -> list[str]: ...


def count_words(query: str | Query) -> int:  # stand-in prompt length without a tokenizer (fake answerers)
    return sum(len(text.split()) for _, text in as_query(query).turns())


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
    except RecursionError:  # thousands of nested arrays fit in a small body
        raise ApiError("request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError("request body must be a JSON object", code="invalid_json")
    return data


def _failure(exc: BaseException) -> ApiError:
    """What a failed batch tells its requests."""
    if isinstance(exc, UnsupportedSampling):  # a backend that said nothing of being greedy-only
        return ApiError(str(exc), 400, code="unsupported_value")
    return ApiError(f"internal error: {type(exc).__name__}: {exc}", 500, kind="server_error")


def create_app(
    answerer: Answerer,
    model_id: str,
    config: ServerConfig | None = None,
    count_tokens: Callable[[str | Query], int] = count_words,
    token_text: Callable[[int], str] = str,
) -> FastAPI:
    """The server app. `count_tokens(query)` is a query's prompt length in tokens (with the system
    prompt and chat template; a conversation whole); `token_text(id)` one token as text (logprobs)."""
    cfg = config or ServerConfig()
    metrics = ServerMetrics()
    started = int(time.time())
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seecl-tokenize")
    refresh_answerer = getattr(answerer, "refresh", None)

    def refresh() -> None:
        if refresh_answerer():
            metrics.reloads.inc()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Made here, not in create_app, so that the queue belongs to the serving event loop.
        batcher = app.state.batcher = Batcher(
            answerer,
            cfg.batch_window_s,
            cfg.max_batch_queries,
            refresh if refresh_answerer else None,
            cfg.reload_interval_s,
            metrics.batch,
        )
        worker = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            batcher.close()
            tokenizing.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="seecl", lifespan=lifespan, openapi_url=None)
    app.state.metrics, app.state.config = metrics, cfg
    app.add_middleware(Guard, api_key=cfg.api_key, allowed_hosts=cfg.allowed_hosts, allowed_origins=cfg.allowed_origins)
    if cfg.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    app.add_middleware(Timing, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(f"internal error: {type(exc).__name__}: {exc}", 500, kind="server_error").response()

    async def prompt_tokens(parsed: Parsed) -> int:
        # A tokenizer call on a megabyte prompt takes long: off the event loop, so /health and
        # streams go on meanwhile.
        loop = asyncio.get_running_loop()
        counts = await loop.run_in_executor(tokenizing, lambda: [count_tokens(p) for p in parsed.prompts])
        for index, tokens in enumerate(counts):
            if tokens > cfg.max_prompt_tokens:
                raise ApiError(
                    f"prompt {index} has {tokens} tokens (with the chat template); this server "
                    f"accepts at most {cfg.max_prompt_tokens}",
                    param=parsed.prompt_field,
                    code="context_length_exceeded",
                )
        return sum(counts)

    async def submit(request: Request, parse_body: Callable[[dict], Parsed]) -> tuple[dict, Parsed, int, Job]:
        """Read, check and queue one request: its body, what it asks, its prompt tokens, its job."""
        body = await _read_json(request, cfg.max_body_bytes)
        parsed = parse_body(body)
        if getattr(answerer, "greedy_only", False) and any(
            not s.greedy or s.stop or s.logprobs is not None for s in parsed.samplings
        ):
            # refused alone, rather than failing the batch it would have joined
            raise ApiError(
                "this server decodes greedily (generate.engine=reference): send temperature 0 and no "
                "stop or logprobs, or serve with generate.engine=fast",
                code="unsupported_value",
            )
        prompt_total = await prompt_tokens(parsed)
        job = request.app.state.batcher.submit(parsed.queries, parsed.samplings, stream=parsed.stream)
        return body, parsed, prompt_total, job

    async def finished(job: Job) -> list[Answer]:
        try:
            return await job.future
        except asyncio.CancelledError:
            drain(job)
            raise
        except Exception as exc:
            log.error("batch failed: %s: %s", type(exc).__name__, exc)
            raise _failure(exc) from None

    async def respond(request: Request, chat: bool):
        arrived = time.perf_counter()
        _, parsed, prompt_total, job = await submit(
            request, lambda body: parse(body, chat, cfg, model_id, answerer.experts())
        )
        header = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": parsed.model,
        }
        if parsed.stream:
            return await stream(job, lambda first: chunks(job, parsed, header, prompt_total, arrived, first))
        answers = await finished(job)
        metrics.answered(answers, prompt_total)
        return {
            **header,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice_json(chat, i, a, token_text) for i, a in enumerate(answers)],
            "usage": usage_json(prompt_total, answers),
        }

    async def respond_to_responses(request: Request):
        arrived = time.perf_counter()
        body, parsed, prompt_total, job = await submit(
            request, lambda body: parse_responses(body, cfg, model_id, answerer.experts())
        )
        header = {"id": f"resp_{uuid.uuid4().hex}", "created_at": int(time.time()), "model": parsed.model}
        item_id = f"msg_{uuid.uuid4().hex}"
        if parsed.stream:
            events = EventStream(header, body, item_id)
            return await stream(job, lambda first: response_events(job, events, prompt_total, arrived, first))
        (answer,) = await finished(job)
        metrics.answered([answer], prompt_total)
        return response_json(header, body, item_id, answer, prompt_total)

    async def stream(job: Job, render: Callable[[object], AsyncIterator[str]]):
        """SSE: headers leave with the first delta; a batch that fails before it is a plain error."""
        try:
            first = await job.events.get()
        except asyncio.CancelledError:
            drain(job)
            raise
        if isinstance(first, Exception):
            log.error("batch failed: %s: %s", type(first).__name__, first)
            return _failure(first).response()
        return StreamingResponse(render(first), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    def first_text(arrived: float) -> None:
        metrics.first_token.observe(time.perf_counter() - arrived)

    async def chunks(
        job: Job, parsed: Parsed, header: dict, prompt_total: int, arrived: float, event
    ) -> AsyncIterator[str]:
        chat, size = parsed.chat, len(job.queries)
        answers: list[Answer | None] = [None] * size
        offsets = [0] * size  # completions logprobs: each token's character offset in its choice
        timed = False
        try:
            if chat:
                for index in range(size):
                    yield sse(chunk_json(header, chat, index, None))
            while sum(a is not None for a in answers) < size:
                if event is None or isinstance(event, Exception):
                    failure = _failure(event or RuntimeError("the batch ended without every answer"))
                    yield sse(failure.body())
                    break
                index, delta = event
                if delta.text or delta.logprob is not None:
                    if delta.text and not timed:
                        first_text(arrived)
                        timed = True
                    logprobs = None
                    if delta.logprob is not None:
                        logprobs = logprobs_json(chat, [delta.logprob], token_text, offsets[index])
                        offsets[index] += len(token_text(delta.logprob.token_id))
                    yield sse(chunk_json(header, chat, index, delta.text, logprobs=logprobs))
                if delta.answer is not None:
                    answers[index] = delta.answer
                    finish = {"finish_reason": delta.answer.finish_reason, "route": route_json(delta.answer)}
                    yield sse(chunk_json(header, chat, index, "", **finish))
                if sum(a is not None for a in answers) < size:
                    event = await job.events.get()
            else:
                metrics.answered(answers, prompt_total)
                if parsed.include_usage:
                    kind = "chat.completion.chunk" if chat else "text_completion"
                    yield sse({**header, "object": kind, "choices": [], "usage": usage_json(prompt_total, answers)})
            yield sse("[DONE]")
        finally:
            drain(job)  # a client that left stops its answers; a finished job is unaffected

    async def response_events(
        job: Job, events: EventStream, prompt_total: int, arrived: float, event
    ) -> AsyncIterator[str]:
        answer, timed = None, False
        try:
            for line in events.opening():
                yield line
            while answer is None:
                if event is None or isinstance(event, Exception):
                    yield sse(_failure(event or RuntimeError("the batch ended without the answer")).body())
                    return
                _, delta = event
                if delta.text:
                    if not timed:
                        first_text(arrived)
                        timed = True
                    yield events.delta(delta.text)
                if delta.answer is not None:
                    answer = delta.answer
                else:
                    event = await job.events.get()
            metrics.answered([answer], prompt_total)
            for line in events.closing(answer, prompt_total):
                yield line
        finally:
            drain(job)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await respond(request, chat=True)

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await respond_to_responses(request)

    def model_entries(experts: list[str]) -> list[dict]:
        entry = {"object": "model", "created": started, "owned_by": "seecl"}
        members = [{"id": f"{model_id}/{name}", **entry, "parent": model_id} for name in [*experts, BASE]]
        return [{"id": model_id, **entry}, *members]

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": model_entries(answerer.experts())}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        experts = answerer.experts()
        resolve_model(name, model_id, experts)  # a 404 that lists the served names
        return next(entry for entry in model_entries(experts) if entry["id"] == name)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "experts": answerer.experts()}

    @app.get("/metrics")
    async def prometheus():
        metrics.experts.set(len(answerer.experts()))
        batcher = getattr(app.state, "batcher", None)
        metrics.queued.set(batcher.waiting if batcher is not None else 0)
        content, media_type = metrics.render()
        return Response(content, media_type=media_type)

    return app


def ensemble_app(
    ensemble,
    config: ServerConfig | None = None,
    model_id: str | None = None,
    bind: str = "127.0.0.1",
    router=None,
) -> FastAPI:
    """The app over a SeeEnsemble, picking up experts learned while it serves: its id is the
    directory name, tokens are its tokenizer's, the answer budget its generate.max_new_tokens
    (within server.max_tokens) unless server.default_max_tokens says otherwise; Host checks follow
    the `bind` address. With a `router` ensemble, its experts route and this one's answer
    (`RoutedBy`)."""
    import dataclasses

    from seecl.serving.live import LiveEnsemble

    cfg = config or ServerConfig()
    default = cfg.default_max_tokens or min(ensemble.config.generate.max_new_tokens, cfg.max_tokens)
    cfg = dataclasses.replace(
        cfg, default_max_tokens=default, allowed_hosts=list(cfg.allowed_hosts) or default_hosts(bind)
    )
    formatter = ensemble.formatter()
    tokenizer = ensemble.base.tokenizer
    model_id = model_id or Path(ensemble.store.root).resolve().name
    return create_app(
        LiveEnsemble(ensemble, router),
        model_id,
        cfg,
        lambda query: len(formatter.chat_ids(as_query(query).turns())),
        lambda token: tokenizer.decode([token]),
    )


def serve(app: FastAPI, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
