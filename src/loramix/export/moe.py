"""What the standard Mixture-of-Experts targets (Mixtral, Qwen2-MoE, Qwen3-MoE) share.

A ``mixlora`` expert is the frozen FFN with that expert's LoRA on gate/up/down; merged, it is an ordinary
gated FFN with weights ``W + s * B_e @ A_e``. A MixLoRA model with E experts and a top-k router is therefore
a Mixtral-style MoE: each expert a merged FFN, the gate weight the router weight, ``num_experts_per_tok``
= k, and the attention LoRA merged into attention. Hugging Face's Mixtral, Qwen2-MoE and Qwen3-MoE routers
(with ``norm_topk_prob``) compute softmax in float32, take the top k and renormalise the kept weights,
which is what loramix's ``topk`` router does.

Router decisions: ``topk`` and ``noisy_topk`` (no noise in eval) are exact; ``dense`` is exact as top-E;
``switch`` is top-1 with weight 1 but its capacity limit has no counterpart; ``top_p`` picks a varying number
of experts per token and ``expert_type="adapter"`` experts are ungated and sit beside an always-on FFN:
neither has a standard form and both are refused. A selection-only balance bias that is not constant over
a layer's experts changes which experts are chosen, and no standard architecture adds a bias to the logits
for selection only (Ernie-4.5-MoE adds its correction bias to the softmax probabilities, which picks
different experts), so it is dropped only when asked. The ``vllm`` target represents all of these exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..injection import get_state
from ..moe_layer import MixLoraFFN
from .target import ExportError, ExportPlan, ExportTarget, biased_layers, decoder_layers


@torch.no_grad()
def ffn_weights(mlp: nn.Module, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """(out, in) float32 weights of a plain gated FFN (roles named by ``names``) or a MixLoraFFN's frozen base."""
    from ..ffn_spec import linear_weight

    if isinstance(mlp, MixLoraFFN):
        return mlp.frozen_weights()
    return {role: linear_weight(getattr(mlp, names[role])).detach().float().clone() for role in ("gate", "up", "down")}


def role_names(ffn_names: dict[str, str] | None) -> dict[str, str]:
    return {"gate": "gate_proj", "up": "up_proj", "down": "down_proj", **(ffn_names or {})}


@torch.no_grad()
def merged_experts(mlp: MixLoraFFN) -> list[dict[str, torch.Tensor]]:
    """Each expert's merged FFN: ``W + scaling * B_e @ A_e`` per adapted role (merged in float64)."""
    base = mlp.frozen_weights()
    out = []
    for e in range(mlp.num_experts):
        weights = {}
        for role, w in base.items():
            if role in mlp.targets:
                weights[role] = (w.double() + mlp.expert_weights(role).merged_delta(e)).float()
            else:
                weights[role] = w.clone()
        out.append(weights)
    return out


