"""inject(): freeze a causal LM, add PEFT LoRA on attention and swap each FFN for a MixLoraFFN.

The model object is modified in place and returned; it stays an ordinary ``nn.Module`` (and the same
``PreTrainedModel`` class), so ``generate``, ``.to()``, ``state_dict()``, HF Trainer and
``torch.compile`` keep working. Two forward hooks carry the padding mask to the MoE layers and add the
router aux loss to ``output.loss``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .adapter_tensors import base_weights_digest, is_trainable_name
from .config import MixLoraConfig
from .dropout import use_fast_dropout
from .ffn_spec import check_targets, detect_ffn
from .losses import aux_loss, router_entropy, tokens_per_expert
from .moe_layer import MixLoraFFN
from .precision import cast_trainable, floating_dtype
from .quantized import keep_trainable_layout, logical_shape
from .routers import record_assignments, update_balance_biases

ATTN_CANDIDATES = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj", "query_key_value", "qkv_proj")
STATE_ATTR = "loramix_state"


@dataclass
class LoramixState:
    """What inject() attached to a model: needed to save, unload and compute the aux loss."""

    config: MixLoraConfig
    fingerprint: dict[str, Any]
    base_model_name: str | None
    num_layers: int
    attn_targets: list[str]
    moe_layers: dict[str, MixLoraFFN] = field(default_factory=dict)  # full module name -> layer
    original_requires_grad: dict[str, bool] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)
    added_peft_config: bool = False  # PEFT set model.peft_config; unload removes it
    marked_adapted: bool = False  # inject set _hf_peft_config_loaded on a quantized base; unload clears it
    base_weights: dict[str, Any] | None = None  # adapter_tensors.base_weights_digest of the base, taken at inject


def get_state(model: nn.Module) -> LoramixState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("this model has no loramix adapters; call loramix.inject(model, config) first")
    return state


def get_config(model: nn.Module) -> MixLoraConfig:
    return get_state(model).config


# --- finding modules ------------------------------------------------------------------------------
def find_ffns(model: nn.Module, mlp_name: str) -> list[tuple[int, str]]:
    """(layer index, full name) of every decoder-layer FFN: modules named ``<list>.<i>.<mlp_name>``."""
    pattern = re.compile(rf"^(.*)\.(\d+)\.{re.escape(mlp_name)}$")
    found = [(int(m.group(2)), name) for name, _ in model.named_modules() if (m := pattern.match(name))]
    if not found:
        top = ", ".join(n for n, _ in model.named_children())
        layer = next((m for n, m in model.named_modules() if re.search(r"\.\d+$", n)), None)
        inside = ", ".join(n for n, _ in layer.named_children()) if layer is not None else "none found"
        raise ValueError(
            f"no decoder-layer FFN named '{mlp_name}' found in {type(model).__name__} (decoder-layer "
            f"children: {inside}; top-level modules: {top}); set MixLoraConfig.mlp_name to the FFN's "
            "attribute name"
        )
    return found


def find_attention_targets(model: nn.Module, ffn_names: list[str], wanted: list[str] | None) -> list[str]:
    """Full names of the attention projections to give LoRA (inside each layer, outside its FFN)."""
    layer_prefixes = [name.rsplit(".", 1)[0] for name in ffn_names]
    targets, available = [], set()
    for prefix in layer_prefixes:
        layer = model.get_submodule(prefix)
        for name, module in layer.named_modules():
            first = name.split(".")[0]
            is_attention = "attn" in first or "attention" in first
            if not name or first == ffn_names[0].rsplit(".", 1)[1] or not is_attention:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                available.add(leaf)
                if (wanted is None and leaf in ATTN_CANDIDATES) or (wanted is not None and leaf in wanted):
                    targets.append(f"{prefix}.{name}")
    if wanted is not None:
        missing = sorted(set(wanted) - available)
        if missing:
            raise ValueError(
                f"MixLoraConfig.attn_targets: {missing} not found in the attention modules; "
                f"available projections: {sorted(available)}"
            )
    if not targets:
        raise ValueError(
            f"no attention projections found for LoRA (available: {sorted(available)}); set "
            "MixLoraConfig.attn_targets or attn_r=0"
        )
    return targets


def architecture_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Identity of the base architecture: key config fields plus a hash of parameter names and shapes."""
    cfg = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "n_embd", "n_layer")
    info = {k: getattr(cfg, k) for k in keys if cfg is not None and getattr(cfg, k, None) is not None}
    # logical shapes: an adapter trained on a 4-bit base (packed weights) fits the unquantized base too
    names = sorted(f"{n}:{logical_shape(p)}" for n, p in model.named_parameters() if not is_trainable_name(n))
    info["params_sha256"] = hashlib.sha256("\n".join(names).encode()).hexdigest()
    return info


