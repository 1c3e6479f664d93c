"""The OpenAI-compatible server over real sockets: completions, chat, streaming, batching, errors."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import running, wait_until
from seecl.config import ServerConfig
from seecl.data.synthetic import make_task
from seecl.see.ensemble import SeeEnsemble
from seecl.serving.routing import Answer, Check, Delta, Route
from seecl.serving.server import create_app, ensemble_app

LIMITS = ServerConfig(max_prompt_tokens=300, max_tokens=32, default_max_tokens=5, max_body_bytes=64_000, max_prompts=8)


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
        assert choice["finish_reason"] == answer.finish_reason
        assert_route(choice["route"], answer)
    formatter = ensemble.formatter()
    usage = body["usage"]
    assert usage["prompt_tokens"] == sum(len(formatter.prompt_ids(q)) for q in qs)
    assert usage["completion_tokens"] == sum(len(a.token_ids) for a in expected)  # generated ids, not re-tokenized
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
    assert events[-1]["choices"][0]["finish_reason"] == answer.finish_reason
    assert_route(events[-1]["choices"][0]["route"], answer)


def test_models_and_health(url):
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["ens", "ens/add", "ens/uppercase", "ens/base"]
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


def chat(*turns: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


BAD = [
    ("/v1/completions", b'{"prompt": "hi"', 400, "not valid JSON"),
    ("/v1/completions", b'["hi"]', 400, "must be a JSON object"),
    ("/v1/completions", b"[" * 30_000 + b"]" * 30_000, 400, "nested too deeply"),
    ("/v1/completions", {"max_tokens": 4}, 400, "missing required field 'prompt'"),
    ("/v1/completions", {"prompt": 5}, 400, "'prompt' must be a string or an array of strings"),
    ("/v1/completions", {"prompt": [[1, 2, 3]]}, 400, "token-id prompts are not supported"),
    ("/v1/completions", {"prompt": []}, 400, "holds 0 prompts"),
    ("/v1/completions", {"prompt": ["a"] * 9}, 400, "takes 1 to 8 per request"),
    ("/v1/completions", {"prompt": "  "}, 400, "prompt 0 is empty"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "8"}, 400, "'max_tokens' must be an integer, got a string"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, 400, "'max_tokens' must be an integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 33}, 400, "between 1 and 32"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "between 1 and 32"),
    ("/v1/completions", {"prompt": "x" * 400}, 400, "has 4"),  # 400+ byte tokens > 300
    ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, 400, "'temperature' must be between 0 and 2"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "'top_p' must be in (0, 1]"),
    ("/v1/completions", {"prompt": "hi", "n": 9}, 400, "'n' must be between 1 and 8"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "'seed' must be between 0"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", ""]}, 400, "non-empty strings"),
    ("/v1/completions", {"prompt": "hi", "stop": list("abcde")}, 400, "up to 4"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "'logprobs' must be between 0 and 20"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echoing the prompt is not implemented"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "'best_of' is not supported"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "'presence_penalty'=0.5 is not supported"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1}}, 400, "logit biases are not implemented"),
    ("/v1/completions", {"prompt": "hi", "top_k": 5}, 400, "unsupported field(s) 'top_k'"),
    ("/v1/completions", {"prompt": "hi", "messages": []}, 400, "unsupported field(s) 'messages'"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "'stream' must be a boolean"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "needs 'stream': true"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model 'gpt-4' not found"),
    ("/v1/completions", {"prompt": "hi", "model": "add"}, 404, "'ens/add'"),
    ("/v1/completions", {"prompt": "hi", "model": "ens/nobody"}, 404, "not found"),
    ("/v1/completions", {"prompt": "x" * 70_000}, 413, "exceeds 64000 bytes"),
    ("/v1/completions", {"prompt": "bad \ud800 text"}, 400, "unpaired surrogate"),
    ("/v1/chat/completions", {"prompt": "hi"}, 400, "unsupported field(s) 'prompt'"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "non-empty array of message objects"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "array of text parts"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "unknown message role"),
    ("/v1/chat/completions", {"messages": chat(("system", "hi"))}, 400, "must end with a user message"),
    ("/v1/chat/completions", {"messages": chat(("user", "a"), ("assistant", "b"))}, 400, "must end with a user"),
    ("/v1/chat/completions", {"messages": chat(("user", " "))}, 400, "last user message is empty"),
    ("/v1/chat/completions", {"messages": chat(("user", "\udfff"))}, 400, "messages[0].content holds an unpaired"),
    ("/v1/chat/completions", {"messages": chat(("user", "a"), ("tool", "b"))}, 400, "tool and function turns"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "content parts of type image_url are not supported",
    ),
    ("/v1/chat/completions", {"messages": chat(("user", "a")), "tools": [{"type": "function"}]}, 400, "tool calling"),
    (
        "/v1/chat/completions",
        {"messages": chat(("user", "a")), "response_format": {"type": "json_object"}},
        400,
        "structured output",
    ),
    ("/v1/chat/completions", {"messages": chat(("user", "a")), "top_logprobs": 2}, 400, "needs 'logprobs': true"),
    ("/v1/chat/completions", {"messages": chat(("user", "a")), "logprobs": 3}, 400, "'logprobs' must be a boolean"),
    ("/v1/responses", {"max_output_tokens": 4}, 400, "missing required field 'input'"),
    ("/v1/responses", {"input": 3}, 400, "'input' must be a non-empty array of message objects"),
    ("/v1/responses", {"input": "hi", "max_output_tokens": 33}, 400, "'max_output_tokens' must be between 1 and 32"),
    ("/v1/responses", {"input": "hi", "max_tokens": 3}, 400, "unsupported field(s) 'max_tokens'"),
    ("/v1/responses", {"input": "hi", "n": 2}, 400, "unsupported field(s) 'n'"),
    ("/v1/responses", {"input": "hi", "instructions": 3}, 400, "'instructions' must be a string"),
    ("/v1/responses", {"input": "hi", "store": True}, 400, "responses are not stored"),
    ("/v1/responses", {"input": "hi", "previous_response_id": "resp_x"}, 400, "send the earlier turns"),
    ("/v1/responses", {"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tool calling"),
    ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_object"}}}, 400, "structured output"),
    ("/v1/responses", {"input": "hi", "include": ["message.output_text.logprobs"]}, 400, "extra output"),
    ("/v1/responses", {"input": "hi", "model": "gpt-4"}, 404, "model 'gpt-4' not found"),
    ("/v1/responses", {"input": ["hi"]}, 400, "input[0] must be a message object"),
    (
        "/v1/responses",
        {"input": [{"type": "function_call_output", "call_id": "c", "output": "{}"}]},
        400,
        "input[0]: items of type 'function_call_output' are not supported",
    ),
    (
        "/v1/responses",
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        400,
        "input[0]: content parts of type input_image are not supported",
    ),
    ("/v1/responses", {"input": [{"role": "assistant", "content": "a"}]}, 400, "must end with a user message"),
    ("/v1/responses", {"input": "\udfff"}, 400, "input[0].content holds an unpaired"),
    ("/v1/nothing", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,message", BAD, ids=[f"{i}-{b[3][:24]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(url, path, body, status, message):
    if isinstance(body, bytes):
        response = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})
    else:
        # A lone surrogate is sent as a JSON escape, the way a client's JSON encoder writes it.
        data = json.dumps(body)
        response = httpx.post(f"{url}{path}", content=data, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/v1/completions", {"prompt": "x" * 400}, "prompt"),
        ("/v1/chat/completions", {"messages": chat(("user", "x" * 400))}, "messages"),
        ("/v1/responses", {"input": "x" * 400}, "input"),
    ],
)
def test_a_prompt_over_the_token_limit_names_its_field(url, path, body, field):
    error = httpx.post(f"{url}{path}", json=body).json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == field


def fake_answer(query, text: str, route: Route | None = None) -> Answer:
    """An answer the way a backend returns it: ids one per word of the text."""
    route = route or Route("base", "no_experts", [])
    return Answer(query, text, route, list(range(len(text.split()))), "stop")


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
        return [fake_answer(q, q.upper()) for q in queries]

    def experts(self):
        return []


@pytest.mark.parametrize("max_batch,sizes", [(32, [1, 4]), (3, [1, 3, 1])])
def test_concurrent_requests_are_answered_in_one_batch(max_batch, sizes):
    fake = Recorder()
    app = create_app(fake, "fake", ServerConfig(max_batch_queries=max_batch))
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
        streamed = httpx.post(f"{base_url}/v1/completions", json={"prompt": "boom", "stream": True})
        assert streamed.status_code == 500 and "engine failure" in streamed.json()["error"]["message"]
        failed = httpx.post(f"{base_url}/v1/responses", json={"input": "boom"})
        assert failed.status_code == 500 and "engine failure" in failed.json()["error"]["message"]
        streamed = httpx.post(f"{base_url}/v1/responses", json={"input": "boom", "stream": True})
        assert streamed.status_code == 500 and "engine failure" in streamed.json()["error"]["message"]
        ok = httpx.post(f"{base_url}/v1/completions", json={"prompt": "fine words"})
        assert ok.json()["choices"][0]["text"] == "FINE WORDS"
        assert ok.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


class Trickle:
    """A fake streaming answerer: the first word of its answer at once, the rest once released."""

    def __init__(self, text: str):
        self.text, self.release = text, threading.Event()
        self.route = Route("sum", "claimed", [Check("late", "neg", 0.125, 0.75), Check("sum", "pos", 0.875, 0.0625)])

    def ask(self, queries, samplings, on_token=None):
        words = self.text.split(" ")
        answers = []
        for index, query in enumerate(queries):
            for number, word in enumerate(words):
                on_token(index, Delta(word if number == 0 else " " + word, number))
                if number == 0:
                    assert self.release.wait(60)
            answers.append(Answer(query, self.text, self.route, list(range(len(words))), "length"))
            on_token(index, Delta("", None, None, answers[-1]))
        return answers

    def experts(self):
        return ["sum", "late"]


def test_a_stream_starts_with_the_first_answer_token():
    """The first chunk leaves while the rest of the answer is still being decoded."""
    fake = Trickle("héllo wörld ✓ done")
    with running(create_app(fake, "fake")) as base_url:
        body = {
            "messages": [{"role": "user", "content": "q"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            opening = json.loads(next(line for line in lines if line)[len("data: ") :])
            assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            first = json.loads(next(line for line in lines if line)[len("data: ") :])
            assert first["choices"][0]["delta"] == {"content": "héllo"}
            assert not fake.release.is_set(), "the first piece came before the answer was complete"
            fake.release.set()
            events = [json.loads(line[len("data: ") :]) for line in lines if line and line != "data: [DONE]"]
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert "héllo" + "".join(pieces) == fake.text
    final = events[-2]["choices"][0]
    assert final["finish_reason"] == "length"
    assert final["route"] == {
        "answered_by": "sum",
        "reason": "claimed",
        "checks": [
            {"expert": "late", "verdict": "neg", "p_pos": 0.125, "p_neg": 0.75},
            {"expert": "sum", "verdict": "pos", "p_pos": 0.875, "p_neg": 0.0625},
        ],
    }
    assert events[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}


def test_serve_without_an_ensemble_is_a_one_line_error(tmp_path, capsys):
    from seecl.cli import main

    assert main(["serve", "--ensemble", str(tmp_path / "nothing")]) == 2
    assert "no ensemble" in capsys.readouterr().err


class Endless:
    """A fake streaming answerer that goes on until its callback says stop."""

    def __init__(self):
        self.stopped = threading.Event()

    def ask(self, queries, samplings, on_token=None):
        tokens = 0
        while on_token(0, Delta("word ", tokens)) is not False:
            tokens += 1
            assert tokens < 100_000, "the answer was never cancelled"
            self.stopped.wait(0.001)
        self.stopped.set()
        answer = Answer(queries[0], "word " * tokens, Route("base", "no_experts", []), list(range(tokens)), "cancelled")
        on_token(0, Delta("", None, None, answer))
        return [answer]

    def experts(self):
        return []


def test_a_client_that_leaves_stops_its_answer():
    fake = Endless()
    with running(create_app(fake, "fake")) as base_url:
        with httpx.stream("POST", f"{base_url}/v1/completions", json={"prompt": "q", "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line).startswith("data: ")
        wait_until(fake.stopped.is_set, "the answer to stop after the client left")
        assert httpx.get(f"{base_url}/health").status_code == 200


class Greedy(Recorder):
    greedy_only = True


def test_a_greedy_only_backend_refuses_sampling_before_batching():
    fake = Greedy()
    fake.release.set()
    with running(create_app(fake, "fake")) as base_url:
        for extra in ({"temperature": 0.7}, {"stop": "x"}, {"logprobs": 1}):
            response = httpx.post(f"{base_url}/v1/completions", json={"prompt": "hi", **extra})
            assert response.status_code == 400 and "decodes greedily" in response.json()["error"]["message"]
        assert httpx.post(f"{base_url}/v1/completions", json={"prompt": "hi", "n": 2}).status_code == 200
    assert fake.batches == [["hi", "hi"]], "refused requests never reached a batch"