class StandardMoETarget(ExportTarget):
    """A Hugging Face MoE architecture whose experts are merged FFNs; subclasses name keys and config."""

    architecture: ClassVar[str]
    config_class: ClassVar[str]  # the transformers config class name
    loads_with = "`transformers` alone (`AutoModelForCausalLM.from_pretrained`, no `trust_remote_code`), vLLM and " \
                 "llama.cpp"

    def check_base(self, cfg: Any) -> None:
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ExportError(f"hidden_act={cfg.hidden_act!r}: the {self.name} experts use silu; cannot export")

    def plan(self, model: nn.Module, layer_experts: list[int]) -> ExportPlan:
        cfg = get_state(model).config
        counts = layer_experts
        if cfg.expert_type != "mixlora":
            raise ExportError(
                "expert_type='adapter' has no standard MoE form: its experts are ungated low-rank FFNs added to an "
                "always-on frozen FFN, and a gated expert act(W1 x) * (W3 x) cannot represent act(A x) exactly; "
                "export with format='vllm' or train with expert_type='mixlora'"
            )
        if cfg.router == "top_p":
            raise ExportError(
                "router='top_p' picks a varying number of experts per token; Mixtral, Qwen-MoE and llama.cpp use a "
                "fixed num_experts_per_tok, so it has no exact standard export; export with format='vllm' or train "
                "with router='topk'"
            )
        e_max = max(counts)
        approximations: list[str] = []
        notes: list[str] = []
        if cfg.router in ("topk", "noisy_topk"):
            k = min(cfg.top_k, e_max)
            if cfg.router == "noisy_topk":
                notes.append("noisy_topk adds noise only in training; in eval it is topk, exported as is")
        elif cfg.router == "switch":
            k = 1
            approximations.append(
                "switch: top-1 with weight 1 is exported exactly (top-1 renormalised is 1), but the per-batch expert "
                "capacity (capacity_factor) has no counterpart: tokens loramix would drop to the frozen FFN go to "
                "their expert"
            )
        else:  # dense
            k = e_max
            notes.append("dense router exported as top-E of E experts: softmax over all experts, renormalised (sum 1)")
        uneven = sorted({n for n in counts if 0 < n < e_max})
        if uneven:
            if k != 1:
                raise ExportError(
                    f"expert counts differ between layers ({counts}) and {k} experts are used per token: the exported "
                    "format needs one count for all layers, and with top-k > 1 no router row of a bias-free linear "
                    "gate stays below the k-th best real expert for every input, so padding experts cannot be made "
                    "unreachable; export with format='vllm', or use one num_experts for all MoE layers (0 for "
                    "frozen layers is fine) or top_k=1"
                )
            notes.append(
                f"layers with fewer than {e_max} experts are padded with copies of the frozen FFN whose router row is "
                "the mean of the layer's real rows: its logit never exceeds the best real expert's, so top-1 never "
                "picks it"
            )
        if 0 in counts:
            notes.append(self.frozen_layer_note)
        drop_bias = False
        if cfg.router != "dense":
            biased = biased_layers(model, counts)
            if biased:
                drop_bias = True
                approximations.append(
                    f"balance bias: {len(biased)} of {sum(1 for n in counts if n)} MoE layers choose experts with a "
                    "selection-only bias on the router logits; no standard MoE adds a bias to the logits for "
                    "selection only (Ernie-4.5-MoE adds its correction bias to the softmax probabilities, which ranks "
                    "experts differently), so the exported router chooses by its logits alone (format='vllm' keeps "
                    "the bias exactly)"
                )
        notes.extend(self.extra_notes)
        return ExportPlan(self.name, e_max, k, counts, approximations, notes, self.architecture, drop_bias)

    frozen_layer_note: ClassVar[str] = "layers without experts are dense (mlp_only_layers)"
    extra_notes: ClassVar[tuple[str, ...]] = ()

    # --- config -----------------------------------------------------------------------------------
    def config(self, model: nn.Module, plan: ExportPlan, dtype: torch.dtype) -> Any:
        import transformers

        base_cfg = model.config
        cls = getattr(transformers, self.config_class)
        known = set(cls().to_dict())
        skip = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "tie_word_embeddings",
                "_name_or_path", "id2label", "label2id"}
        fields = {k: v for k, v in base_cfg.to_dict().items() if k in known and k not in skip}
        fields.update(tie_word_embeddings=False, num_experts_per_tok=plan.experts_per_token,
                      output_router_logits=False, router_aux_loss_coef=0.0, dtype=str(dtype).removeprefix("torch."))
        fields.update(self.moe_fields(base_cfg, plan))
        config = cls(**fields)
        config.architectures = [self.architecture]
        return config

    def moe_fields(self, base_cfg: Any, plan: ExportPlan) -> dict[str, Any]:
        raise NotImplementedError

    # --- tensors ----------------------------------------------------------------------------------
    def gate_key(self, prefix: str) -> str:
        raise NotImplementedError

    def expert_keys(self, prefix: str, e: int) -> dict[str, str]:
        raise NotImplementedError

    def dense_layer(self, out: dict[str, torch.Tensor], prefix: str, frozen: dict[str, torch.Tensor],
                    plan: ExportPlan, hidden: int) -> bool:
        """Write a layer without experts in the format's dense form; False if the format has none."""
        for role, w in frozen.items():
            out[f"{prefix}.mlp.{role}_proj.weight"] = w.clone()
        return True

    def extra_layer_tensors(self, out: dict[str, torch.Tensor], prefix: str, hidden: int) -> None:
        """Tensors the format needs in each MoE layer beyond the router and the experts."""

    @torch.no_grad()
    def tensors(self, model: nn.Module, plan: ExportPlan) -> dict[str, torch.Tensor]:
        state = get_state(model)
        if state.attn_targets:
            raise ExportError("merge the attention LoRA first (loramix.merge_attention)")
        mlp_name = state.config.mlp_name
        names = role_names(state.config.ffn_names)
        layers = decoder_layers(model, "")
        out = base_tensors(model, mlp_name)
        hidden = model.config.hidden_size
        for i, block in enumerate(layers):
            prefix = f"model.layers.{i}"
            mlp = getattr(block, mlp_name)
            n = plan.layer_experts[i]
            if n == 0:
                frozen = ffn_weights(mlp, names)
                if self.dense_layer(out, prefix, frozen, plan, hidden):
                    continue
                experts = [frozen] * plan.num_experts  # every expert the frozen FFN, the router anything (zeros)
                gate = torch.zeros(plan.num_experts, hidden)
            else:
                experts = merged_experts(mlp)
                gate, _ = mlp.router.export_state()  # (E, H)
                pad = plan.num_experts - n
                if pad:  # top-1 only (plan): rows at the mean never beat the best real expert
                    experts = experts + [mlp.frozen_weights()] * pad
                    gate = torch.cat([gate, gate.mean(dim=0, keepdim=True).expand(pad, hidden)])
            out[self.gate_key(prefix)] = gate.contiguous()
            for e, weights in enumerate(experts):
                for role, key in self.expert_keys(prefix, e).items():
                    out[key] = weights[role].clone()
            self.extra_layer_tensors(out, prefix, hidden)
        return out

    # --- reading back -----------------------------------------------------------------------------
    def load(self, directory: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        exported, info = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                              output_loading_info=True)
        problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if type(exported).__name__ != self.architecture or problems:
            raise ExportError(f"the written checkpoint does not load as {self.architecture}: "
                              f"{type(exported).__name__}, {problems}")
        return exported.eval()

    def card_lines(self, plan: ExportPlan) -> list[str]:
        return ["Each expert is the base model's FFN with that expert's LoRA merged in (W + s·B·A); the router is "
                "the adapter's router; the attention LoRA is merged into attention."]


@torch.no_grad()
def base_tensors(model: nn.Module, mlp_name: str) -> dict[str, torch.Tensor]:
    """Every float32 tensor of the (attention-merged) model outside the decoder layers' FFNs and the adapter,
    with an explicit ``lm_head.weight`` (a tied head becomes its own tensor)."""
    layers = decoder_layers(model, "")
    ffn_names = {f"model.layers.{i}.{mlp_name}" for i in range(len(layers))}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if any(name.startswith(p + ".") for p in ffn_names) or "lora_" in name or "mixlora_" in name:
            continue
        out[name] = tensor.detach().float().clone()  # clone: tied lm_head becomes its own tensor
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = model.get_output_embeddings().weight.detach().float().clone()
    return out
