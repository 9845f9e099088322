"""Tiny randomly initialised causal LMs of each supported FFN family, built in-process, plus helpers.

Tiny models run fastest single-threaded (thread start-up dominates their matmuls and the team shares
two cores), so importing this module sets torch to one thread unless LORAMIX_TEST_THREADS says more.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GemmaConfig, GPT2Config, LlamaConfig, Qwen2Config

from loramix import config

torch.set_num_threads(int(os.environ.get("LORAMIX_TEST_THREADS", "1")))

VOCAB = 128
ARCHS = ["llama", "qwen2", "gemma", "gpt2"]
ROUTER_NAMES = list(config.ROUTERS)  # every registered router (the registry in loramix.config)
EXPERT_TYPES = list(config.EXPERT_TYPES)


def tiny_config(arch: str, **overrides: Any):
    """Config of a 2-layer, 32-wide model; ``overrides`` change any field (e.g. hidden_size)."""
    if arch == "gpt2":
        fields = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
        fields.update(overrides)
        return GPT2Config(**fields)
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    fields.update(overrides)
    if arch == "llama":
        return LlamaConfig(**fields)
    if arch == "qwen2":
        return Qwen2Config(**fields)
    if arch == "gemma":
        return GemmaConfig(**{"head_dim": 8, **fields})
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A freshly initialised tiny model in eval mode; equal (arch, seed, overrides) give equal weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    model.config._name_or_path = f"tiny-{arch}"
    return model.eval()


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """The FFN module of every decoder layer (whatever it currently is: base MLP or MixLoraFFN)."""
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    return [layer.mlp for layer in layers]


def random_batch(
    batch: int = 2, seq: int = 12, seed: int = 1, vocab: int = VOCAB, pad_left: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask); the last row gets ``pad_left`` left-padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_left:
        mask[-1, :pad_left] = 0
        ids[-1, :pad_left] = 0
    return ids, mask


@torch.no_grad()
def perturb_adapters(model: nn.Module, seed: int = 123, scale: float = 0.2) -> None:
    """Give every trainable adapter tensor random values, so the adapter changes the output.

    At init LoRA B is zero (the adapter is the identity), which would hide wrong expert/attention
    wiring from any test comparing outputs.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name or "mixlora_" in name:
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


@torch.no_grad()
def randomize_biases(model: nn.Module, seed: int = 321, scale: float = 0.1) -> nn.Module:
    """Random values for every bias (GPT-2 initialises them to zero, which hides wrong bias handling)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
    return model


def module_types(model: nn.Module) -> dict[str, type]:
    """Name -> class of every submodule: a structural fingerprint to compare before/after."""
    return {name: type(m) for name, m in model.named_modules()}
