"""Frozen bases quantized by bitsandbytes (4-bit NF4 ``Linear4bit``, 8-bit ``Linear8bitLt``).

loramix never imports bitsandbytes here: its modules are recognised by class, so a model without them costs
nothing. The adapters (expert LoRA, attention LoRA, routers) stay float32; only the frozen projections are
quantized, and they are read through their ``in_features`` / ``out_features``, never through the shape of
their packed weight.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (not for PEFT's LoRA wrappers around them)."""
    cls = type(module)
    return cls.__module__.startswith("bitsandbytes.") and cls.__name__ in QUANTIZED_LINEARS


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape a weight had before quantization: a 4-bit weight is stored packed as (out*in/2, 1) uint8,
    its ``quant_state`` keeps the (out, in) shape; any other tensor's own shape."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return tuple(shape) if shape is not None else tuple(param.shape)


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes-quantized linear layers in ``model``."""
    return [name for name, module in model.named_modules() if is_quantized_linear(module)]


def keep_trainable_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer in the layout its autograd formula covers.

    On CPUs with AVX512-BF16, bitsandbytes rewrites a ``Linear4bit`` weight in place into a CPU inference
    layout the first time the layer runs in eval mode without gradients; from then on it multiplies through
    an op without a backward, so a later training step gets wrong gradients for everything before that layer
    (the Trainer's evaluation before training is enough to trigger it). This switches that rewrite off and
    converts a weight that was already rewritten back, with bitsandbytes' own inverse.
    """
    for module in model.modules():
        if not (is_quantized_linear(module) and hasattr(module, "support_avx512bf16_for_cpu")):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


def refuse_quantized(modules: dict[str, nn.Module], action: str) -> None:
    """Raise a ValueError naming the first quantized module of ``modules`` (name -> module) for ``action``."""
    found = [name for name, module in modules.items() if is_quantized_linear(module)]
    if found:
        kind = type(modules[found[0]]).__name__
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ValueError(
            f"cannot {action}: {found[0]}{more} is a bitsandbytes {kind} layer, whose "
            "quantized weight cannot take the adapter's delta exactly. Load the base model without quantize, "
            "load the adapter onto it (loramix.load_adapter; an adapter trained on a quantized base loads onto "
            f"the unquantized one), then {action}."
        )


__all__ = ["is_quantized_linear", "keep_trainable_layout", "logical_shape", "quantized_modules", "refuse_quantized"]
