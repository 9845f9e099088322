"""Mixed precision: the dtype the adapter maths runs in, and the dtype trainable weights are kept in.

Under ``torch.autocast`` the frozen projections return the autocast dtype whatever the input's dtype, so
the adapter's own products must follow the autocast dtype too, not the input's. Trainable weights (expert
LoRA, attention LoRA, routers) are kept in float32 by default, as PEFT does, so the optimiser never updates
them in bf16 or fp16; they are cast to the compute dtype in each forward. Routers always compute in float32.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTER_DTYPES = ("float32", "model")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` produce: the autocast dtype where autocast is on for x's device, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def cast_trainable(model: nn.Module, names: list[str], adapter_dtype: str, model_dtype: torch.dtype) -> None:
    """Cast the parameters ``names`` of ``model`` to float32 (``adapter_dtype="float32"``) or to
    ``model_dtype`` (``"model"``); routers stay float32 either way."""
    if adapter_dtype not in ADAPTER_DTYPES:
        raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {adapter_dtype!r}")
    params = dict(model.named_parameters())
    for name in names:
        p = params[name]
        keep_float32 = adapter_dtype == "float32" or "mixlora_router" in name
        dtype = torch.float32 if keep_float32 else model_dtype
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def floating_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's frozen floating-point weights (float32 if it has none, e.g. all quantized)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.dtype.is_floating_point:
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32
