"""Prompt formatting: loss only on the indicator, answer and end token; indicator tokens added once and
deterministically; multi-token indicators; long prompts cut from the left."""

from seecl.config import ModelConfig
from seecl.data.prompts import IGNORE, PromptFormatter
from seecl.model.base import load_base
from seecl.model.indicators import install_indicators
from seecl.model.tiny import build_tiny_model, build_tiny_tokenizer


def test_loss_only_on_indicator_response_and_eos(tiny_base):
    fmt = PromptFormatter(tiny_base.tokenizer, tiny_base.indicators)
    prompt = fmt.prompt_ids("Add 1 + 2")
    pos = fmt.see_example("Add 1 + 2", "3")
    assert list(pos.input_ids[: len(prompt)]) == prompt
    assert all(label == IGNORE for label in pos.labels[: len(prompt)]), "prompt tokens never carry loss"
    supervised = [t for t in pos.labels if t != IGNORE]
    assert supervised == [tiny_base.indicators.pos_id, *fmt.text_ids("3"), fmt.eos_id]
    neg = fmt.see_example("Add 1 + 2", None)
    assert [t for t in neg.labels if t != IGNORE] == [tiny_base.indicators.neg_id, fmt.eos_id]
    assert not neg.positive and pos.positive


def test_added_indicators_are_single_new_tokens(tiny_base):
    ind = tiny_base.indicators
    assert ind.kind == "added" and len(ind.pos_ids) == len(ind.neg_ids) == 1
    assert ind.trainable_token_ids == sorted([ind.pos_id, ind.neg_id])
    assert tiny_base.model.get_input_embeddings().weight.shape[0] == len(tiny_base.tokenizer)


def test_vocabulary_extension_is_deterministic():
    a = load_base(ModelConfig(name="tiny-random"))
    b = load_base(ModelConfig(name="tiny-random"))
    wa, wb = a.model.get_input_embeddings().weight, b.model.get_input_embeddings().weight
    assert wa.equal(wb)
    assert not wa[-1].equal(wa[-2]), "the two indicator rows start different"


def test_multi_token_indicator_decides_at_first_difference():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    ind = install_indicators(model, tokenizer, "nonsemantic")
    assert len(ind.pos_ids) > 1
    k = ind.decision_index
    assert ind.pos_ids[:k] == ind.neg_ids[:k] and ind.pos_ids[k] != ind.neg_ids[k]
    assert install_indicators(model, tokenizer, "semantic").pos_text == "Yes"


def test_long_prompts_are_cut_from_the_left(tiny_base):
    fmt = PromptFormatter(tiny_base.tokenizer, tiny_base.indicators, max_length=64)
    example = fmt.see_example("x" * 500, "yes")
    assert len(example) == 64
    assert [t for t in example.labels if t != IGNORE][0] == tiny_base.indicators.pos_id
