"""The one-token decoding step of a MixLoRA layer as a pure function of tensors, for ``torch.compile``.

Compiling :meth:`MixLoraFFN.route_pairwise` (a method reading the layer's submodules) makes dynamo check
some hundred guards on the module tree before every call: about 80 us per layer and token on one CPU core,
2.5 ms per token for the 30 layers of SmolLM2. :func:`decode_step` takes the layer's tensors as arguments and
its settings as one small frozen :class:`DecodeSpec`, so the guards are those tensors' shapes plus a few
constants, and one compiled graph serves every layer with the same settings.

It covers plain ``nn.Linear`` / GPT-2 ``Conv1D`` projections, the built-in routers and parameter-free
activations; :func:`decode_spec` returns None for anything else and the layer compiles the method instead.
The method (``MixLoraFFN.mixlora_pairwise`` after the router) is the reference it is tested against.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .routers import (
    DenseRouter,
    NoisyTopKRouter,
    Routing,
    SwitchRouter,
    TopKRouter,
    TopPRouter,
    mask_padding,
    select_dense,
    select_switch,
    select_top_p,
    select_topk,
)

if TYPE_CHECKING:
    from .layer import MixLoraFFN

ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class DecodeSpec:
    """Everything about a layer that is not a tensor; equal specs share one compiled graph."""

    rule: str  # "topk", "switch", "dense" or "top_p" (noisy top-k decodes as top-k: no noise in eval)
    rule_param: float  # top_k, capacity_factor, unused, top_p
    act: nn.Module  # one shared instance per activation kind (see shared_activation)
    gated: bool
    targets: tuple[str, ...]  # roles that carry expert LoRA
    scaling: float


class DecodeTensors(NamedTuple):
    """The tensors one decoding step reads; frozen weights in (out, in) layout, absent ones None."""

    router_weight: torch.Tensor  # (E, H) float32
    balance_bias: torch.Tensor  # (E,)
    weight: tuple[torch.Tensor | None, ...]  # per role of ROLES
    bias: tuple[torch.Tensor | None, ...]
    lora_A: tuple[torch.Tensor | None, ...]  # (E, r, in)
    lora_B: tuple[torch.Tensor | None, ...]  # (E, out, r)


_RULES = {
    TopKRouter: "topk", NoisyTopKRouter: "topk", SwitchRouter: "switch", DenseRouter: "dense", TopPRouter: "top_p"
}
_SHARED_ACTS: dict[tuple, nn.Module] = {}
_ACT_OF: weakref.WeakKeyDictionary[nn.Module, nn.Module | None] = weakref.WeakKeyDictionary()


def shared_activation(act: nn.Module) -> nn.Module | None:
    """One instance per (type, settings) of a parameter-free activation, so that dynamo sees the same object in
    every layer (a per-layer instance would cost a recompile per layer); None if ``act`` has state."""
    if act in _ACT_OF:
        return _ACT_OF[act]
    shared = None
    if not any(True for _ in act.parameters()) and not any(True for _ in act.buffers()) and not list(act.children()):
        settings = tuple(sorted((k, v) for k, v in vars(act).items() if not k.startswith("_") and k != "training"))
        try:
            shared = _SHARED_ACTS.setdefault((type(act), settings), act)
        except TypeError:  # an unhashable setting: not shareable
            shared = None
    _ACT_OF[act] = shared
    return shared


def _is_plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or type(module).__name__ == "Conv1D"


def decode_spec(layer: MixLoraFFN) -> DecodeSpec | None:
    """The layer's :class:`DecodeSpec`, or None when :func:`decode_step` cannot run it (an unknown router,
    a quantised or custom projection, an activation with state, a base dropout still in training mode)."""
    router = layer.mixlora_router
    rule = _RULES.get(type(router))
    act = shared_activation(layer.act)
    if rule is None or act is None or layer.expert_type != "mixlora":
        return None
    if not all(_is_plain_linear(layer.proj(role)) for role in layer.spec.roles()):
        return None
    if layer.spec.dropout and getattr(layer.base, layer.spec.dropout).training:
        return None
    scalings = {layer.mixlora_experts[role].scaling for role in layer.targets}
    if len(scalings) > 1:
        return None
    param = {"topk": getattr(router, "top_k", 0), "switch": getattr(router, "capacity_factor", 0.0),
             "top_p": getattr(router, "top_p", 0.0)}.get(rule, 0.0)
    scaling = scalings.pop() if scalings else 1.0
    return DecodeSpec(rule, float(param), act, layer.spec.gated, tuple(layer.targets), scaling)


def decode_tensors(layer: MixLoraFFN) -> DecodeTensors:
    """The layer's tensors for :func:`decode_step` (views, no copies)."""
    roles = [role if getattr(layer.spec, role) is not None else None for role in ROLES]
    projs = [layer.proj(role) if role else None for role in roles]
    weight = tuple(
        None if p is None else (p.weight if type(p) is nn.Linear else p.weight.t())  # Conv1D: (in, out)
        for p in projs
    )
    bias = tuple(getattr(p, "bias", None) for p in projs)
    lora = [layer.mixlora_experts[role] if role in layer.targets else None for role in ROLES]
    return DecodeTensors(
        layer.mixlora_router.weight,
        layer.mixlora_router.balance_bias,
        weight,
        bias,
        tuple(None if e is None else e.lora_A for e in lora),
        tuple(None if e is None else e.lora_B for e in lora),
    )


