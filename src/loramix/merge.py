"""Fold adapters into the base weights for deployment."""

from __future__ import annotations

import torch
from torch import nn

from .injection import drop_state, get_state
from .quantized import refuse_quantized


def _attention_bases(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    return {name: model.get_submodule(name).get_base_layer() for name in names}


def merge_attention(model: nn.Module) -> nn.Module:
    """Fold the attention LoRA into the frozen attention weights and drop the LoRA modules."""
    state = get_state(model)
    refuse_quantized(_attention_bases(model, state.attn_targets), "merge the attention LoRA")
    for name in state.attn_targets:
        module = model.get_submodule(name)
        module.merge()
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    state.attn_targets = []
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge everything into a plain model. Only single-expert FFN layers can be merged: a routed
    mixture of several experts is not one weight matrix (use merge_attention for those models)."""
    state = get_state(model)
    for name, layer in state.moe_layers.items():
        if layer.num_experts != 1 or layer.expert_type != "mixlora" or state.config.router == "switch":
            raise ValueError(
                f"{name}: cannot merge {layer.num_experts} {layer.expert_type} experts "
                f"({state.config.router} router); only one 'mixlora' expert without capacity dropping merges"
            )
    projections = {f"{name}.base.{getattr(layer.spec, role)}": layer.proj(role)
                   for name, layer in state.moe_layers.items() for role in layer.mixlora_experts}
    refuse_quantized({**_attention_bases(model, state.attn_targets), **projections}, "merge the adapter")
    merge_attention(model)
    for name, layer in state.moe_layers.items():
        for role, lora in layer.mixlora_experts.items():
            proj = layer.proj(role)
            delta = lora.scaling * (lora.lora_B[0] @ lora.lora_A[0])  # (out, in)
            if isinstance(proj, nn.Linear):
                proj.weight += delta.to(proj.weight.dtype)
            else:  # Conv1D stores (in, out)
                proj.weight += delta.t().to(proj.weight.dtype)
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, layer.base)
    for h in state.hooks:
        h.remove()
    for n, p in model.named_parameters():  # a plain model again: the user's requires_grad flags
        p.requires_grad_(state.original_requires_grad.get(n, p.requires_grad))
    drop_state(model)
    return model
