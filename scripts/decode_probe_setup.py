"""Shared set-up of the one-token decode probes (decode_guard_cost.py, decode_cpp_wrapper.py,
decode_b_layout_probe.py): the default model with MixLoRA top-2 in eval mode, its expert weights random (B = 0 at
init would make every expert the frozen FFN), one thread."""

from __future__ import annotations

import torch

from loramix.bench import fresh_copy, frozen_base, make_loramix
from loramix.compiled import moe_layers
from loramix.layer import MixLoraFFN


def topk_decode_layers() -> tuple[list[MixLoraFFN], torch.Tensor, torch.Tensor]:
    """The 30 MixLoRA layers, one token's hidden state (1, 576) and its token mask (1,)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    mix, _ = make_loramix(fresh_copy(frozen_base()), router="topk")
    mix.eval()
    layers = moe_layers(mix)
    for layer in layers:
        for p in layer.parameters():
            if p.dim() == 3:  # the experts' lora_A and lora_B
                p.data.normal_(0, 0.02)
    return layers, torch.randn(1, 576), torch.ones(1, dtype=torch.bool)
