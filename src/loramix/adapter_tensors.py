"""Which tensors are an adapter's, and the identity of the frozen base weights they were trained on.

The lowest layer under injection, checkpoints and the readers of foreign formats: all of them ask the same
rule (:func:`is_trainable_name`) and take the same digest of the base (:func:`base_weights_digest`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

TRAINABLE_MARKERS = ("lora_", "mixlora_")
"""The rule for what an adapter checkpoint holds: every tensor whose name contains one of these, i.e. PEFT's
attention LoRA (``lora_A``/``lora_B``) and each MoE layer's ``mixlora_*`` modules (router weight and balance
buffers, expert LoRA, adapter scale). The same names are the trainable parameters; the frozen base is never
saved."""


def is_trainable_name(name: str) -> bool:
    """True for an adapter tensor (see ``TRAINABLE_MARKERS``): trained, saved and loaded by loramix."""
    return any(marker in name for marker in TRAINABLE_MARKERS)


@torch.no_grad()
def base_weights_digest(model: nn.Module, sample: int = 4096) -> dict[str, Any]:
    """A cheap digest of the frozen base weights, to tell two bases of one architecture apart.

    Every floating-point parameter that is not an adapter's contributes its shape and ``sample`` evenly
    spaced values cast to bfloat16 (so float32 and bfloat16 loads of one checkpoint agree). The per-tensor
    hashes are sorted before hashing, so the digest does not depend on module names: it is the same for
    the bare base and for the base with adapters injected. ``tensors`` counts what was hashed (a quantized
    base hashes fewer tensors and is not comparable).
    """
    hashes = []
    for name, p in model.named_parameters():
        if is_trainable_name(name) or not p.is_floating_point():
            continue
        flat = p.detach().reshape(-1)  # (numel,) every value of the parameter
        picked = flat[:: max(1, flat.numel() // sample)][:sample]
        h = hashlib.sha256(str(tuple(p.shape)).encode())
        h.update(picked.to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
        hashes.append(h.hexdigest())
    return {"tensors": len(hashes), "sample_sha256": hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest()}
