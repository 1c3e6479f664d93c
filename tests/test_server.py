"""The OpenAI-compatible server over real sockets: completions, chat, streaming, batching, errors."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from seecl.data.synthetic import make_task
from seecl.see.ensemble import SeeEnsemble
from seecl.serving.routing import Answer, Check, Route
from seecl.serving.server import ServerLimits, create_app, ensemble_app, token_pieces

LIMITS = ServerLimits(max_prompt_tokens=300, max_tokens=32, default_max_tokens=5, max_body_bytes=64_000, max_prompts=8)


def wait_until(condition, what: str, deadline_s: float = 30.0) -> None:
    """Poll until `condition()`; the deadline only turns a hang into a failure."""
    end = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


@contextlib.contextmanager
def running(app):
    """The app under uvicorn in a background thread, on a free port chosen by the OS."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the server to start")
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    from conftest import TINY
    from seecl.config import load_config

    # Two briefly trained experts: the server only needs a real ensemble, not a good one.
    root = tmp_path_factory.mktemp("server") / "ens"
    ens = SeeEnsemble(root, load_config(overrides=TINY + ["train.epochs=1"]))
    for name in ("add", "uppercase"):
        ens.learn(make_task(name, "train", 8))
    # Opened the way `seecl serve --set see.threshold=...` opens it; the high threshold sends
    # queries past both experts, so routes carry both checks.
    return SeeEnsemble.open(root, ["see.threshold=0.999"])


@pytest.fixture(scope="module")
def url(ensemble):
    with running(ensemble_app(ensemble, LIMITS)) as base_url:
        yield base_url


def queries() -> list[str]:
    return [
        make_task("add", "eval", 1).instances[0].query,
        make_task("uppercase", "eval", 1).instances[0].query,
        "Hi there",
    ]


def route_of(answer: Answer) -> dict:
    return {
        "answered_by": answer.route.answered_by,
        "reason": answer.route.reason,
        "checks": [
            {"expert": c.expert, "verdict": c.verdict, "p_pos": c.p_pos, "p_neg": c.p_neg} for c in answer.route.checks
        ],
    }


def assert_route(got: dict, answer: Answer) -> None:
    want = route_of(answer)
    assert got["answered_by"] == want["answered_by"] and got["reason"] == want["reason"]
    assert [c["expert"] for c in got["checks"]] == ["uppercase", "add"][: len(got["checks"])]
    assert [(c["expert"], c["verdict"]) for c in got["checks"]] == [(c["expert"], c["verdict"]) for c in want["checks"]]
    for g, w in zip(got["checks"], want["checks"]):
        assert g["p_pos"] == pytest.approx(w["p_pos"], abs=1e-5) and g["p_neg"] == pytest.approx(w["p_neg"], abs=1e-5)


def sse_events(response: httpx.Response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def test_completions_equal_ensemble_ask(url, ensemble):
    qs = queries()
    response = httpx.post(
        f"{url}/v1/completions",
        json={"model": "ens", "prompt": qs, "max_tokens": 6, "user": "ignored", "temperature": 0},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "ens" and body["id"].startswith("cmpl-")
    expected = ensemble.ask(qs, 6)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for choice, answer in zip(body["choices"], expected):
        assert choice["text"] == answer.text
        assert choice["finish_reason"] in ("stop", "length")
        assert_route(choice["route"], answer)
    formatter = ensemble.formatter()
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(len(formatter.prompt_ids(q)) for q in qs)
    assert usage["completion_tokens"] == sum(
        len(ensemble.base.tokenizer.encode(a.text, add_special_tokens=False)) for a in expected
    )
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_completion_ignores_the_system_message(url, ensemble):
    query = queries()[1]
    messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": query}]
    response = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 6})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [answer] = ensemble.ask([query], 6)
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": answer.text}
    assert_route(choice["route"], answer)
    # Text parts are one query too; the default budget applies without max_tokens.
    parts = [{"role": "user", "content": [{"type": "text", "text": query}]}]
    again = httpx.post(f"{url}/v1/chat/completions", json={"messages": parts}).json()
    assert again["choices"][0]["message"]["content"] == ensemble.ask([query], LIMITS.default_max_tokens)[0].text


