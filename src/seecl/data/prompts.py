"""Turn queries and responses into token ids with the model's chat template, and label masks.

The query is the user turn; the assistant turn is `[indicator] response <end-of-turn>`. Labels are
-100 on every prompt token, so loss falls only on the indicator, the response and the end-of-turn
token (positives) or the indicator and end-of-turn token (negatives). Baselines without
indicators use `sft_example`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from seecl.model.indicators import Indicators

IGNORE = -100


def common_prefix_length(rows) -> int:
    """Number of leading tokens that all `rows` (token id sequences) share."""
    first = rows[0]
    length = min(len(r) for r in rows)
    for row in rows[1:]:
        n = 0
        while n < length and row[n] == first[n]:
            n += 1
        length = n
    return length


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    positive: bool = True

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class PromptFormatter:
    def __init__(
        self, tokenizer, indicators: Indicators | None = None, system_prompt: str | None = None, max_length: int = 1024
    ):
        self.tokenizer = tokenizer
        self.indicators = indicators
        self.system_prompt = system_prompt
        self.max_length = max_length
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token")
        self.eos_id: int = eos

    def prompt_text(self, query: str) -> str:
        return self.chat_text([("user", query)])

    def prompt_ids(self, query: str) -> list[int]:
        return self.tokenizer.encode(self.prompt_text(query), add_special_tokens=False)

    def chat_text(self, turns: Sequence[tuple[str, str]]) -> str:
        """A conversation's (role, content) turns, ending with a user turn, as a prompt that opens
        the assistant's reply; the system prompt is this formatter's, as in every training prompt."""
        messages = [{"role": role, "content": content} for role, content in turns]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def chat_ids(self, turns: Sequence[tuple[str, str]]) -> list[int]:
        return self.tokenizer.encode(self.chat_text(turns), add_special_tokens=False)

    def invocation_ids(self) -> list[int]:
        """Tokens the chat template appends to open the assistant turn (aLoRA's invocation)."""
        with_header = self.prompt_ids("x")
        messages = [{"role": "user", "content": "x"}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        without = self.tokenizer.encode(
            self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False),
            add_special_tokens=False,
        )
        if with_header[: len(without)] != without or len(with_header) == len(without):
            raise ValueError("the chat template has no separate assistant header to invoke aLoRA experts with")
        return with_header[len(without) :]

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _example(self, query: str, target: list[int], positive: bool) -> Example:
        prompt = self.prompt_ids(query)
        overflow = len(prompt) + len(target) - self.max_length
        if overflow > 0:
            if overflow >= len(prompt):
                target = target[: self.max_length - 1]
                prompt = prompt[-1:]
            else:
                prompt = prompt[overflow:]
        return Example(tuple(prompt + target), tuple([IGNORE] * len(prompt) + target), positive)

    def see_example(self, query: str, response: str | None) -> Example:
        """A positive (`<<pos>>` response EOS) or, with response None, a negative (`<<neg>>` EOS)."""
        assert self.indicators is not None, "SEE examples need indicators"
        if response is None:
            return self._example(query, [*self.indicators.neg_ids, self.eos_id], positive=False)
        target = [*self.indicators.pos_ids, *self.text_ids(response), self.eos_id]
        return self._example(query, target, positive=True)

    def sft_example(self, query: str, response: str) -> Example:
        """Plain supervised example (no indicator), for the baselines."""
        return self._example(query, [*self.text_ids(response), self.eos_id], positive=True)

    def answer_budget(self, references: list[str] | tuple[str, ...], margin: int = 4) -> int:
        """max_new_tokens for a task: its longest reference in tokens plus a margin."""
        return max(len(self.text_ids(r)) for r in references) + margin

    def decode(self, ids: list[int]) -> str:
        """Answer text from generated ids: stops at end-of-turn, drops special tokens."""
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
