"""The server as real clients use it: the official openai package, a bounded load, metrics, and the
front door (API key, Host, Origin, content type). No timing is asserted anywhere."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import running, wait_until
from seecl.config import ServerConfig
from seecl.data.synthetic import make_task
from seecl.see.ensemble import SeeEnsemble
from seecl.serving.routing import BASE, Answer, Query, Route, Sampling
from seecl.serving.server import create_app, ensemble_app

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    from conftest import TINY, learn_ensemble

    root = tmp_path_factory.mktemp("clients") / "ens"
    learn_ensemble(root, TINY)
    return SeeEnsemble.open(root)


@pytest.fixture(scope="module")
def url(ensemble):
    config = ServerConfig(max_tokens=32, default_max_tokens=6, api_key=KEY)
    with running(ensemble_app(ensemble, config)) as base_url:
        yield base_url


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def queries() -> list[str]:
    names = ("reverse_list", "uppercase", "add")
    return [inst.query for name in names for inst in make_task(name, "eval", 2).instances]


def test_the_openai_client_lists_models_and_completes(client, ensemble):
    assert [m.id for m in client.models.list()] == ["ens", "ens/reverse_list", "ens/uppercase", "ens/add", "ens/base"]
    assert client.models.retrieve("ens/add").parent == "ens" and client.models.retrieve("ens").id == "ens"
    with pytest.raises(openai.NotFoundError, match="'ens/base'"):
        client.models.retrieve("ens/nobody")
    qs = queries()
    completion = client.completions.create(model="ens", prompt=qs, max_tokens=6)
    expected = ensemble.ask(qs, 6)
    assert [c.text for c in completion.choices] == [a.text for a in expected]
    assert [c.route["answered_by"] for c in completion.choices] == [a.route.answered_by for a in expected]
    assert completion.usage.completion_tokens == sum(len(a.token_ids) for a in expected)


def test_the_openai_client_samples_chats_and_streams(client, ensemble):
    query = queries()[2]
    options = dict(model="ens", max_tokens=8, temperature=0.9, top_p=0.95, seed=4, n=2, logprobs=True, top_logprobs=2)
    chat = client.chat.completions.create(messages=[{"role": "user", "content": query}], **options)
    again = client.chat.completions.create(messages=[{"role": "user", "content": query}], **options)
    assert [c.message.content for c in chat.choices] == [c.message.content for c in again.choices], "seeded"
    assert len({c.route["answered_by"] for c in chat.choices}) == 1, "every copy has the one route"
    expected = ensemble.ask([query] * 2, [Sampling(8, 0.9, 0.95, seed, logprobs=2) for seed in (4, 5)])
    assert [c.message.content for c in chat.choices] == [a.text for a in expected]
    for choice, answer in zip(chat.choices, expected):
        assert [t.logprob for t in choice.logprobs.content] == pytest.approx([e.logprob for e in answer.logprobs])
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)

    greedy = client.chat.completions.create(model="ens", messages=[{"role": "user", "content": query}], max_tokens=8)
    stream = client.chat.completions.create(
        model="ens",
        messages=[{"role": "user", "content": query}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == greedy.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == greedy.usage.completion_tokens


def test_a_conversation_is_answered_after_its_history(client, ensemble):
    add, upper = queries()[4], queries()[2]
    messages = [
        {"role": "system", "content": "ignored: the ensemble keeps the system prompt its experts learned with"},
        {"role": "user", "content": upper},
        {"role": "assistant", "content": "FINE"},
        {"role": "user", "content": add},
    ]
    chat = client.chat.completions.create(model="ens", messages=messages, max_tokens=6)
    [expected] = ensemble.ask([Query(add, (("user", upper), ("assistant", "FINE")))], 6)
    assert chat.choices[0].message.content == expected.text
    assert chat.choices[0].route["answered_by"] == ensemble.route([add])[0].answered_by, "routed on the last turn"
    turns = [("user", upper), ("assistant", "FINE"), ("user", add)]
    assert chat.usage.prompt_tokens == len(ensemble.formatter().chat_ids(turns)), "the conversation counts whole"


def test_a_request_may_name_an_expert_or_the_base(client, ensemble):
    query = queries()[0]
    for owner in ("uppercase", BASE):
        chat = client.chat.completions.create(
            model=f"ens/{owner}", messages=[{"role": "user", "content": query}], max_tokens=6
        )
        [expected] = ensemble.ask([Query(query, (), owner)], 6)
        assert chat.model == f"ens/{owner}" and chat.choices[0].message.content == expected.text
        assert chat.choices[0].route == {"answered_by": owner, "reason": "requested", "checks": []}


def test_the_openai_responses_api_answers_like_chat(client, ensemble):
    """client.responses: plain, streamed (raw events and the SDK's stream helper), a conversation
    with instructions, an expert by name, and an answer cut by max_output_tokens."""
    add, upper = queries()[4], queries()[2]
    response = client.responses.create(model="ens", input=add, max_output_tokens=6)
    [expected] = ensemble.ask([add], 6)
    assert response.status == "completed" or expected.finish_reason == "length"
    assert response.output_text == expected.text and response.route["answered_by"] == expected.route.answered_by
    assert response.usage.output_tokens == len(expected.token_ids)
    assert response.usage.input_tokens == len(ensemble.formatter().chat_ids([("user", add)]))

    events = list(client.responses.create(model="ens", input=add, max_output_tokens=6, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == f"response.{response.status}"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == expected.text == events[-1].response.output_text
    assert events[-1].response.route["answered_by"] == expected.route.answered_by

    history = [
        {"role": "user", "content": upper},
        {"role": "assistant", "content": [{"type": "output_text", "text": "FINE"}]},
        {"role": "user", "content": [{"type": "input_text", "text": add}]},
    ]
    instructions = "ignored: the ensemble keeps the system prompt its experts learned with"
    with client.responses.stream(model="ens", input=history, instructions=instructions, max_output_tokens=32) as stream:
        final = stream.get_final_response()
    [expected] = ensemble.ask([Query(add, (("user", upper), ("assistant", "FINE")))], 32)
    assert final.status == "completed" and final.output_text == expected.text
    assert final.route["answered_by"] == ensemble.route([add])[0].answered_by, "routed on the last turn"

    named = client.responses.create(model="ens/uppercase", input=add, max_output_tokens=6)
    assert named.model == "ens/uppercase"
    assert named.route == {"answered_by": "uppercase", "reason": "requested", "checks": []}
    assert named.output_text == ensemble.ask([Query(add, (), "uppercase")], 6)[0].text

    cut = client.responses.create(model="ens/base", input=queries()[0], max_output_tokens=1)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete" and cut.usage.output_tokens == 1


def test_the_openai_client_sees_clear_errors(url, client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="ens", prompt="hi", temperature=3)
    with pytest.raises(openai.BadRequestError, match="tool calling"):
        client.chat.completions.create(
            model="ens",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    with pytest.raises(openai.NotFoundError, match="ens/base"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="responses are not stored"):
        client.responses.create(model="ens", input="hi", previous_response_id="resp_1")
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_fifty_concurrent_requests_get_their_answers_and_health_stays_responsive(url, ensemble):
    """A bounded load: mixed streaming and plain, chat and completions; every answer is checked."""
    qs = [queries()[i % 6] if i % 5 else f"Question {i}: what is a lighthouse?" for i in range(50)]
    headers = {"authorization": f"Bearer {KEY}"}
    done = threading.Event()
    health: list[tuple[int, int]] = []  # (status, answers finished when it returned)
    finished = []

    def poll_health():
        while not done.is_set():
            health.append((httpx.get(f"{url}/health", timeout=60).status_code, len(finished)))

    def ask(i: int) -> str:
        stream, chat = i % 2 == 0, i % 3 != 0
        body = {"max_tokens": 6, "stream": stream}
        body.update({"messages": [{"role": "user", "content": qs[i]}]} if chat else {"prompt": qs[i]})
        path = "/v1/chat/completions" if chat else "/v1/completions"
        response = httpx.post(f"{url}{path}", json=body, headers=headers, timeout=300)
        assert response.status_code == 200, response.text
        if stream:
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            import json

            parts = [json.loads(e)["choices"][0] for e in events[:-1]]
            text = "".join((p["delta"].get("content") or "") if chat else p["text"] for p in parts)
        else:
            choice = response.json()["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
        finished.append(i)
        return text

    poller = threading.Thread(target=poll_health)
    poller.start()
    try:
        with ThreadPoolExecutor(50) as pool:
            texts = list(pool.map(ask, range(50)))
    finally:
        done.set()
        poller.join()
    assert texts == [a.text for a in ensemble.ask(qs, 6)]
    assert health and all(status == 200 for status, _ in health)
    assert any(count < 50 for _, count in health), "/health answered while requests were being served"


def test_metrics_count_requests_routes_and_batches(url, ensemble):
    headers = {"authorization": f"Bearer {KEY}"}
    qs = queries()
    httpx.post(f"{url}/v1/completions", json={"prompt": qs}, headers=headers, timeout=120)
    httpx.post(f"{url}/v1/completions", json={"prompt": qs[0], "stream": True}, headers=headers, timeout=120)
    assert httpx.get(f"{url}/metrics").status_code == 401, "metrics need the key too"
    text = httpx.get(f"{url}/metrics", headers=headers).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    requests = samples[("seecl_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))]
    assert requests >= 2
    answered = {dict(labels)["answered_by"] for (name, labels) in samples if name == "seecl_queries_total"}
    routes = [a.route for a in ensemble.ask(qs, 1)]
    assert set(answered) >= {r.answered_by for r in routes}
    verdicts = {tuple(dict(labels).values()) for (name, labels), _ in samples.items() if name == "seecl_checks_total"}
    assert {(c.expert, c.verdict) for r in routes for c in r.checks} <= verdicts
    assert samples[("seecl_batch_queries_count", ())] >= 2
    assert samples[("seecl_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("seecl_request_duration_seconds_count", (("endpoint", "/v1/completions"),))] >= 2
    assert samples[("seecl_experts", ())] == 3


class Echo:
    def ask(self, queries, samplings):
        return [Answer(q, "ok", Route(BASE, "no_experts", []), [1], "stop") for q in queries]

    def experts(self):
        return []


@pytest.mark.parametrize(
    "headers,status,code",
    [
        ({}, 200, None),
        ({"host": "evil.example"}, 400, "bad_host"),  # DNS rebinding: a page on evil.example resolving to us
        ({"origin": "http://evil.example"}, 403, "bad_origin"),  # a cross-site script
        ({"origin": "http://ui.example"}, 200, None),  # allowed explicitly
        ({"content-type": "text/plain"}, 415, "bad_content_type"),  # a cross-site form post
        ({"authorization": "Bearer nope"}, 401, "invalid_api_key"),
        ({"authorization": None}, 401, "invalid_api_key"),
    ],
)
def test_the_front_door(headers, status, code):
    config = ServerConfig(api_key=KEY, allowed_origins=["http://ui.example"])
    with running(create_app(Echo(), "fake", config)) as base_url:
        sent = {"content-type": "application/json", "authorization": f"Bearer {KEY}", **headers}
        sent = {k: v for k, v in sent.items() if v is not None}
        response = httpx.post(f"{base_url}/v1/completions", content=b'{"prompt": "hi"}', headers=sent)
        assert response.status_code == status, response.text
        if code:
            assert response.json()["error"]["code"] == code
        elif "origin" in headers:
            assert response.headers["access-control-allow-origin"] == "http://ui.example"
        assert httpx.get(f"{base_url}/health").status_code == 200, "health needs no key"


def test_same_origin_and_loopback_names_are_welcome():
    with running(create_app(Echo(), "fake", ServerConfig())) as base_url:
        port = base_url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
            headers = {"host": host, "origin": f"http://{host}"}
            assert httpx.post(f"{base_url}/v1/completions", json={"prompt": "hi"}, headers=headers).status_code == 200


def test_tokenizing_a_huge_prompt_does_not_block_the_server():
    """Regression: prompt tokenization ran on the event loop; six 1 MB prompts stalled /health."""
    entered, release = threading.Event(), threading.Event()

    def slow_count(query) -> int:
        entered.set()
        assert release.wait(60)
        return 1

    with running(create_app(Echo(), "fake", ServerConfig(), slow_count)) as base_url, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{base_url}/v1/completions", json={"prompt": "x" * 100_000}, timeout=60)
        wait_until(entered.is_set, "the prompt to be counted")
        assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200, "answered while counting"
        release.set()
        assert pending.result().status_code == 200


def test_an_expert_wanting_only_indicators_reports_real_usage(ensemble):
    """Regression: an expert emitting 64 x <<pos>> gave "" with finish_reason "stop" and
    completion_tokens 0; indicators are masked, and usage counts the generated ids."""
    pos = ensemble.formatter().indicators.pos_id
    (letter,) = ensemble.formatter().text_ids("z")

    def prefer(module, inputs, output):  # <<pos>> first, then "z"
        output[..., pos] += 60.0
        output[..., letter] += 50.0
        return output

    with running(ensemble_app(ensemble, ServerConfig(max_tokens=32))) as base_url:
        handle = ensemble.model.get_output_embeddings().register_forward_hook(prefer)
        try:
            body = httpx.post(f"{base_url}/v1/completions", json={"prompt": queries()[0], "max_tokens": 7}).json()
        finally:
            handle.remove()
    [choice] = body["choices"]
    assert choice["route"]["reason"] == "claimed"
    assert (choice["text"], choice["finish_reason"], body["usage"]["completion_tokens"]) == ("z" * 7, "length", 7)
