"""Static baseline: PEFT's ``add_weighted_adapter`` merge of plain-LoRA skills, for comparison with the blend.

A static merge applies ONE weight vector to every prompt; the blend applies the gate's weights per prompt.
Only plain-LoRA skills (``adapter="lora"``: a single always-on expert per FFN, i.e. LoRA on each FFN
projection, plus the attention LoRA) have a weight delta that PEFT can merge. A MixLoRA skill (several
experts behind a router that picks experts per token, after the FFN nonlinearity) has no single weight delta,
so it cannot be merged statically: ``loramix_to_peft`` refuses it and the comparison needs LoRA skills.

``combination_type="cat"`` (default) is exact: it concatenates the weighted ranks, so the merged adapter's
delta is ``sum_k w_k s_k B_k A_k`` on every projection, which is what the blend's soft mode computes per
example. PEFT's ``linear`` type scales A and B each by sqrt(w) and sums them separately (cross terms), and the
``svd`` types truncate: both are approximations of that sum.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_adapter
from ..injection import get_state, unload
from .library import SkillLibrary, SkillLibraryError, base_fingerprint


class StaticMergeError(SkillLibraryError):
    """A skill cannot be expressed as a static PEFT LoRA (it is a routed MixLoRA adapter)."""


def loramix_to_peft(model: nn.Module) -> tuple[Any, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The PEFT ``LoraConfig`` and ``{module name: (A, B)}`` equal to the plain-LoRA adapter on ``model``.

    Module names are those of the plain base model. Per-module rank and scaling are kept with
    ``rank_pattern`` / ``alpha_pattern`` (alpha = scaling * r, rslora folded in), so PEFT's LoRA on each
    projection computes exactly what the loramix adapter computes.
    """
    from peft import LoraConfig

    state = get_state(model)
    cfg = state.config
    for name, layer in state.moe_layers.items():
        if layer.num_experts != 1 or layer.expert_type != "mixlora" or cfg.router == "switch":
            raise StaticMergeError(
                f"{name}: a MixLoRA adapter with {layer.num_experts} routed {layer.expert_type} experts "
                f"({cfg.router} router) cannot be merged statically (the router picks experts per token after "
                "the FFN nonlinearity, so no single weight delta reproduces it); train skills with "
                "adapter='lora' to compare against PEFT's add_weighted_adapter"
            )
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    conv1d = False
    for name in state.attn_targets:
        mod = model.get_submodule(name)
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        tensors[name] = (a.detach().clone(), b.detach().clone())
        ranks[name], alphas[name] = a.shape[0], float(mod.scaling["default"]) * a.shape[0]
        conv1d |= type(mod.get_base_layer()).__name__ == "Conv1D"
    for name, layer in state.moe_layers.items():
        for role, lora in layer.mixlora_experts.items():
            proj = f"{name}.{getattr(layer.spec, role)}"
            a, b = lora.lora_A[0], lora.lora_B[0]  # (r, in), (out, r)
            tensors[proj] = (a.detach().clone(), b.detach().clone())
            ranks[proj], alphas[proj] = a.shape[0], float(lora.scaling) * a.shape[0]
            conv1d |= type(layer.proj(role)).__name__ == "Conv1D"
    if not tensors:
        raise StaticMergeError("the adapter has no LoRA weights to merge")
    first = next(iter(tensors))
    config = LoraConfig(
        r=ranks[first], lora_alpha=alphas[first], lora_dropout=0.0, use_rslora=False,
        target_modules=list(tensors), fan_in_fan_out=conv1d,
        rank_pattern={re.escape(n): r for n, r in ranks.items()},
        alpha_pattern={re.escape(n): a for n, a in alphas.items()},
    )
    return config, tensors


def build_static_merge(library: SkillLibrary | str | os.PathLike, weights: dict[str, float] | list[float], *,
                       skills: list[str] | None = None, combination_type: str = "cat", model: str | None = None,
                       device: str | None = None, dtype: str = "auto") -> tuple[nn.Module, Any]:
    """A PEFT model holding every skill as a LoRA adapter plus their weighted merge ``"blend"`` (active).

    ``weights``: one weight per skill (a list in ``skills`` order, or ``{skill: weight}``; missing = 0).
    Returns ``(peft_model, tokenizer)`` in eval mode.
    """
    from peft import get_peft_model

    from ..models import load_base_model

    lib = library if isinstance(library, SkillLibrary) else SkillLibrary.open(library)
    names = lib.resolve_names(skills)
    if isinstance(weights, dict):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise SkillLibraryError(f"weights name unknown skills {unknown}; skills: {names}")
        w = [float(weights.get(n, 0.0)) for n in names]
    else:
        w = [float(x) for x in weights]
        if len(w) != len(names):
            raise SkillLibraryError(f"{len(w)} weights for {len(names)} skills ({names})")
    base, tok = load_base_model(model or lib.model_spec, device=device, dtype=dtype)
    lib.check_base(base_fingerprint(base), model or lib.model_spec)
    converted = []
    for name in names:
        load_adapter(base, lib.adapter_path(name))
        try:
            converted.append(loramix_to_peft(base))
        finally:
            unload(base)
    peft_model = None
    for name, (config, _) in zip(names, converted, strict=True):
        if peft_model is None:
            peft_model = get_peft_model(base, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, (_, tensors) in zip(names, converted, strict=True):
            for module_name, (a, b) in tensors.items():
                mod = inner.get_submodule(module_name)
                mod.lora_A[name].weight.copy_(a)
                mod.lora_B[name].weight.copy_(b)
    peft_model.add_weighted_adapter(names, w, "blend", combination_type=combination_type)
    peft_model.set_adapter("blend")
    for p in peft_model.parameters():
        p.requires_grad_(False)
    return peft_model.eval(), tok