# --- inject / unload ------------------------------------------------------------------------------
def inject(model: nn.Module, config: MixLoraConfig) -> nn.Module:
    """Freeze ``model``, add attention LoRA and MixLoRA FFNs; returns the same (modified) object."""
    if getattr(model, STATE_ATTR, None) is not None:
        raise ValueError("model already has loramix adapters; load a fresh base model to inject again")
    ffns = find_ffns(model, config.mlp_name)
    num_layers = len(ffns)
    counts = [config.experts_for_layer(i, num_layers) for i, _ in ffns]  # validates per-layer counts
    specs = []  # detect every FFN before changing anything
    for (_, name), _n in zip(ffns, counts, strict=True):
        mlp = model.get_submodule(name)
        spec = detect_ffn(mlp, config.ffn_names)
        specs.append((spec, check_targets(spec, config.expert_targets, mlp)))
    attn_targets = (
        find_attention_targets(model, [n for _, n in ffns], config.attn_targets) if config.attn_r > 0 else []
    )
    state = LoramixState(
        config=config,
        fingerprint=architecture_fingerprint(model),
        base_model_name=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        num_layers=num_layers,
        attn_targets=attn_targets,
        original_requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
    )
    # taken now, while every rank holds whole weights: saving from one rank of a sharded (FSDP) model must
    # not read the other ranks' shards
    state.base_weights = base_weights_digest(model)
    model_dtype = floating_dtype(model)
    keep_trainable_layout(model)  # bitsandbytes 4-bit layers: gradients must flow through them
    for p in model.parameters():
        p.requires_grad_(False)
    if attn_targets:
        state.added_peft_config = not hasattr(model, "peft_config")
        _inject_attention_lora(model, config, attn_targets)
    for (_, name), n_exp, (spec, targets) in zip(ffns, counts, specs, strict=True):
        if n_exp == 0:
            continue
        parent_name, child = name.rsplit(".", 1)
        base = model.get_submodule(name)
        layer = MixLoraFFN(base, spec, targets, n_exp, config)
        device = next(base.parameters()).device
        layer.to(device)  # new weights stay float32 (master copy); they are cast per forward
        layer.train(base.training)  # new modules start in training mode; follow the model's mode
        setattr(model.get_submodule(parent_name), child, layer)
        state.moe_layers[name] = layer
    model.train(model.training)  # new modules follow the model's mode (an eval model stays deterministic)
    # PEFT creates attention LoRA in the base weight's dtype: keep every trainable in float32 unless asked
    trainable = [n for n, p in model.named_parameters() if is_trainable_name(n)]
    cast_trainable(model, trainable, config.adapter_dtype, model_dtype)
    if getattr(model, "is_quantized", False) and not getattr(model, "_hf_peft_config_loaded", False):
        # HF Trainer (and TRL) refuse to train a quantized model unless it says it carries adapters
        model._hf_peft_config_loaded = True
        state.marked_adapted = True
    setattr(model, STATE_ATTR, state)
    state.hooks = [
        model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
        model.register_forward_hook(_post_forward, with_kwargs=True),
    ]
    return model