def test_streaming_sends_the_same_answers_in_pieces(url, ensemble):
    qs = queries()[:2]
    plain = httpx.post(f"{url}/v1/completions", json={"prompt": qs, "max_tokens": 8}).json()
    response = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": qs, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert response.status_code == 200
    events = sse_events(response)
    assert {e["id"] for e in events} == {events[0]["id"]} and events[0]["object"] == "text_completion"
    for index, choice in enumerate(plain["choices"]):
        mine = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert len(mine) > 2 or len(choice["text"]) <= 1, "the answer comes in pieces"
        assert [c["finish_reason"] for c in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1]["finish_reason"] == choice["finish_reason"] and mine[-1]["route"] == choice["route"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]

    query = qs[1]
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": query}], "max_tokens": 8, "stream": True},
    )
    events = sse_events(chat)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    [answer] = ensemble.ask([query], 8)
    assert "".join(d.get("content", "") for d in deltas) == answer.text
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert_route(events[-1]["choices"][0]["route"], answer)


def test_models_and_health(url):
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["ens", "add", "uppercase", "base"]
    assert all(m["object"] == "model" for m in models["data"])
    assert all(m["parent"] == "ens" for m in models["data"][1:])
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": "ens", "experts": ["add", "uppercase"]}


def test_concurrent_requests_get_their_own_answers(url, ensemble):
    qs = queries() + [make_task("add", "eval", 3).instances[2].query, "What is a lighthouse?"]

    def post(query: str) -> dict:
        response = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=120,
            json={"messages": [{"role": "user", "content": query}], "max_tokens": 6},
        )
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    with ThreadPoolExecutor(len(qs)) as pool:
        got = list(pool.map(post, qs))
    for choice, answer in zip(got, ensemble.ask(qs, 6)):
        assert choice["message"]["content"] == answer.text
        assert_route(choice["route"], answer)


