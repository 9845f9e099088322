"""The elementwise work of a MixLoRA layer's training step, fused on CPU.

A MixLoRA layer's training step runs chains of elementwise ops over (N, I) tensors, N = tokens x slots and
I the FFN's intermediate size: each pair's gate/up rows gathered and added to their LoRA deltas
(:class:`loramix.grouped.GatherRows`); the activation, its product with ``up``, the routing weight and the
dropout mask (:class:`loramix.grouped.MixPairs`); in backward the activation again, the chain rule and the sum
of each token's pairs. Each eager op reads and writes whole (N, I) tensors, and on a CPU that memory traffic,
not the arithmetic, is what the ops cost (at top-2 the layer touches twice the rows a plain LoRA does).

:func:`gather_add`, :func:`pairs_forward`, :func:`pairs_backward` and :func:`token_sums` write each chain as
plain torch, which is also the reference. On CPU :func:`run` compiles them with ``torch.compile`` (inductor:
a loop or two of C++ per chain instead of a dozen ops). Elsewhere, with ``FUSE = False``, for activations
other than SiLU, or once compiling has failed (no C++ compiler, say: logged once), the callers keep their
eager ops. The first call of each variant (gated or not, mask, down LoRA, dtype) compiles, a second or two
each; shapes are dynamic, so batches of other lengths reuse it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from transformers.activations import SiLUActivation

logger = logging.getLogger(__name__)

FUSE = True  # False: MixPairs keeps its eager ops (tests of both routes, or to rule the compiler out)
RECOMPILE_LIMIT = 64  # variants per function: gated x masked x down LoRA x dtype, each compiled once
# inductor stores an intermediate that several expressions read (here the activation, its gradient) and reloads
# it; recomputing it inside the one loop is cheaper, as memory, not arithmetic, is what these passes cost
INDUCTOR_OPTIONS = {"realize_reads_threshold": 100}

_compiled: dict[str, Callable[..., Any]] = {}
_failure: str | None = None  # why compiling failed, once it has: every later call runs eagerly


def pairs_forward(
    up: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, mask: torch.Tensor | None, masked_out: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h = silu(gate) * up`` (``silu(up)`` without a gate), (N, I); returns ``h * weight`` (weight (N, 1)) and,
    with ``masked_out``, the down LoRA's input ``h * mask`` (mask uint8 (N, I), or None: h)."""
    h = F.silu(gate) * up if gate is not None else F.silu(up)  # (N, I)
    if not masked_out:
        return h * weight, None
    return h * weight, h * mask if mask is not None else h


def pairs_backward(
    up: torch.Tensor, gate: torch.Tensor | None, grad_mixed: torch.Tensor, token: torch.Tensor, weight: torch.Tensor,
    mask: torch.Tensor | None, grad_hk: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """The backward of ``mixed = sum over a token's pairs of weight * h`` and of the down LoRA's input
    ``hk = mask * h``, with h recomputed from the pre-activations up, gate (N, I).

    grad_mixed (T, I) per token, token (N,) each pair's token, weight (N, 1), grad_hk (N, I) the gradient that
    reached hk (None without down LoRA). Returns the gradient of weight (N, 1), hk (N, I) for the down LoRA's
    weight gradient (None when grad_hk is None), and the gradients of up and gate (N, I) (gate: None without
    a gate).
    """
    pre = gate if gate is not None else up  # (N, I) the activation's input
    sig = torch.sigmoid(pre)  # (N, I)
    act = pre * sig  # (N, I) silu(pre)
    h = act * up if gate is not None else act  # (N, I)
    grad_pair = grad_mixed.index_select(0, token)  # (N, I) each pair's token's gradient
    grad_weight = (grad_pair * h).sum(-1, keepdim=True)  # (N, 1)
    grad_h = grad_pair * weight  # (N, I)
    hk = None
    if grad_hk is not None:
        hk = h * mask if mask is not None else h
        grad_h = grad_h + (grad_hk * mask if mask is not None else grad_hk)
    silu_grad = sig * (1 + pre * (1 - sig))  # (N, I) d silu(pre) / d pre
    if gate is None:
        return grad_weight, hk, grad_h * silu_grad, None
    return grad_weight, hk, grad_h * act, grad_h * up * silu_grad


def gather_add(frozen: torch.Tensor, token: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Each pair's row of a per-token tensor plus its own delta: frozen (T, I), token (N,), delta (N, I) -> (N, I)."""
    return frozen.index_select(0, token) + delta


def token_sums(grad: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The sum over each token's pairs of a per-pair tensor: grad (N, I), slots (T, K) the rows of each token's
    pairs -> (T, I)."""
    total = grad.index_select(0, slots[:, 0])  # (T, I)
    for k in range(1, slots.shape[1]):  # K is small and fixed: one term per slot, not a reduction over K
        total = total + grad.index_select(0, slots[:, k])
    return total


def is_silu(act: nn.Module) -> bool:
    """``nn.SiLU`` or transformers' ``SiLUActivation`` (``F.silu``, not an ``nn.SiLU`` subclass): what Llama,
    Mistral, Qwen and SmolLM2 FFNs use."""
    return isinstance(act, nn.SiLU | SiLUActivation)


def fusable(x: torch.Tensor, act: nn.Module | None = None) -> bool:
    """Whether to :func:`run` a fused pass on ``x``: CPU, ``FUSE`` on, no failure yet, a SiLU ``act`` for the
    passes that apply one, and neither inside a ``torch.compile`` trace nor under a ``TorchDispatchMode`` (an op
    counter, say: it sees the eager ops, and ``torch.compile`` does not run under one)."""
    return (FUSE and _failure is None and x.device.type == "cpu" and (act is None or is_silu(act))
            and not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode(include_infra_modes=False))


def run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` through its compiled form (:func:`fusable` decides when to call this); eagerly from the
    first failure to compile on."""
    global _failure
    if _failure is None:
        compiled = _compiled.get(fn.__name__)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True, options=INDUCTOR_OPTIONS)
            _compiled[fn.__name__] = compiled
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return compiled(*args)
        except Exception as e:  # noqa: BLE001 - any backend failure: the eager ops compute the same
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            _failure = f"{type(e).__name__}: {first_line}"
            logger.warning("fusing MixLoRA's elementwise ops with torch.compile failed (%s); they run eagerly from "
                           "now on, slower on CPU (a working C++ compiler, g++ or clang, makes them fused)", _failure)
    return fn(*args)
