"""Tiny randomly initialised causal LMs of each supported FFN family, built in-process."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GemmaConfig, GPT2Config, LlamaConfig, Qwen2Config

VOCAB = 128


def tiny_config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "gemma":
        return GemmaConfig(**common, head_dim=8)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                          resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    model.config._name_or_path = f"tiny-{arch}"
    return model.eval()


ARCHS = ["llama", "qwen2", "gemma", "gpt2"]
