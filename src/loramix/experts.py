"""The expert maths shared by every mixture in loramix: LoRA experts on a projection, adapter experts, and
``FrozenFFN``, the public surface of a decoder layer's frozen FFN.

``FrozenFFN`` is the base class of every module that wraps a model's FFN (``MixLoraFFN``, continual
learning's ``GrowableFFN``): it holds the frozen FFN under ``base`` (so checkpoints name the same keys) and
its ``FFNSpec``, and gives the pieces a mixture needs: the frozen projections, the activation, the down
projection with its bias counted once per token, and the FFN's own output dropout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .ffn_spec import FFNSpec, linear_weight
from .precision import compute_dtype


class FrozenFFN(nn.Module):
    """A decoder layer's frozen FFN (``base``, described by ``spec``) as pieces a mixture combines."""

    def __init__(self, base: nn.Module, spec: FFNSpec) -> None:
        super().__init__()
        self.base = base
        self.spec = spec

    def proj(self, role: str) -> nn.Module:
        """The frozen projection of ``role`` (gate, up or down)."""
        return getattr(self.base, getattr(self.spec, role))

    @property
    def act(self) -> nn.Module:
        return getattr(self.base, self.spec.act)

    def activation(self, up: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """``act(gate) * up`` for a gated FFN, ``act(up)`` otherwise; (rows, I)."""
        return self.act(gate) * up if gate is not None else self.act(up)

    def frozen_projections(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen up and gate projections of x (T, H): (T, I) each, gate None for an ungated FFN."""
        up = self.proj("up")(x).to(dtype)
        gate = self.proj("gate")(x).to(dtype) if self.spec.gated else None
        return up, gate

    def down_bias(self) -> torch.Tensor | None:
        return getattr(self.proj("down"), "bias", None)

    def project_down(self, mixed: torch.Tensor, coverage: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The frozen down projection of a weighted sum of activations ``mixed`` (T, I) -> (T, H).

        ``down(sum_e w_e h_e)`` adds the bias once, while the mixture of FFN outputs adds it ``coverage``
        (T,) = ``sum_e w_e`` times, so ``coverage - 1`` more biases are added here.
        """
        out = self.proj("down")(mixed).to(dtype)
        bias = self.down_bias()
        if bias is not None:
            out = out + (coverage - 1.0).to(dtype)[:, None] * bias.to(dtype)
        return out

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The base FFN's own output dropout (GPT-2), if any."""
        return getattr(self.base, self.spec.dropout)(y) if self.spec.dropout else y

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen FFN alone, without its output dropout: (T, H) -> (T, H)."""
        gate = self.proj("gate")(x) if self.spec.gated else None
        return self.proj("down")(self.activation(self.proj("up")(x), gate))

    @torch.no_grad()
    def frozen_weights(self) -> dict[str, torch.Tensor]:
        """Detached float32 copies of the frozen projections' weights by role, each (out, in)."""
        return {role: linear_weight(self.proj(role)).detach().float().clone() for role in self.spec.roles()}


class ExpertLoRA(nn.Module):
    """LoRA weights of E experts on one projection: ``delta_e(x) = scaling * x A_e^T B_e^T``."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int, scaling: float) -> None:
        super().__init__()
        self.scaling = scaling
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features))  # (E, r, in)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r))  # (E, out, r)
        for a in self.lora_A:  # PEFT's init: B = 0 makes every expert start as the frozen FFN
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Delta of expert ``e`` for all rows of ``x`` (rows, in) -> (rows, out), in the compute dtype."""
        x = x.to(compute_dtype(x))
        a, b = self.lora_A[e].to(x.dtype), self.lora_B[e].to(x.dtype)
        return ((x @ a.t()) * self.scaling) @ b.t()  # scale the (rows, r) product, not the wide output

    @torch.no_grad()
    def merged_delta(self, e: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Expert ``e``'s weight delta ``scaling * B_e @ A_e`` (out, in), in ``dtype`` (float64: merging adds
        no rounding beyond the final cast)."""
        return self.scaling * (self.lora_B[e].to(dtype) @ self.lora_A[e].to(dtype))  # (out, in)

    @torch.no_grad()
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached float32 copies of the stacked factors: A (E, r, in) and B (E, out, r), scaling not folded in."""
        return self.lora_A.detach().float().clone(), self.lora_B.detach().float().clone()


class AdapterExperts(nn.Module):
    """E small FFN experts ``B_e act(A_e x)`` (rank r bottleneck), B = 0 at init."""

    def __init__(self, num_experts: int, hidden: int, r: int, act: nn.Module) -> None:
        super().__init__()
        self.act = act
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, hidden))  # (E, r, H)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, hidden, r))  # (E, H, r)
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        a, b = self.lora_A[e].to(x.dtype), self.lora_B[e].to(x.dtype)
        return self.act(x @ a.t()) @ b.t()

    @torch.no_grad()
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached float32 copies of the stacked factors: A (E, r, H) and B (E, H, r)."""
        return self.lora_A.detach().float().clone(), self.lora_B.detach().float().clone()
