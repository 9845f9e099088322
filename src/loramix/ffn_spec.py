"""Recognise a model's FFN: which child is the gate, up and down projection, and its activation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import FFN_ROLES
from .quantized import refuse_quantized

# Known layouts, tried in order: role -> child name.
KNOWN_LAYOUTS: list[dict[str, str]] = [
    {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},  # Llama, Mistral, Qwen2, Gemma, SmolLM2
    {"gate": "w1", "up": "w3", "down": "w2"},  # Mixtral-style experts
    {"up": "c_fc", "down": "c_proj"},  # GPT-2
    {"up": "fc1", "down": "fc2"},  # Phi, OPT
    {"up": "dense_h_to_4h", "down": "dense_4h_to_h"},  # GPT-NeoX
]
ACT_NAMES = ("act_fn", "act", "activation_fn", "activation")
DROPOUT_NAMES = ("dropout",)


class FFNNotSupportedError(ValueError):
    """The model's FFN lacks a projection loramix was asked to adapt."""


@dataclass(frozen=True)
class FFNSpec:
    """Child names of one FFN: y = down(act(gate(x)) * up(x)) or y = down(act(up(x)))."""

    up: str
    down: str
    act: str
    gate: str | None = None
    dropout: str | None = None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def roles(self) -> list[str]:
        return [r for r in FFN_ROLES if getattr(self, r) is not None]


def _children_summary(mlp: nn.Module) -> str:
    return ", ".join(f"{n} ({type(m).__name__})" for n, m in mlp.named_children()) or "no children"


def detect_ffn(mlp: nn.Module, names: dict[str, str] | None = None) -> FFNSpec:
    """Find the projections of ``mlp``; ``names`` overrides the role -> child-name mapping."""
    children = dict(mlp.named_children())
    layouts = [names] if names else KNOWN_LAYOUTS
    for layout in layouts:
        if all(layout.get(role) in children for role in ("up", "down")) and (
            "gate" not in layout or layout["gate"] in children
        ):
            break
    else:
        wanted = names if names else " or ".join(str(lay) for lay in KNOWN_LAYOUTS)
        raise FFNNotSupportedError(
            f"{type(mlp).__name__} has no recognised FFN projections (looked for {wanted}); it has: "
            f"{_children_summary(mlp)}. Pass MixLoraConfig(ffn_names={{'gate': ..., 'up': ..., 'down': ...}})."
        )
    act = next((n for n in ACT_NAMES if hasattr(mlp, n)), None)
    if act is None:
        raise FFNNotSupportedError(
            f"{type(mlp).__name__} has no activation attribute (looked for {ACT_NAMES}); it has: "
            f"{_children_summary(mlp)}"
        )
    dropout = next((n for n in DROPOUT_NAMES if isinstance(children.get(n), nn.Dropout)), None)
    return FFNSpec(up=layout["up"], down=layout["down"], act=act, gate=layout.get("gate"), dropout=dropout)


def check_targets(spec: FFNSpec, targets: list[str] | None, mlp: nn.Module) -> list[str]:
    """Resolve expert targets (None = every projection the FFN has); error on a missing one."""
    if targets is None:
        return spec.roles()
    missing = [t for t in targets if getattr(spec, t) is None]
    if missing:
        raise FFNNotSupportedError(
            f"expert_targets asks for {missing} but {type(mlp).__name__} has no such projection; "
            f"it has roles {spec.roles()} ({_children_summary(mlp)})"
        )
    return list(targets)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(module, nn.Linear) or hasattr(module, "in_features"):
        return module.in_features, module.out_features
    weight = module.weight  # transformers Conv1D stores (in, out)
    return weight.shape[0], weight.shape[1]


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in), whichever layout the module stores; a bitsandbytes-quantized layer is refused."""
    refuse_quantized({type(module).__name__: module}, "read a dense weight (merge or export)")
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()  # Conv1D (in, out) -> (out, in)
