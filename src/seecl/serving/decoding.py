"""Decoding one answer once routing has chosen who answers it: the tokens, the text, when it ends.

Owns the per-answer state the engine keeps while it decodes (`AnswerDecoding`): choosing each
token (greedy, or sampled with temperature and top_p from the answer's own seeded generator),
per-token logprobs, stop strings found in the incrementally decoded text, the finish reason, and
the `Delta`s a streaming caller receives. Also the incremental detokenizer (`Detokenizer`).
Does not run the model: the engine hands in each step's log-probs with the indicator tokens masked.

The text of an answer is the decoded ids with surrounding whitespace stripped (as
`PromptFormatter.decode`, so greedy answers equal the reference router's), cut before the first
stop string when one occurs; stop strings are looked for in that stripped text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from seecl.serving.routing import Answer, Delta, OnToken, Query, Route, Sampling, TokenLogprob


class Detokenizer:
    """The text of a growing sequence of ids, one final piece per id.

    Each id's piece is what decoding a short window of the ids before it gains from that id (the
    method of vLLM and TGI: tokenizers that drop a lone word's leading space keep it, and the cost
    per id stays constant). A piece that ends in an unfinished multi-byte character (U+FFFD) waits
    for the ids that complete it, so no piece is ever taken back.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self._prefix : self._read])
        after = self.decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
            return piece
        return ""


def _normalized(scores: torch.Tensor) -> torch.Tensor:
    """Log-probs renormalized over the tokens an answer may hold (masked ones are -inf)."""
    return scores - torch.logsumexp(scores, dim=-1, keepdim=True)


class AnswerDecoding:
    """One answer being decoded: its sampling, ids, text, logprobs and how it ended.

    `route` is set once routing has decided; `push` takes each generated token; `finish` closes
    the answer, calls `on_token` with the closing delta and leaves the result in `answer`.
    """

    def __init__(
        self,
        query: str | Query,
        sampling: Sampling,
        decode_answer: Callable[[list[int]], str],
        decode_piece: Callable[[list[int]], str],
        on_token: Callable[[Delta], bool | None] | None = None,
    ):
        self.query, self.sampling, self.on_token = query, sampling, on_token
        self.decode_answer = decode_answer  # ids -> the answer's text (stripped, special tokens dropped)
        self.route: Route | None = None
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if sampling.logprobs is not None else None
        self.answer: Answer | None = None
        self._generator: torch.Generator | None = None
        # Text is followed as it grows only when something reads it: a stop string or a stream.
        self._text = Detokenizer(decode_piece) if sampling.stop or on_token is not None else None
        self._hold = max((len(s) for s in sampling.stop), default=1) - 1
        self._sent = ""  # text handed out in deltas so far
        self._searched = 0  # stop strings were looked for in the first this many characters
        self._cut: str | None = None  # the text, when a stop string ended it

    @property
    def done(self) -> bool:
        return self.answer is not None

    # -- choosing tokens -------------------------------------------------------------------------
    def sample(self, scores: torch.Tensor) -> int:
        """A token drawn from this row's log-probs under temperature and top_p, by its own generator."""
        if self._generator is None:
            self._generator = torch.Generator(device=scores.device)
            if self.sampling.seed is None:
                self._generator.seed()
            else:
                self._generator.manual_seed(self.sampling.seed)
        probs = torch.softmax(scores.float() / self.sampling.temperature, dim=-1)
        if self.sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest set of most likely tokens whose mass reaches top_p
            outside = sorted_probs.cumsum(-1) - sorted_probs >= self.sampling.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator))

    # -- growing the answer ----------------------------------------------------------------------
    def push(self, token: int, scores: torch.Tensor) -> bool:
        """Add a generated token (`scores`: its position's masked log-probs); False once the answer
        has ended (budget, stop string or a cancelling callback), True while it goes on."""
        self.ids.append(token)
        logprob = None
        if self.logprobs is not None:
            normalized = _normalized(scores.float())
            top = ()
            if self.sampling.logprobs:
                best = torch.topk(normalized, min(self.sampling.logprobs, normalized.shape[-1]))
                top = tuple(zip(best.indices.tolist(), best.values.tolist()))
            logprob = TokenLogprob(token, float(normalized[token]), top)
            self.logprobs.append(logprob)
        piece = ""
        if self._text is not None:
            self._text.push(token)
            piece = self._advance()
        going = self.on_token is None or self.on_token(Delta(piece, token, logprob)) is not False
        if self._cut is not None:
            self.finish("stop")
            return False
        if not going:
            self.finish("cancelled")
            return False
        if len(self.ids) >= self.sampling.max_tokens:
            self.finish("length")
            return False
        return True

    def _advance(self) -> str:
        """Look for stop strings in the new text and return the piece that may be handed out now."""
        visible = self._text.text.lstrip()
        if self.sampling.stop:
            start = max(0, self._searched - self._hold)
            found = [i for i in (visible.find(s, start) for s in self.sampling.stop) if i >= 0]
            if found:
                self._cut = visible[: min(found)].rstrip()
                return ""
            self._searched = len(visible)
        # Held back: trailing whitespace (the answer is stripped) and what may start a stop string.
        ready = visible[: len(visible) - self._hold].rstrip()
        if len(ready) <= len(self._sent):
            return ""
        piece = ready[len(self._sent) :]
        self._sent = ready
        return piece

    def finish(self, reason: str) -> None:
        text = self._cut if self._cut is not None else self.decode_answer(self.ids)
        self.answer = Answer(self.query, text, self.route, list(self.ids), reason, self.logprobs)
        if self.on_token is not None:
            # What was handed out is a prefix of the text unless a tokenizer's decoding of the whole
            # answer differs from its pieces (none known); the rest follows in the closing delta.
            rest = text[len(self._sent) :] if text.startswith(self._sent) else ""
            self.on_token(Delta(rest, None, None, self.answer))


def choose_tokens(scores: torch.Tensor, rows: Sequence[AnswerDecoding]) -> list[int]:
    """The next token of every row: the argmax, or a sample for rows that sample."""
    tokens = scores.argmax(-1).tolist()
    for row, decoding in enumerate(rows):
        if not decoding.sampling.greedy:
            tokens[row] = decoding.sample(scores[row])
    return tokens


def decodings_for(
    queries: Sequence[str | Query],
    samplings: Sequence[Sampling],
    decode_answer: Callable[[list[int]], str],
    decode_piece: Callable[[list[int]], str],
    on_token: OnToken | None,
) -> list[AnswerDecoding]:
    """One AnswerDecoding per query; each calls `on_token` with its own query index."""

    def bound(index: int):
        return None if on_token is None else (lambda delta: on_token(index, delta))

    return [
        AnswerDecoding(query, sampling, decode_answer, decode_piece, bound(index))
        for index, (query, sampling) in enumerate(zip(queries, samplings))
    ]
