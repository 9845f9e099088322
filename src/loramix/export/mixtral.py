"""The ``mixtral`` target: Llama- and Mistral-family bases as a Mixtral checkpoint.

SmolLM2's tied embeddings are written as an explicit ``lm_head``; Llama-3 rope scaling is carried over.
Mixtral has no dense layers: a layer without experts holds the frozen FFN in every expert (the weights sum to 1).
"""

from __future__ import annotations

from typing import Any

import torch

from .moe import StandardMoETarget
from .target import ExportError, ExportPlan


class MixtralTarget(StandardMoETarget):
    name = "mixtral"
    bases = ("llama", "mistral")
    architecture = "MixtralForCausalLM"
    config_class = "MixtralConfig"
    frozen_layer_note = "layers without experts hold the frozen FFN in every expert (the weights sum to 1)"

    def check_base(self, cfg: Any) -> None:
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(cfg, flag, False):
                raise ExportError(f"this {cfg.model_type} base has {flag}=True, which Mixtral lacks; cannot export it")
        super().check_base(cfg)

    def moe_fields(self, base_cfg: Any, plan: ExportPlan) -> dict[str, Any]:
        head_dim = getattr(base_cfg, "head_dim", None) or base_cfg.hidden_size // base_cfg.num_attention_heads
        return {"num_local_experts": plan.num_experts, "router_jitter_noise": 0.0, "head_dim": head_dim}

    def gate_key(self, prefix: str) -> str:
        return f"{prefix}.block_sparse_moe.gate.weight"

    def expert_keys(self, prefix: str, e: int) -> dict[str, str]:
        p = f"{prefix}.block_sparse_moe.experts.{e}"
        return {"gate": f"{p}.w1.weight", "up": f"{p}.w3.weight", "down": f"{p}.w2.weight"}

    def dense_layer(self, out: dict[str, torch.Tensor], prefix: str, frozen: dict[str, torch.Tensor],
                    plan: ExportPlan, hidden: int) -> bool:
        return False
