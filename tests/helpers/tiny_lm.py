"""A tiny random causal LM saved with a byte-level tokenizer as a local HF model directory (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from .tiny_models import tiny_config

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer():
    """Byte-level BPE with no merges (256 byte tokens + specials) and a chat template: any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def byte_lm(arch: str, seed: int = 0):
    """Tiny random model with the byte tokenizer and room for ~250-token prompts."""
    tok = byte_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tok), **({"n_positions": 256} if arch == "gpt2" else
                                                     {"max_position_embeddings": 256}))
    if arch == "gpt2":
        cfg.bos_token_id = cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval(), tok


def save_tiny_lm(directory, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """Write a tiny random model + byte tokenizer to ``directory``; returns the path as a string.
    ``overrides`` change config fields (e.g. ``hidden_size=64``)."""
    tok = byte_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tok), **overrides)
    if arch == "gpt2":
        cfg.bos_token_id = cfg.eos_token_id = tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)
