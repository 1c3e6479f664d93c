"""RequestLoop over an engine that steps (vLLM's `LLM.llm_engine`), with a stand-in engine: outputs
reach their callbacks as requests finish, callbacks add requests while others run, a watched request
is stopped when its callback says so, and nothing of a failed loop is left running."""

from types import SimpleNamespace

import pytest

from seecl.serving.vllm_loop import RequestLoop


class SteppingEngine:
    """Each request yields one token per step: its prompt's last id + 1, + 2, ... up to max_tokens."""

    def __init__(self):
        self.running, self.log, self.aborted = {}, [], []

    def add_request(self, request_id, prompt, params, lora_request=None):
        self.running[request_id] = (prompt["prompt_token_ids"], params, [])
        self.log.append(("add", request_id, params["kind"]))

    def step(self):
        outputs = []
        for request_id, (prompt, params, tokens) in list(self.running.items()):
            tokens.append(prompt[-1] + len(tokens) + 1)
            finished = len(tokens) >= params["max_tokens"]
            if finished:
                del self.running[request_id]
            if finished or params["kind"] == "cumulative":
                completion = SimpleNamespace(token_ids=list(tokens), finish_reason="length")
                outputs.append(SimpleNamespace(request_id=request_id, finished=finished, outputs=[completion]))
        return outputs

    def abort_request(self, request_ids):
        self.aborted += request_ids
        for request_id in request_ids:
            self.running.pop(request_id, None)


def loop_over(engine):
    return RequestLoop(SimpleNamespace(llm_engine=engine), lambda p, kind: {**p, "kind": kind}, lambda lora: lora)


def test_a_callback_adds_the_next_request_while_others_still_run():
    engine = SteppingEngine()
    loop, seen = loop_over(engine), []

    def first(output, final):
        seen.append(("first", output.outputs[0].token_ids))
        loop.submit([10], {"max_tokens": 1}, None, lambda o, f: seen.append(("next", o.outputs[0].token_ids)))

    loop.submit([0], {"max_tokens": 1}, None, first)
    loop.submit([100], {"max_tokens": 4}, None, lambda o, f: seen.append(("long", o.outputs[0].token_ids)))
    loop.run()
    assert seen == [("first", [1]), ("next", [11]), ("long", [101, 102, 103, 104])]
    assert [entry[0] for entry in engine.log] == ["add", "add", "add"] and not engine.running


def test_a_watched_request_sees_every_step_and_is_stopped_when_its_callback_says_so():
    engine = SteppingEngine()
    loop, steps = loop_over(engine), []

    def watch(output, final):
        steps.append((list(output.outputs[0].token_ids), final))
        return len(output.outputs[0].token_ids) == 2

    loop.submit([0], {"max_tokens": 9}, None, watch, watch=True)
    loop.run()
    assert steps == [([1], False), ([1, 2], False)]
    assert len(engine.aborted) == 1 and not engine.running


def test_a_failing_callback_leaves_nothing_of_its_loop_running():
    engine = SteppingEngine()
    loop = loop_over(engine)

    def fail(output, final):
        raise RuntimeError("callback failed")

    loop.submit([0], {"max_tokens": 1}, None, fail)
    loop.submit([5], {"max_tokens": 50}, None, lambda o, f: None)
    with pytest.raises(RuntimeError, match="callback failed"):
        loop.run()
    assert not engine.running and len(engine.aborted) == 1


def test_without_an_engine_requests_go_round_by_round_through_generate():
    calls = []

    def generate(prompts, sampling_params, lora_request=None, use_tqdm=True):
        calls.append(([p["prompt_token_ids"] for p in prompts], lora_request))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[p["prompt_token_ids"][-1] + 1])]) for p in prompts]

    loop = RequestLoop(SimpleNamespace(generate=generate), lambda p, kind: p, lambda lora: lora)
    got = []
    loop.submit([1], {}, "a", lambda o, f: loop.submit([7], {}, None, lambda o2, f2: got.append(o2)))
    loop.submit([2], {}, None, lambda o, f: got.append(o))
    loop.run()
    assert calls == [([[1], [2]], ["a", None]), ([[7]], None)]
    assert [o.outputs[0].token_ids for o in got] == [[3], [8]]
