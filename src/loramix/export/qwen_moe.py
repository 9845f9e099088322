"""The ``qwen2_moe`` and ``qwen3_moe`` targets: Qwen2 and Qwen3 bases as Qwen-MoE checkpoints.

Qwen2-MoE always adds a sigmoid-gated shared expert; its weights are written as zeros, so its output is
exactly 0 whatever the gate says. Qwen3-MoE has no shared expert. Layers without experts are dense
(``mlp_only_layers``).
"""

from __future__ import annotations

from typing import Any

import torch

from .moe import StandardMoETarget
from .target import ExportPlan

#: Width of Qwen2-MoE's shared expert, whose weights are all zero (a small, quantisable width; its output is 0)
QWEN2_MOE_SHARED_WIDTH = 32


class QwenMoETarget(StandardMoETarget):
    def moe_fields(self, base_cfg: Any, plan: ExportPlan) -> dict[str, Any]:
        intermediate = base_cfg.intermediate_size
        fields = {"num_experts": plan.num_experts, "moe_intermediate_size": intermediate,
                  "intermediate_size": intermediate, "norm_topk_prob": True, "decoder_sparse_step": 1,
                  "mlp_only_layers": [i for i, n in enumerate(plan.layer_experts) if n == 0]}
        if getattr(base_cfg, "head_dim", None):
            fields["head_dim"] = base_cfg.head_dim
        return fields

    def gate_key(self, prefix: str) -> str:
        return f"{prefix}.mlp.gate.weight"

    def expert_keys(self, prefix: str, e: int) -> dict[str, str]:
        return {role: f"{prefix}.mlp.experts.{e}.{role}_proj.weight" for role in ("gate", "up", "down")}


class Qwen2MoETarget(QwenMoETarget):
    name = "qwen2_moe"
    bases = ("qwen2",)
    architecture = "Qwen2MoeForCausalLM"
    config_class = "Qwen2MoeConfig"
    extra_notes = ("Qwen2-MoE's shared expert is written with zero weights: its output is exactly 0",)

    def moe_fields(self, base_cfg: Any, plan: ExportPlan) -> dict[str, Any]:
        return super().moe_fields(base_cfg, plan) | {"shared_expert_intermediate_size": QWEN2_MOE_SHARED_WIDTH,
                                                      "qkv_bias": True}

    def extra_layer_tensors(self, out: dict[str, torch.Tensor], prefix: str, hidden: int) -> None:
        width = QWEN2_MOE_SHARED_WIDTH  # a shared expert that adds exactly zero
        out[f"{prefix}.mlp.shared_expert.gate_proj.weight"] = torch.zeros(width, hidden)
        out[f"{prefix}.mlp.shared_expert.up_proj.weight"] = torch.zeros(width, hidden)
        out[f"{prefix}.mlp.shared_expert.down_proj.weight"] = torch.zeros(hidden, width)
        out[f"{prefix}.mlp.shared_expert_gate.weight"] = torch.zeros(1, hidden)


class Qwen3MoETarget(QwenMoETarget):
    name = "qwen3_moe"
    bases = ("qwen3",)
    architecture = "Qwen3MoeForCausalLM"
    config_class = "Qwen3MoeConfig"
