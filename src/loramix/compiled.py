"""Compiled decoding: ``torch.compile`` the per-token expert path of every MixLoRA layer.

Eager decoding runs some 80 small PyTorch ops per MixLoRA layer for each new token (router, gathers of
the chosen experts' LoRA weights, batched matmuls, activation, mixing); on a CPU their dispatch overhead
costs more than the arithmetic. :func:`compile_decoding` compiles that path (``MixLoraFFN.route_pairwise``)
so it runs as a few fused kernels. Only inference steps with few (token, expert-slot) pairs take it, so
prefill, training and evaluation keep the eager code. The first decoding step compiles (seconds, once per
process and input shape) and needs a working ``torch.compile`` backend (a C++ compiler on CPU).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .moe_layer import MixLoraFFN


def moe_layers(model: nn.Module) -> list[MixLoraFFN]:
    return [m for m in model.modules() if isinstance(m, MixLoraFFN)]


def compile_decoding(model: nn.Module, enable: bool = True, **compile_kwargs: Any) -> int:
    """Compile (or, with ``enable=False``, un-compile) the decoding path of every MixLoRA layer.

    ``compile_kwargs`` go to ``torch.compile`` (default: ``dynamic=None``, i.e. shapes are specialised
    first and made dynamic on a recompile). Returns the number of layers changed; raises ``ValueError``
    when the model has no MixLoRA layer.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("compile_decoding: the model has no MixLoRA layers (inject or load an adapter first)")
    for layer in layers:
        layer.compile_decode(enable, **compile_kwargs)
    return len(layers)