def _inject_attention_lora(model: nn.Module, config: MixLoraConfig, targets: list[str]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    conv1d = any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets)
    lora = LoraConfig(
        r=config.attn_r,
        lora_alpha=config.attn_alpha,
        lora_dropout=config.attn_dropout,
        target_modules=targets,
        use_rslora=config.use_rslora,
        fan_in_fan_out=conv1d,
    )
    modes = {t: model.get_submodule(t).training for t in targets}
    inject_adapter_in_model(lora, model)
    use_fast_dropout(model)  # PEFT's per-element Bernoulli mask is the costliest part of a CPU LoRA step
    for t, training in modes.items():  # PEFT's new LoRA modules start in training mode (dropout on)
        model.get_submodule(t).train(training)


def unload(model: nn.Module) -> nn.Module:
    """Remove every loramix adapter and hook, restoring the base modules (weights unmerged)."""
    state = get_state(model)
    for h in state.hooks:
        h.remove()
    for name, layer in state.moe_layers.items():
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, layer.base)
    for name in state.attn_targets:
        parent_name, child = name.rsplit(".", 1)
        module = model.get_submodule(name)
        if hasattr(module, "get_base_layer"):
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    for n, p in model.named_parameters():
        p.requires_grad_(state.original_requires_grad.get(n, p.requires_grad))
    drop_state(model)
    return model


def drop_state(model: nn.Module) -> None:
    """Remove the loramix state and what PEFT attached (a later inject must start clean)."""
    state = get_state(model)
    if state.added_peft_config and hasattr(model, "peft_config"):
        delattr(model, "peft_config")
    if state.marked_adapted:
        model._hf_peft_config_loaded = False
    delattr(model, STATE_ATTR)


# --- forward hooks --------------------------------------------------------------------------------
def _pre_forward(model: nn.Module, args: tuple, kwargs: dict) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]
    layers = list(get_state(model).moe_layers.values())
    for layer in layers:
        layer.token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    if model.training:
        # Applied here, before the next forward, not right after the last one: activation checkpointing
        # re-runs the layers during backward and must pick the same experts as the original forward.
        update_balance_biases(layers)


def _post_forward(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    state = get_state(model)
    wants_loss = kwargs.get("labels") is not None or model.training
    # token_mask stays set until the next forward: activation checkpointing re-runs the layers in backward
    if not wants_loss or not state.moe_layers:
        return output
    aux, stats = compute_aux_loss(model)
    if model.training:  # the same counts feed the balance bias (applied before the next forward)
        record_assignments(list(state.moe_layers.values()), stats["tokens_per_expert"])
    if isinstance(output, tuple):  # return_dict=False: (loss, logits, ...) when labels were given
        if kwargs.get("labels") is not None:
            output = (output[0] + aux.to(output[0].dtype), *output[1:])
        return output
    if getattr(output, "loss", None) is not None:
        output["lm_loss"] = output.loss  # the language-model loss alone (validation reports it)
        output["loss"] = output.loss + aux.to(output.loss.dtype)
    output["aux_loss"] = aux
    output["routing_stats"] = stats
    return output


def compute_aux_loss(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The router aux loss of the model's last forward and its per-layer statistics
    (:func:`loramix.losses.aux_loss` over every MoE layer that routed tokens)."""
    state = get_state(model)
    routed = [(layer.last_routing, layer.num_experts) for layer in state.moe_layers.values()
              if layer.last_routing is not None]
    return aux_loss(routed, state.config)


def routing_stats(model: nn.Module) -> list[dict[str, Any]]:
    """Per-layer statistics of the last forward: tokens per expert and mean router entropy."""
    out = []
    for name, layer in get_state(model).moe_layers.items():
        r = layer.last_routing
        if r is None:
            continue
        out.append(
            {
                "layer": name,
                "tokens_per_expert": tokens_per_expert(r.indices, r.mask, layer.num_experts).cpu(),
                "entropy": float(router_entropy(r.probs.detach(), r.token_mask)),
            }
        )
    return out
