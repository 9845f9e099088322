"""Dropout with a cheaper mask on CPU.

On CPU, ``torch.nn.functional.dropout`` draws one Bernoulli sample per element. :class:`FastDropout` keeps
the same distribution (each element kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``) but cuts
four 16-bit uniforms out of every 64-bit draw. ``p`` is quantised to a multiple of 1/65536. docs/benchmarks.md
gives its cost against ``F.dropout``. On other devices, and as the reference, it is plain ``F.dropout``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LANES = 4  # int16 uniforms per int64 draw


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool mask of ``shape``, each element True with probability ``1 - p`` (to 1/65536)."""
    n = math.prod(shape)
    draws = torch.randint(-(2**63), 2**63 - 1, ((n + _LANES - 1) // _LANES,), dtype=torch.int64, device=device)
    bits = draws.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    threshold = round(p * 65536) - 32768  # P(bits >= threshold) = 1 - p
    return bits >= threshold


def unscaled_dropout(x: torch.Tensor, p: float, training: bool = True) -> tuple[torch.Tensor, float]:
    """``(x * mask, 1 / (1 - p))``: dropout without its rescale, and the factor, so that a caller feeding a
    linear map can apply it to the map's (narrower) output instead of to ``x``. On CPU the mask comes from
    :func:`keep_mask`; elsewhere (plain ``F.dropout``, already rescaled) and in eval mode the factor is 1."""
    if not training or p == 0.0:
        return x, 1.0
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True), 1.0
    # the bool mask viewed as uint8 (no copy): on CPU float * uint8 is cheaper than float * bool, in forward and in
    # the backward's grad * mask
    return x * keep_mask(x.shape, p, x.device).view(torch.uint8), 1.0 / (1.0 - p)


def dropout_keep_mask(x: torch.Tensor, p: float, training: bool = True) -> tuple[torch.Tensor | None, float]:
    """The keep-mask :func:`unscaled_dropout` would multiply ``x`` by, as uint8 (None when nothing is dropped),
    and the factor 1/(1-p), for code that applies the mask itself (and keeps it, a quarter of a float32 copy)."""
    if not training or p == 0.0:
        return None, 1.0
    if x.device.type != "cpu" or p >= 1.0:
        mask = torch.empty(x.shape, device=x.device).bernoulli_(1.0 - p).to(torch.uint8)
    else:
        mask = keep_mask(x.shape, p, x.device).view(torch.uint8)
    return mask, 1.0 / (1.0 - p) if p < 1.0 else 0.0


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` semantics; on CPU the mask comes from :func:`keep_mask`."""
    kept, factor = unscaled_dropout(x, p, training)
    return kept * factor if factor != 1.0 else kept


class FastDropout(nn.Dropout):
    """Drop-in ``nn.Dropout`` using :func:`fast_dropout` (same ``p``, ``train``/``eval`` behaviour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)

    def unscaled(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """:func:`unscaled_dropout` with this module's ``p`` and mode."""
        return unscaled_dropout(x, self.p, self.training)


def use_fast_dropout(module: nn.Module) -> int:
    """Swap every ``nn.Dropout`` under ``module`` whose name marks it as LoRA's (PEFT's ``lora_dropout``)
    for a :class:`FastDropout` with the same ``p``; returns how many were swapped."""
    swapped = 0
    for name, child in list(module.named_modules()):
        if "lora_dropout" not in name:
            continue
        for key, sub in list(child.named_children()):
            if type(sub) is nn.Dropout:
                fast = FastDropout(sub.p)
                fast.train(sub.training)
                setattr(child, key, fast)  # also right for PEFT's ModuleDict({'default': Dropout})
                swapped += 1
    return swapped