BAD = [
    ("/v1/completions", b'{"prompt": "hi"', 400, "not valid JSON"),
    ("/v1/completions", b'["hi"]', 400, "must be a JSON object"),
    ("/v1/completions", {"max_tokens": 4}, 400, "missing required field 'prompt'"),
    ("/v1/completions", {"prompt": 5}, 400, "'prompt' must be a string or an array of strings"),
    ("/v1/completions", {"prompt": [[1, 2, 3]]}, 400, "token-id prompts are not supported"),
    ("/v1/completions", {"prompt": []}, 400, "holds 0 prompts"),
    ("/v1/completions", {"prompt": ["a"] * 9}, 400, "takes 1 to 8 per request"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "8"}, 400, "'max_tokens' must be an integer, got a string"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, 400, "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 33}, 400, "between 1 and 32"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "between 1 and 32"),
    ("/v1/completions", {"prompt": "x" * 400}, 400, "has 4"),  # 400+ byte tokens > 300
    ("/v1/completions", {"prompt": "hi", "temperature": 0.7}, 400, "seecl decodes greedily"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "'n' must be 1"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\n"]}, 400, "stop sequences are not supported"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "'stream' must be a boolean"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "serves 'ens'"),
    ("/v1/completions", {"prompt": "hi", "model": "add"}, 404, "routed through the whole ensemble"),
    ("/v1/completions", {"prompt": "x" * 70_000}, 413, "exceeds 64000 bytes"),
    ("/v1/chat/completions", {"prompt": "hi"}, 400, "missing required field 'messages'"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "non-empty array of message objects"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "array of text parts"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "unknown message role"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "hi"}]}, 400, "single-turn"),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        },
        400,
        "single-turn",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        400,
        "exactly one user message",
    ),
    ("/v1/nothing", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,message", BAD, ids=[f"{i}-{b[3][:24]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(url, path, body, status, message):
    if isinstance(body, bytes):
        response = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(f"{url}{path}", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"] and error["type"] == "invalid_request_error"


class Recorder:
    """A fake answerer that records each batch; the first batch waits until released."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.release = threading.Event()

    def ask(self, queries, max_new_tokens):
        self.batches.append(list(queries))
        if len(self.batches) == 1:
            assert self.release.wait(60)
        if any(q == "boom" for q in queries):
            raise RuntimeError("engine failure")
        return [Answer(q, q.upper(), Route("base", "no_experts", [])) for q in queries]

    def experts(self):
        return []


@pytest.mark.parametrize("max_batch,sizes", [(32, [1, 4]), (3, [1, 3, 1])])
def test_concurrent_requests_are_answered_in_one_batch(max_batch, sizes):
    fake = Recorder()
    app = create_app(fake, "fake", ServerLimits(max_batch_queries=max_batch))
    with running(app) as base_url, ThreadPoolExecutor(5) as pool:

        def post(prompt):
            return httpx.post(f"{base_url}/v1/completions", json={"prompt": prompt}, timeout=60).json()

        first = pool.submit(post, "blocker")
        wait_until(lambda: len(fake.batches) == 1, "the first batch")
        rest = [pool.submit(post, f"q{i}") for i in range(4)]
        # While the first batch runs, the other four requests queue up; then they go together.
        wait_until(lambda: app.state.batcher.queue.qsize() == 4, "four waiting requests")
        fake.release.set()
        assert first.result()["choices"][0]["text"] == "BLOCKER"
        assert [f.result()["choices"][0]["text"] for f in rest] == ["Q0", "Q1", "Q2", "Q3"]
    assert [len(b) for b in fake.batches] == sizes
    assert sorted(q for b in fake.batches[1:] for q in b) == ["q0", "q1", "q2", "q3"]


def test_engine_failure_is_a_server_error_and_the_server_keeps_serving():
    fake = Recorder()
    fake.release.set()
    with running(create_app(fake, "fake")) as base_url:
        failed = httpx.post(f"{base_url}/v1/completions", json={"prompt": "boom"})
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        assert "engine failure" in failed.json()["error"]["message"]
        ok = httpx.post(f"{base_url}/v1/completions", json={"prompt": "fine words"})
        assert ok.json()["choices"][0]["text"] == "FINE WORDS"
        assert ok.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


class Scripted:
    """A fake answerer: one fixed answer, claimed by the older of two experts."""

    def __init__(self, text: str):
        self.text = text

    def ask(self, queries, max_new_tokens):
        route = Route("sum", "claimed", [Check("late", "neg", 0.125, 0.75), Check("sum", "pos", 0.875, 0.0625)])
        return [Answer(q, self.text, route) for q in queries]

    def experts(self):
        return ["sum", "late"]


def test_stream_pieces_are_the_tokens_of_the_answer(tiny_base):
    tokenizer = tiny_base.tokenizer
    text = "héllo wörld ✓ done"  # byte tokens: a character may span several of them
    n_tokens = len(tokenizer.encode(text, add_special_tokens=False))
    app = create_app(
        Scripted(text), "fake", ServerLimits(), lambda q: len(tokenizer.encode(q)), token_pieces(tokenizer)
    )
    with running(app) as base_url:
        for max_tokens, finish in ((64, "stop"), (n_tokens, "length")):
            response = httpx.post(
                f"{base_url}/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "q"}],
                    "max_tokens": max_tokens,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            )
            events = sse_events(response)
            pieces = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
            pieces = [p for p in pieces if p]
            assert "".join(pieces) == text and len(pieces) == len(text)  # one piece per character
            final = events[-2]["choices"][0]
            assert final["finish_reason"] == finish
            assert final["route"] == {
                "answered_by": "sum",
                "reason": "claimed",
                "checks": [
                    {"expert": "late", "verdict": "neg", "p_pos": 0.125, "p_neg": 0.75},
                    {"expert": "sum", "verdict": "pos", "p_pos": 0.875, "p_neg": 0.0625},
                ],
            }
            assert events[-1]["usage"] == {
                "prompt_tokens": 1,
                "completion_tokens": n_tokens,
                "total_tokens": 1 + n_tokens,
            }


def test_token_pieces_concatenate_to_the_text(tiny_base):
    split = token_pieces(tiny_base.tokenizer)
    for text in ["hello world", "héllo ✓ 日本", "", " spaced  out "]:
        pieces = split(text)
        assert "".join(pieces) == text
        assert len(pieces) == len(tiny_base.tokenizer.encode(text, add_special_tokens=False))


def test_serve_without_an_ensemble_is_a_one_line_error(tmp_path, capsys):
    from seecl.cli import main

    assert main(["serve", "--ensemble", str(tmp_path / "nothing")]) == 2
    assert "no ensemble" in capsys.readouterr().err