def route(x: torch.Tensor, token_mask: torch.Tensor, t: DecodeTensors, spec: DecodeSpec) -> Routing:
    """The router in eval mode: float32 logits, the balance bias on the selection scores only."""
    logits = F.linear(x.float(), t.router_weight.float())  # (T, E)
    scores = logits + t.balance_bias  # (T, E)
    if spec.rule == "topk":
        routing = select_topk(logits, scores, int(spec.rule_param))
    elif spec.rule == "switch":
        routing = select_switch(logits, scores, token_mask, spec.rule_param)
    elif spec.rule == "dense":
        routing = select_dense(logits)
    else:
        routing = select_top_p(logits, spec.rule_param)
    return mask_padding(routing, token_mask)


def pair_delta(
    inp: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, experts: torch.Tensor, scaling: float
) -> torch.Tensor:
    """LoRA delta of each pair's expert: input (N, in), expert ids (N,) -> (N, out)."""
    a = lora_a.index_select(0, experts).to(inp.dtype)  # (N, r, in)
    b = lora_b.index_select(0, experts).to(inp.dtype)  # (N, out, r)
    z = torch.bmm(inp[:, None, :], a.transpose(1, 2)) * scaling  # (N, 1, r)
    return torch.bmm(z, b.transpose(1, 2)).squeeze(1)  # (N, out)


def decode_step(
    x: torch.Tensor, token_mask: torch.Tensor | None, t: DecodeTensors, spec: DecodeSpec
) -> tuple[torch.Tensor, Routing]:
    """Router and experts for a few tokens x (T, H): the same sums as ``MixLoraFFN.route_pairwise``."""
    if token_mask is None:
        token_mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    routing = route(x, token_mask, t, spec)
    num_tokens, k = routing.indices.shape
    experts = routing.indices.reshape(-1)  # (N,) N = T*k, slot-major within each token
    weight = (routing.weights * routing.mask).to(x.dtype)  # (T, k) 0 for unused slots
    (w_gate, w_up, w_down), (b_gate, b_up, b_down) = t.weight, t.bias
    up = F.linear(x, w_up, b_up)  # (T, I)
    gate = F.linear(x, w_gate, b_gate) if spec.gated else None  # (T, I)
    pair_x = x.repeat_interleave(k, dim=0)  # (N, H)
    pair_up = up.repeat_interleave(k, dim=0)  # (N, I)
    if "up" in spec.targets:
        pair_up = pair_up + pair_delta(pair_x, t.lora_A[1], t.lora_B[1], experts, spec.scaling)
    pair_gate = None
    if gate is not None:
        pair_gate = gate.repeat_interleave(k, dim=0)  # (N, I)
        if "gate" in spec.targets:
            pair_gate = pair_gate + pair_delta(pair_x, t.lora_A[0], t.lora_B[0], experts, spec.scaling)
    h = spec.act(pair_gate) * pair_up if pair_gate is not None else spec.act(pair_up)  # (N, I)
    mixed = torch.bmm(weight[:, None, :], h.view(num_tokens, k, -1)).squeeze(1)  # (T, I)
    dropped = (~routing.mask.any(dim=-1)).to(x.dtype)  # (T,) tokens no expert took: frozen FFN
    plain = spec.act(gate) * up if gate is not None else spec.act(up)  # (T, I)
    out = F.linear(mixed + dropped[:, None] * plain, w_down)  # (T, H)
    if b_down is not None:  # once per unit of routing weight, and once for a dropped token
        out = out + (weight.sum(dim=-1) + dropped)[:, None] * b_down
    if "down" in spec.targets:
        delta = pair_delta(h, t.lora_A[2], t.lora_B[2], experts, spec.scaling)  # (N, H)
        out = out + torch.bmm(weight[:, None, :], delta.view(num_tokens, k, -1)).squeeze(1)  # (T, H)
    return out, routing
