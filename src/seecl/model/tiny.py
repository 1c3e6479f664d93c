"""A tiny random Llama model and a byte-level tokenizer, built in-process for tests.

Nothing is read from disk or the network: the tokenizer has one token per byte plus the ChatML
special tokens and a ChatML chat template; the model is a 2-layer Llama with tied embeddings (like
SmolLM2) whose weights come from a fixed seed. Selected with `model.name: tiny-random`.
`save_servable_tiny_model` writes a variant vLLM can serve, as a local model directory.
"""

from __future__ import annotations

import torch

TINY_MODEL = "tiny-random"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0, hidden_size: int = 64, layers: int = 2, initializer_range: float = 0.02):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_servable_tiny_model(directory, seed: int = 0):
    """Write a tiny model and tokenizer that vLLM's CPU build serves, for tests and smoke runs.

    Heads of size 32 (vLLM's CPU attention takes 32 to 512; the default tiny model's are 16), and
    weights 5x the usual init scale: at 0.02 every logit of so small a model stays near zero, and
    plain LoRA experts (no indicator rows of their own) never learn to emit an indicator.
    """
    from pathlib import Path

    directory = Path(directory)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed, hidden_size=128, initializer_range=0.1)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
