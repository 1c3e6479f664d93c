"""The routing indicators `<<pos>>` / `<<neg>>` and their ablation variants.

Owns which strings are used, how they become token ids, and how the base vocabulary is extended
once for the 'added' kind. An indicator may span several tokens (`«pos»` does in SmolLM2's
vocabulary): the decision is taken at the first token where the two sequences differ, after the
shared prefix was itself produced greedily.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seecl.errors import ModelError

INDICATOR_STRINGS = {
    "added": ("<<pos>>", "<<neg>>"),
    "nonsemantic": ("«pos»", "«neg»"),
    "semantic": ("Yes", "No"),
}
# Fixed so that every process extends the vocabulary identically (experts replace these rows anyway).
INDICATOR_INIT_SEED = 1234


@dataclass(frozen=True)
class Indicators:
    kind: str
    pos_text: str
    neg_text: str
    pos_ids: tuple[int, ...]
    neg_ids: tuple[int, ...]

    @property
    def decision_index(self) -> int:
        """Index of the first token where the two indicator sequences differ."""
        for i, (p, n) in enumerate(zip(self.pos_ids, self.neg_ids)):
            if p != n:
                return i
        raise ModelError(f"indicators {self.pos_text!r} and {self.neg_text!r} tokenize identically")

    @property
    def shared_prefix(self) -> tuple[int, ...]:
        return self.pos_ids[: self.decision_index]

    @property
    def pos_id(self) -> int:
        return self.pos_ids[self.decision_index]

    @property
    def neg_id(self) -> int:
        return self.neg_ids[self.decision_index]

    @property
    def trainable_token_ids(self) -> list[int]:
        """Rows an expert trains: only tokens added for the indicators (never shared vocabulary)."""
        if self.kind != "added":
            return []
        return sorted(set(self.pos_ids) | set(self.neg_ids))

    @property
    def blocked_in_answers(self) -> list[int]:
        """Tokens an answer never contains: the added indicator tokens (in-vocabulary indicators
        such as `Yes` / `No` are ordinary words there). Decoding after the decision masks them."""
        return self.trainable_token_ids

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "pos": self.pos_text,
            "neg": self.neg_text,
            "pos_ids": list(self.pos_ids),
            "neg_ids": list(self.neg_ids),
        }


def install_indicators(model, tokenizer, kind: str) -> Indicators:
    """Make the indicator strings tokenizable; for 'added', extend vocabulary and embeddings once.

    New rows start at the mean embedding plus a small seeded perturbation, so every process builds
    the same resized base; each expert stores its own trained copy of these rows.
    """
    if kind not in INDICATOR_STRINGS:
        raise ModelError(f"unknown indicator kind {kind!r}; known: {sorted(INDICATOR_STRINGS)}")
    pos_text, neg_text = INDICATOR_STRINGS[kind]
    if kind == "added":
        existing = set(tokenizer.get_vocab())
        missing = [t for t in (pos_text, neg_text) if t not in existing]
        if missing:
            old_rows = model.get_input_embeddings().weight.shape[0]
            tokenizer.add_tokens(missing, special_tokens=True)
            if len(tokenizer) > old_rows:
                _resize_deterministically(model, len(tokenizer), old_rows)
    pos_ids = tuple(tokenizer.encode(pos_text, add_special_tokens=False))
    neg_ids = tuple(tokenizer.encode(neg_text, add_special_tokens=False))
    if kind == "added" and (len(pos_ids) != 1 or len(neg_ids) != 1):
        raise ModelError("added indicator tokens did not tokenize to single ids")
    indicators = Indicators(kind, pos_text, neg_text, pos_ids, neg_ids)
    _ = indicators.decision_index  # validates that the two differ
    return indicators


def _resize_deterministically(model, new_rows: int, old_rows: int) -> None:
    model.resize_token_embeddings(new_rows, mean_resizing=False)
    generator = torch.Generator().manual_seed(INDICATOR_INIT_SEED)
    with torch.no_grad():
        modules = (model.get_input_embeddings(), model.get_output_embeddings())
        # Tied embeddings share one weight: initialise each distinct tensor once.
        weights = {id(m.weight): m.weight for m in modules if m is not None}
        for weight in weights.values():
            old = weight[:old_rows]
            noise = torch.randn(new_rows - old_rows, weight.shape[1], generator=generator)
            fresh = old.mean(0, keepdim=True) + 0.1 * old.std(0, keepdim=True) * noise.to(weight.dtype)
            weight[old_rows:new_rows] = fresh
