"""Hand vLLM each request the moment a walk knows it (docs/vllm.md §5).

Owns `RequestLoop`: requests go into a running `vllm.LLM`'s engine one by one
(`LLM.llm_engine.add_request`, then `step()` until nothing is left, as `LLM.generate` does
internally), and each request's output goes to its own callback, which may add the next request
(the query's next check, or its answer) while the others still run. vLLM's continuous batching then
runs one query's checks next to another's answer instead of waiting for a whole level of the walk.
A callback may also watch a request step by step and stop it (a combined check and answer whose
first token is no claim). Does not own what the requests are or what their outputs mean
(vllm_engine.py).

A stand-in `llm` without `llm_engine` (tests without vLLM) gets the same requests level by level:
each `run` round sends everything pending in one `generate` call and hands over final outputs only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Called with a request's output: its final one, or for a watched request every step's cumulative
# one. Returns True to stop the request there (ignored for a final output).
OnOutput = Callable[[Any, bool], bool | None]


@dataclass
class _Pending:
    prompt_token_ids: list[int]
    params: dict[str, Any]
    lora: Any
    on_output: OnOutput
    watch: bool


class RequestLoop:
    """Requests for one `vllm.LLM`, run until none is left. `make_params(dict, output_kind)` builds
    the SamplingParams (a plain dict for a stand-in); `make_lora(tuple)` the LoRARequest."""

    _ids = itertools.count()  # ids unique in the process: a later loop never reuses a stopped request's id

    def __init__(self, llm, make_params: Callable[[dict, str], Any], make_lora: Callable[[Any], Any]):
        self.llm, self.make_params, self.make_lora = llm, make_params, make_lora
        self._queue: list[_Pending] = []
        self._stepping = getattr(llm, "llm_engine", None) is not None

    def submit(self, prompt_token_ids: list[int], params: dict, lora, on_output: OnOutput, watch: bool = False) -> None:
        """Queue one request; `watch` hands its cumulative output to `on_output` after every step."""
        self._queue.append(_Pending(list(prompt_token_ids), dict(params), lora, on_output, watch))

    def run(self) -> None:
        """Run every request, including those the callbacks add, to its end."""
        if self._stepping:
            self._run_stepping()
        else:
            self._run_in_rounds()

    def _run_in_rounds(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            loras = [self.make_lora(p.lora) for p in batch]
            outputs = self.llm.generate(
                [{"prompt_token_ids": p.prompt_token_ids} for p in batch],
                sampling_params=[self.make_params(p.params, "final") for p in batch],
                lora_request=None if all(x is None for x in loras) else loras,
                use_tqdm=False,
            )
            for pending, output in zip(batch, outputs):
                pending.on_output(output, True)

    def _run_stepping(self) -> None:
        engine = self.llm.llm_engine
        # Prompts go in as vLLM's own `LLM.generate` hands them over: rendered (checked against the
        # model's length limit) when the engine has a renderer (vLLM >= 0.2x).
        render = getattr(getattr(engine, "renderer", None), "render_cmpl", None)
        running: dict[str, _Pending] = {}
        try:
            while True:
                batch, self._queue = self._queue, []
                for pending in batch:
                    request_id = f"seecl-{next(self._ids)}"
                    prompt = {"prompt_token_ids": pending.prompt_token_ids}
                    engine.add_request(
                        request_id,
                        render([prompt])[0] if render is not None else prompt,
                        self.make_params(pending.params, "cumulative" if pending.watch else "final"),
                        lora_request=self.make_lora(pending.lora),
                    )
                    running[request_id] = pending
                if not running:
                    return
                stopped = []
                for output in engine.step():
                    pending = running.get(output.request_id)
                    if pending is None:  # stopped last step; the engine may have run it once more
                        continue
                    if output.finished:
                        del running[output.request_id]
                        pending.on_output(output, True)
                    elif pending.on_output(output, False):
                        del running[output.request_id]
                        stopped.append(output.request_id)
                if stopped:
                    engine.abort_request(stopped)
        except BaseException:
            if running:  # nothing of this loop keeps running in a shared engine
                engine.abort_request(list(running))
            raise
