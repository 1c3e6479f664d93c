"""OpenAI's Responses API (POST /v1/responses) as this server speaks it: request in, response and
stream events out.

Owns what a Responses body may hold (`parse_responses`): `input` (a string, or message items whose
last is the user's turn; text parts only), `instructions` (skipped, as a chat's system messages
are: the ensemble applies the system prompt its experts learned with), `max_output_tokens`,
`temperature`, `top_p`, `stream`, and who answers (`model`, as for the other endpoints). A field
that would change the answer and is not implemented (tools, structured output, stored responses,
`previous_response_id`, reasoning) gets a 400 naming it. Renders the response object, with its
`route`, and the stream's events (`response.created` ... `response.completed`, or
`response.incomplete` when the answer hit `max_output_tokens`). One output message per request: the
Responses API has no `n`. Does not batch, route or decode (server.py, the engine).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from seecl.config import ServerConfig
from seecl.serving.openai_api import (
    ApiError,
    Parsed,
    chat_query,
    check_fields,
    get,
    resolve_model,
    route_json,
    samplings,
)
from seecl.serving.routing import Answer, Query

RESPONSES_FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "user"}
RESPONSES_FIELDS |= {"metadata", "store", "tools", "tool_choice", "parallel_tool_calls", "text", "truncation"}
RESPONSES_FIELDS |= {"include", "previous_response_id", "reasoning", "background", "service_tier"}
NOT_STORED = "responses are not stored; send the earlier turns as 'input' items"
# Fields accepted only at a value that changes nothing: (allowed values, why another one is refused).
RESPONSES_NEUTRAL: dict[str, tuple[tuple, str]] = {
    "store": ((False,), f"{NOT_STORED} (and store: false)"),
    "previous_response_id": ((), NOT_STORED),
    "background": ((False,), "background responses are not implemented"),
    "tools": (([],), "tool calling is not implemented"),
    "tool_choice": (("none", "auto"), "tool calling is not implemented"),
    "parallel_tool_calls": ((True, False), "tool calling is not implemented"),
    "text": (({"format": {"type": "text"}},), "structured output (json_object, json_schema) is not implemented"),
    "truncation": (("disabled",), "truncation is not implemented: a prompt over the limit is refused"),
    "include": (([],), "extra output (logprobs, reasoning, sources) is not implemented"),
    "reasoning": (({},), "reasoning options are not implemented"),
    "service_tier": (("auto", "default"), "service tiers are not implemented"),
}
TEXT_PARTS = ("input_text", "output_text")


def _input_messages(body: dict) -> list[dict]:
    """`input` as chat messages: a string is one user message; items are messages whose text
    parts (`input_text`, `output_text`) become plain text parts."""
    items = body.get("input")
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        return items  # chat_query names what is missing or wrong
    messages = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise ApiError(f"input[{index}] must be a message object", param="input", code="invalid_type")
        kind = item.get("type", "message")
        if kind != "message":
            raise ApiError(
                f"input[{index}]: items of type {kind!r} are not supported (messages only)",
                param="input",
                code="unsupported_value",
            )
        content = item.get("content")
        if isinstance(content, list):
            content = [
                {**part, "type": "text"} if isinstance(part, dict) and part.get("type") in TEXT_PARTS else part
                for part in content
            ]
        messages.append({"role": item.get("role"), "content": content})
    return messages


def parse_responses(body: dict, cfg: ServerConfig, model_id: str, experts: Sequence[str]) -> Parsed:
    """Validate a Responses body; every problem is an ApiError naming the field."""
    check_fields(body, RESPONSES_FIELDS, "/v1/responses", RESPONSES_NEUTRAL)
    get(body, "instructions", (str,), "")
    model = get(body, "model", (str,), model_id)
    owner = resolve_model(model, model_id, experts)
    text, history = chat_query({"input": _input_messages(body)}, field="input")
    prompts: list[str | Query] = [Query(text, history, owner) if history or owner else text]
    _, per_choice = samplings(body, cfg, True, 1, max_name="max_output_tokens")
    return Parsed(True, prompts, 1, per_choice, get(body, "stream", (bool,), False), False, model, "input")


def _status(answer: Answer) -> str:
    return "incomplete" if answer.finish_reason == "length" else "completed"


def message_json(item_id: str, answer: Answer | None) -> dict:
    """The output message: in progress (no answer yet, no content) or finished."""
    content = [] if answer is None else [output_text_json(answer.text)]
    status = "in_progress" if answer is None else _status(answer)
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def output_text_json(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_json(header: dict, body: dict, item_id: str, answer: Answer | None, prompt_tokens: int = 0) -> dict:
    """The response object; `answer` None is the in-progress one a stream opens with (no usage yet)."""
    status = "in_progress" if answer is None else _status(answer)
    return {
        **header,
        "object": "response",
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "output": [] if answer is None else [message_json(item_id, answer)],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": body.get("temperature", 0.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": [],
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": None if answer is None else usage_json(prompt_tokens, len(answer.token_ids)),
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
        **({} if answer is None else {"route": route_json(answer)}),
    }


def usage_json(prompt_tokens: int, answer_tokens: int) -> dict:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": answer_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + answer_tokens,
    }


class EventStream:
    """The Responses stream's server-sent events, numbered in order (`sequence_number`)."""

    def __init__(self, header: dict, body: dict, item_id: str):
        self.header, self.body, self.item_id = header, body, item_id
        self.sequence = 0

    def event(self, kind: str, **fields) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def _part(self) -> dict:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def opening(self) -> list[str]:
        started = response_json(self.header, self.body, self.item_id, None)
        return [
            self.event("response.created", response=started),
            self.event("response.in_progress", response=started),
            self.event("response.output_item.added", output_index=0, item=message_json(self.item_id, None)),
            self.event("response.content_part.added", **self._part(), part=output_text_json("")),
        ]

    def delta(self, text: str) -> str:
        return self.event("response.output_text.delta", **self._part(), delta=text, logprobs=[])

    def closing(self, answer: Answer, prompt_tokens: int) -> list[str]:
        finished = response_json(self.header, self.body, self.item_id, answer, prompt_tokens)
        return [
            self.event("response.output_text.done", **self._part(), text=answer.text, logprobs=[]),
            self.event("response.content_part.done", **self._part(), part=output_text_json(answer.text)),
            self.event("response.output_item.done", output_index=0, item=message_json(self.item_id, answer)),
            self.event(f"response.{finished['status']}", response=finished),
        ]
