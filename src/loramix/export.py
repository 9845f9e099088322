"""Export a MixLoRA model as a standard Mixture-of-Experts checkpoint that other engines load.

A ``mixlora`` expert is the frozen FFN with that expert's LoRA on gate/up/down; merged, it is an ordinary
gated FFN with weights ``W + s * B_e @ A_e``. A MixLoRA model with E experts and a top-k router is therefore
a Mixtral-style MoE: each expert a merged FFN, the gate weight the router weight, ``num_experts_per_tok``
= k, and the attention LoRA merged into attention. Hugging Face's Mixtral, Qwen2-MoE and Qwen3-MoE routers
(with ``norm_topk_prob``) compute softmax in float32, take the top k and renormalise the kept weights,
which is what loramix's ``topk`` router does.

Targets (``format``):

* ``mixtral`` for Llama- and Mistral-family bases (SmolLM2's tied embeddings are written as an explicit
  ``lm_head``; Llama-3 rope scaling is carried over);
* ``qwen2_moe`` for Qwen2 bases: Qwen2-MoE always adds a sigmoid-gated shared expert; its weights are
  written as zeros, so its output is exactly 0 whatever the gate says;
* ``qwen3_moe`` for Qwen3 bases (no shared expert).

Router decisions (see :func:`plan_export`): ``topk`` and ``noisy_topk`` (no noise in eval) are exact;
``dense`` is exact as top-E; ``switch`` is top-1 with weight 1 but its capacity limit has no counterpart;
``top_p`` picks a varying number of experts per token and ``expert_type="adapter"`` experts are ungated
and sit beside an always-on FFN: neither has a standard form and both are refused. A selection-only
balance bias that is not constant over a layer's experts changes which experts are chosen, and no standard
architecture adds a bias to the logits for selection only (Ernie-4.5-MoE adds its correction bias to the
softmax probabilities, which picks different experts), so it is dropped only when asked.

The exporter checks its own output: it loads the written checkpoint with transformers and compares its
float32 logits with the loramix model's on a few tokens, and refuses to write a model that differs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import diskspace
from ._version import __version__
from .checkpoint import apply_umask_modes
from .ffn_spec import linear_weight
from .injection import get_state
from .moe_layer import MixLoraFFN
from .quantized import refuse_quantized

logger = logging.getLogger(__name__)

FORMATS = ("auto", "mixtral", "qwen2_moe", "qwen3_moe")
#: base model_type -> the MoE format it exports to exactly
BASE_TO_FORMAT = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
}
#: Width of Qwen2-MoE's shared expert, whose weights are all zero (a small, quantisable width; its output is 0)
QWEN2_MOE_SHARED_WIDTH = 32
DEFAULT_TOLERANCE = 1e-4
DEFAULT_CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1969, two astronauts walked on the Moon while a third "
    "orbited above them. Question: What is 12 plus 30? Answer: 42. Water boils at 100 degrees Celsius at sea "
    "level, and photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen. def add(a, b):\n"
    "    return a + b\nThe committee will meet again on Tuesday to review the budget and the schedule."
)


class ExportError(ValueError):
    """The adapter cannot be exported as asked; the message names the option or field to change."""


@dataclass
class ExportPlan:
    """What :func:`export_model` will write, decided before any weight is touched."""

    format: str
    num_experts: int  # experts per MoE layer in the exported model (the largest count; padded layers)
    experts_per_token: int
    layer_experts: list[int]  # loramix's expert count of each decoder layer (0 = frozen FFN)
    approximations: list[str] = field(default_factory=list)  # what the export does not reproduce exactly
    notes: list[str] = field(default_factory=list)  # exact mappings worth knowing


@dataclass
class ExportReport:
    """Result of an export: where, what, how big, and how close to the loramix model it measured."""

    output_dir: str
    format: str
    architecture: str
    num_experts: int
    experts_per_token: int
    dtype: str
    source_adapter: str | None
    base_model: str | None
    exported_bytes: int
    exported_params: int
    base_bytes: int
    base_params: int
    adapter_bytes: int | None
    check_tokens: int = 0
    max_abs_logit_diff: float | None = None  # exported vs loramix (as exported), float32
    tolerance: float | None = None  # allowed difference, relative to the largest |logit| (at least 1)
    logit_scale: float | None = None  # max(1, largest |logit| of the loramix model on the check tokens)
    approximations: list[str] = field(default_factory=list)
    measured: dict[str, float] = field(default_factory=dict)  # effect of the approximations on the check text
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for the terminal: sizes side by side, the check, any measured difference."""
        lines = [
            f"exported {self.architecture} ({self.num_experts} experts, {self.experts_per_token} per token, "
            f"{self.dtype}) to {self.output_dir}",
            f"size: exported {_human(self.exported_bytes)} ({self.exported_params / 1e6:.1f}M params); "
            f"base {_human(self.base_bytes)} ({self.base_params / 1e6:.1f}M params, {self.dtype}); "
            + (f"adapter {_human(self.adapter_bytes)}" if self.adapter_bytes is not None else "adapter: in memory"),
        ]
        if self.max_abs_logit_diff is None:
            lines.append("check: skipped (check=False)")
        else:
            lines.append(
                f"check: max |logit difference| {self.max_abs_logit_diff:.2e} over {self.check_tokens} tokens "
                f"(float32; allowed {self.tolerance:.0e} x logit scale {self.logit_scale:.1f})"
            )
        for a in self.approximations:
            lines.append(f"approximation: {a}")
        if self.measured:
            lines.append("measured on the check tokens: " + ", ".join(f"{k} {v:.4g}" for k, v in self.measured.items()))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# --------------------------------------------------------------------------------------------------
# planning: which format, which k, what is exact
# --------------------------------------------------------------------------------------------------
def _supported_text() -> str:
    return ", ".join(f"{base} -> {fmt}" for base, fmt in BASE_TO_FORMAT.items())


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ExportError(f"{type(model).__name__}: no model.layers decoder list; supported bases: {_supported_text()}")
    return layers


def resolve_format(model: nn.Module, format: str = "auto") -> str:
    """The export format for this base model; raises :class:`ExportError` naming the supported bases."""
    if format not in FORMATS:
        raise ExportError(f"format={format!r} is unknown; choose one of {', '.join(FORMATS)}")
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    target = BASE_TO_FORMAT.get(model_type)
    if target is None:
        raise ExportError(
            f"no standard MoE architecture represents a MixLoRA model on a {model_type!r} base exactly; "
            f"supported bases: {_supported_text()}"
        )
    if format != "auto" and format != target:
        raise ExportError(f"format={format!r} cannot represent a {model_type!r} base; use format={target!r} (or auto)")
    if target == "mixtral":
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(cfg, flag, False):
                raise ExportError(f"this {model_type} base has {flag}=True, which Mixtral lacks; cannot export it")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act={cfg.hidden_act!r}: the {target} experts use silu; cannot export")
    return target


def _bias_is_constant(layer: MixLoraFFN) -> bool:
    bias = layer.mixlora_router.balance_bias
    return bool((bias == bias[0]).all())


def plan_export(model: nn.Module, format: str = "auto") -> ExportPlan:
    """Decide the exported architecture and list what it cannot reproduce exactly.

    Raises :class:`ExportError` for adapters with no standard form at all (``top_p`` router, ``adapter``
    experts, uneven expert counts with more than one expert per token).
    """
    state = get_state(model)
    cfg = state.config
    target = resolve_format(model, format)
    layers = _decoder_layers(model)
    by_layer = {name: layer for name, layer in state.moe_layers.items()}
    counts = []
    for i, block in enumerate(layers):
        mlp = getattr(block, cfg.mlp_name, None)
        counts.append(mlp.num_experts if isinstance(mlp, MixLoraFFN) else 0)
        if isinstance(mlp, MixLoraFFN) and mlp not in by_layer.values():
            raise ExportError(f"layer {i}: a MixLoRA layer that loramix does not track; re-load the adapter")
    if not any(counts):
        raise ExportError("the model has no MixLoRA layer to export")
    if cfg.expert_type != "mixlora":
        raise ExportError(
            "expert_type='adapter' has no standard MoE form: its experts are ungated low-rank FFNs added to an "
            "always-on frozen FFN, and a gated expert act(W1 x) * (W3 x) cannot represent act(A x) exactly; "
            "export needs expert_type='mixlora'"
        )
    if cfg.router == "top_p":
        raise ExportError(
            "router='top_p' picks a varying number of experts per token; Mixtral, Qwen-MoE, vLLM and llama.cpp "
            "use a fixed num_experts_per_tok, so it has no exact export; train with router='topk' to export"
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
                "unreachable; use one num_experts for all MoE layers (0 for frozen layers is fine) or top_k=1"
            )
        notes.append(
            f"layers with fewer than {e_max} experts are padded with copies of the frozen FFN whose router row is "
            "the mean of the layer's real rows: its logit never exceeds the best real expert's, so top-1 never "
            "picks it"
        )
    if 0 in counts:
        if target == "mixtral":
            notes.append("layers without experts hold the frozen FFN in every expert (the weights sum to 1)")
        else:
            notes.append("layers without experts are dense (mlp_only_layers)")
    if cfg.router != "dense":
        biased = [i for i, n in enumerate(counts) if n and not _bias_is_constant(getattr(layers[i], cfg.mlp_name))]
        if biased:
            approximations.append(
                f"balance bias: {len(biased)} of {sum(1 for n in counts if n)} MoE layers choose experts with a "
                "selection-only bias on the router logits; no standard MoE adds a bias to the logits for selection "
                "only (Ernie-4.5-MoE adds its correction bias to the softmax probabilities, which ranks experts "
                "differently), so the exported router chooses by its logits alone"
            )
    if target == "qwen2_moe":
        notes.append("Qwen2-MoE's shared expert is written with zero weights: its output is exactly 0")
    return ExportPlan(target, e_max, k, counts, approximations, notes)


# --------------------------------------------------------------------------------------------------
# building the checkpoint
# --------------------------------------------------------------------------------------------------
def _target_config(model: nn.Module, plan: ExportPlan, dtype: torch.dtype) -> Any:
    import transformers

    base_cfg = model.config
    cls = {"mixtral": transformers.MixtralConfig, "qwen2_moe": transformers.Qwen2MoeConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig}[plan.format]
    known = set(cls().to_dict())
    skip = {"architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "tie_word_embeddings",
            "_name_or_path", "id2label", "label2id"}
    fields = {k: v for k, v in base_cfg.to_dict().items() if k in known and k not in skip}
    intermediate = base_cfg.intermediate_size
    fields.update(tie_word_embeddings=False, num_experts_per_tok=plan.experts_per_token, output_router_logits=False,
                  router_aux_loss_coef=0.0, dtype=str(dtype).removeprefix("torch."))
    if plan.format == "mixtral":
        fields.update(num_local_experts=plan.num_experts, router_jitter_noise=0.0)
        head_dim = getattr(base_cfg, "head_dim", None)
        fields["head_dim"] = head_dim or base_cfg.hidden_size // base_cfg.num_attention_heads
    else:
        dense = [i for i, n in enumerate(plan.layer_experts) if n == 0]
        fields.update(num_experts=plan.num_experts, moe_intermediate_size=intermediate,
                      intermediate_size=intermediate, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=dense)
        if plan.format == "qwen2_moe":
            fields.update(shared_expert_intermediate_size=QWEN2_MOE_SHARED_WIDTH, qkv_bias=True)
        if getattr(base_cfg, "head_dim", None):
            fields["head_dim"] = base_cfg.head_dim
    config = cls(**fields)
    config.architectures = [ARCHITECTURES[plan.format]]
    return config


@torch.no_grad()
def _ffn_weights(mlp: nn.Module, spec_names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """(out, in) float32 weights of a plain gated FFN or a MixLoraFFN's frozen base, by role."""
    if isinstance(mlp, MixLoraFFN):
        return {role: linear_weight(mlp.proj(role)).detach().float() for role in ("gate", "up", "down")}
    names = spec_names or {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    return {role: linear_weight(getattr(mlp, names[role])).detach().float() for role in ("gate", "up", "down")}


@torch.no_grad()
def _experts(mlp: MixLoraFFN) -> list[dict[str, torch.Tensor]]:
    """Each expert's merged FFN: ``W + scaling * B_e @ A_e`` per adapted role (merged in float64)."""
    base = _ffn_weights(mlp)
    out = []
    for e in range(mlp.num_experts):
        weights = {}
        for role, w in base.items():
            if role in mlp.targets:
                lora = mlp.mixlora_experts[role]
                delta = lora.scaling * (lora.lora_B[e].double() @ lora.lora_A[e].double())  # (out, in)
                weights[role] = (w.double() + delta).float()
            else:
                weights[role] = w.clone()
        out.append(weights)
    return out


def _expert_keys(fmt: str, prefix: str, e: int) -> dict[str, str]:
    if fmt == "mixtral":
        p = f"{prefix}.block_sparse_moe.experts.{e}"
        return {"gate": f"{p}.w1.weight", "up": f"{p}.w3.weight", "down": f"{p}.w2.weight"}
    p = f"{prefix}.mlp.experts.{e}"
    return {role: f"{p}.{role}_proj.weight" for role in ("gate", "up", "down")}


@torch.no_grad()
def build_state_dict(model: nn.Module, plan: ExportPlan) -> dict[str, torch.Tensor]:
    """The exported checkpoint's float32 tensors, in the format's usual on-disk names.

    ``model`` must have its attention LoRA merged (:func:`loramix.merge_attention`).
    """
    state = get_state(model)
    if state.attn_targets:
        raise ExportError("merge the attention LoRA first (loramix.merge_attention)")
    mlp_name = state.config.mlp_name
    layers = _decoder_layers(model)
    layer_prefix = {id(block): f"model.layers.{i}" for i, block in enumerate(layers)}
    ffn_names = {f"{layer_prefix[id(block)]}.{mlp_name}" for block in layers}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if any(name.startswith(p + ".") for p in ffn_names) or "lora_" in name or "mixlora_" in name:
            continue
        out[name] = tensor.detach().float().clone()  # clone: tied lm_head becomes its own tensor
    if "lm_head.weight" not in out:
        out["lm_head.weight"] = model.get_output_embeddings().weight.detach().float().clone()
    hidden = model.config.hidden_size
    for i, block in enumerate(layers):
        prefix = f"model.layers.{i}"
        mlp = getattr(block, mlp_name)
        n = plan.layer_experts[i]
        if n == 0 and plan.format != "mixtral":  # a dense layer (mlp_only_layers)
            for role, w in _ffn_weights(mlp, state.config.ffn_names and _role_names(state.config.ffn_names)).items():
                out[f"{prefix}.mlp.{role}_proj.weight"] = w.clone()
            continue
        if n == 0:  # Mixtral: every expert is the frozen FFN, the router anything (zeros)
            frozen = _ffn_weights(mlp, state.config.ffn_names and _role_names(state.config.ffn_names))
            experts = [frozen] * plan.num_experts
            gate = torch.zeros(plan.num_experts, hidden)
        else:
            experts = _experts(mlp)
            gate = mlp.mixlora_router.weight.detach().float().clone()  # (E, H)
            pad = plan.num_experts - n
            if pad:  # top-1 only (plan_export): rows at the mean never beat the best real expert
                frozen = _ffn_weights(mlp)
                experts = experts + [frozen] * pad
                gate = torch.cat([gate, gate.mean(dim=0, keepdim=True).expand(pad, hidden)])
        gate_key = f"{prefix}.block_sparse_moe.gate.weight" if plan.format == "mixtral" else f"{prefix}.mlp.gate.weight"
        out[gate_key] = gate.contiguous()
        for e, weights in enumerate(experts):
            for role, key in _expert_keys(plan.format, prefix, e).items():
                out[key] = weights[role].clone()
        if plan.format == "qwen2_moe":  # a shared expert that adds exactly zero
            width = QWEN2_MOE_SHARED_WIDTH
            out[f"{prefix}.mlp.shared_expert.gate_proj.weight"] = torch.zeros(width, hidden)
            out[f"{prefix}.mlp.shared_expert.up_proj.weight"] = torch.zeros(width, hidden)
            out[f"{prefix}.mlp.shared_expert.down_proj.weight"] = torch.zeros(hidden, width)
            out[f"{prefix}.mlp.shared_expert_gate.weight"] = torch.zeros(1, hidden)
    return out


def _role_names(ffn_names: dict[str, str]) -> dict[str, str]:
    return {"gate": "gate_proj", "up": "up_proj", "down": "down_proj", **ffn_names}


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                      max_shard_size: str | int = "2GB") -> int:
    """Sharded safetensors (plus ``model.safetensors.index.json`` when there are several); returns bytes."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    cast = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    split = split_torch_state_dict_into_shards(cast, max_shard_size=max_shard_size)
    total = 0
    for filename, names in split.filename_to_tensors.items():
        save_file({n: cast[n] for n in names}, str(directory / filename), metadata={"format": "pt"})
        total += (directory / filename).stat().st_size
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in cast.values())},
                 "weight_map": split.tensor_to_filename}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


# --------------------------------------------------------------------------------------------------
# checking
# --------------------------------------------------------------------------------------------------
def check_batch(tokenizer: Any, vocab_size: int, check_text: str | None = None, tokens: int = 128,
                row: int = 64) -> torch.Tensor:
    """(rows, len) token ids: the tokenised check text, or fixed pseudo-random ids without a tokenizer."""
    if check_text is not None and os.path.isfile(check_text):
        check_text = Path(check_text).read_text(encoding="utf-8")
    if tokenizer is not None:
        text = check_text or DEFAULT_CHECK_TEXT
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [i for i in ids if i < vocab_size][:tokens]
        if len(ids) < 2:
            raise ExportError("the check text gives fewer than 2 tokens; pass a longer check_text")
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (tokens,), generator=g).tolist()
    row = min(row, len(ids))
    rows = max(1, len(ids) // row)
    return torch.tensor(ids[: rows * row]).view(rows, row)


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                   ids[:, 1:].reshape(-1)))


def _expert_sets(model: nn.Module) -> list[torch.Tensor]:
    """Per MoE layer, the (T, K) sorted expert ids of the last forward (-1 for unused or dropped slots)."""
    sets = []
    for layer in get_state(model).moe_layers.values():
        r = layer.last_routing
        sets.append(torch.where(r.mask, r.indices, -1).sort(dim=-1).values)
    return sets


@contextlib.contextmanager
def as_exported(model: nn.Module, plan: ExportPlan) -> Iterator[nn.Module]:
    """Temporarily make the loramix model compute what the export computes: balance biases cleared
    (when the plan drops them) and no switch capacity limit. Restored on exit."""
    saved = []
    for layer in get_state(model).moe_layers.values():
        router = layer.mixlora_router
        saved.append((router, router.balance_bias.clone(), getattr(router, "capacity_factor", None)))
        if plan.approximations:
            router.balance_bias.zero_()
        if hasattr(router, "capacity_factor"):
            router.capacity_factor = math.inf
    try:
        yield model
    finally:
        for router, bias, factor in saved:
            router.balance_bias.copy_(bias)
            if factor is not None:
                router.capacity_factor = factor


@torch.no_grad()
def _reference_run(model: nn.Module, plan: ExportPlan, ids: torch.Tensor) -> dict[str, Any]:
    """Logits of the loramix model as exported, and (with approximations) how far that is from loramix."""
    model.eval()
    out: dict[str, Any] = {}
    if plan.approximations:
        original = model(input_ids=ids).logits.float()
        original_sets = _expert_sets(model)
        dropped = [
            float((~layer.last_routing.mask.any(dim=-1)).float().mean())
            for layer in get_state(model).moe_layers.values()
        ]
        out.update(original=original, original_sets=original_sets, dropped=sum(dropped) / len(dropped))
    with as_exported(model, plan):
        out["reference"] = model(input_ids=ids).logits.float()
        out["reference_sets"] = _expert_sets(model)
    return out


def _measure(ref: dict[str, Any], exported_logits: torch.Tensor, ids: torch.Tensor, plan: ExportPlan) -> dict:
    if not plan.approximations:
        return {}
    pairs = [(a != b).any(dim=-1) for a, b in zip(ref["original_sets"], ref["reference_sets"], strict=True)]
    differs = torch.stack(pairs)  # (layers, T)
    measured = {
        "token_layer_expert_sets_differing": float(differs.float().mean()),
        "tokens_with_any_layer_differing": float(differs.any(dim=0).float().mean()),
        "loss_loramix": _nll(ref["original"], ids),
        "loss_exported": _nll(exported_logits, ids),
        "max_abs_logit_diff_vs_loramix": float((exported_logits - ref["original"]).abs().max()),
    }
    measured["loss_change"] = measured["loss_exported"] - measured["loss_loramix"]
    if any("switch" in a for a in plan.approximations):
        measured["tokens_dropped_by_capacity"] = ref["dropped"]
    return measured


# --------------------------------------------------------------------------------------------------
# the export
# --------------------------------------------------------------------------------------------------
def _model_card(report: ExportReport, plan: ExportPlan) -> str:
    base = report.base_model or "unknown"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [loramix, mixlora, mixture-of-experts, moe]",
        *( [f"base_model: {base}"] if report.base_model and "/" in base and not os.path.isabs(base) else []),
        "---",
        "",
        f"# {ARCHITECTURES[plan.format]} exported by loramix {__version__}",
        "",
        f"A Mixture-of-LoRA-Experts model exported by [loramix](https://pypi.org/project/loramix/) {__version__} "
        f"as a standard `{plan.format}` checkpoint: it loads with `transformers` alone "
        "(`AutoModelForCausalLM.from_pretrained`, no `trust_remote_code`), and with vLLM and llama.cpp.",
        "",
        f"- source adapter: `{report.source_adapter or 'an in-memory loramix model'}`",
        f"- base model: `{base}`",
        f"- experts per layer: {plan.num_experts}, experts per token: {plan.experts_per_token}",
        f"- weights: {report.dtype}, {_human(report.exported_bytes)}",
        "",
        "Each expert is the base model's FFN with that expert's LoRA merged in (W + s·B·A); the router is the "
        "adapter's router; the attention LoRA is merged into attention.",
    ]
    if report.max_abs_logit_diff is not None:
        lines += ["", f"Checked at export: largest float32 logit difference from the loramix model "
                      f"{report.max_abs_logit_diff:.2e} over {report.check_tokens} tokens."]
    if plan.approximations:
        lines += ["", "## Approximations (exported on request)", ""]
        lines += [f"- {a}" for a in plan.approximations]
        lines += [f"- measured: {k} = {v:.4g}" for k, v in report.measured.items()]
    return "\n".join(lines) + "\n"


def _dir_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(f.stat().st_size for f in path.glob(pattern))


def export_adapted(
    model: nn.Module,
    output_dir: str | Path,
    tokenizer: Any = None,
    *,
    format: str = "auto",
    check: bool = True,
    allow_approximate: bool = False,
    dtype: str | torch.dtype = "float32",
    check_text: str | None = None,
    check_tokens: int = 128,
    tolerance: float = DEFAULT_TOLERANCE,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    source_adapter: str | None = None,
    base_model: str | None = None,
) -> ExportReport:
    """Export an in-memory loramix model (float32, adapter loaded); see :func:`export_model` for the options.

    The model's attention LoRA is merged in place (:func:`loramix.merge_attention`) and it stays merged.
    """
    from .merge import merge_attention
    from .models import DTYPE_CHOICES

    output_dir = Path(output_dir)
    if isinstance(dtype, str):
        if dtype not in DTYPE_CHOICES:
            raise ExportError(f"dtype={dtype!r} is unknown; choose one of {', '.join(DTYPE_CHOICES)}")
        dtype = DTYPE_CHOICES[dtype]
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ExportError(f"output_dir {output_dir} exists and is not empty; pass overwrite=True (--overwrite)")
    refuse_quantized(dict(model.named_modules()), "export")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ExportError("export needs the model in float32 (load the base with dtype='float32')")
    plan = plan_export(model, format)
    if plan.approximations and not allow_approximate:
        raise ExportError(
            "the exported model would not compute exactly what the loramix model does:\n- "
            + "\n- ".join(plan.approximations)
            + "\nPass allow_approximate=True (--allow-approximate) to export anyway; the difference is then "
            "measured on the check text and printed"
        )
    model.eval()
    ids = check_batch(tokenizer, model.config.vocab_size, check_text, check_tokens) if check else None
    ref = _reference_run(model, plan, ids) if check else None
    base_params = {id(p): p for n, p in model.named_parameters() if "lora_" not in n and "mixlora_" not in n}
    base_count = sum(p.numel() for p in base_params.values())
    merge_attention(model)
    tensors = build_state_dict(model, plan)
    config = _target_config(model, plan, dtype)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    needed = diskspace.tensor_bytes(tensors.values(), torch.float32)  # the float32 weights are written first
    diskspace.check_free_space(output_dir.parent, needed, "the exported model")
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.loramix-export-", dir=output_dir.parent))
    try:
        config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(staging)
        exported_bytes = write_safetensors(staging, tensors, torch.float32, max_shard_size)  # what is checked
        report = ExportReport(
            output_dir=str(output_dir), format=plan.format, architecture=ARCHITECTURES[plan.format],
            num_experts=plan.num_experts, experts_per_token=plan.experts_per_token,
            dtype=str(dtype).removeprefix("torch."), source_adapter=source_adapter,
            base_model=base_model or getattr(model.config, "_name_or_path", None) or None,
            exported_bytes=exported_bytes, exported_params=sum(t.numel() for t in tensors.values()),
            base_bytes=base_count * torch.empty((), dtype=dtype).element_size(), base_params=base_count,
            adapter_bytes=_dir_bytes(Path(source_adapter)) if source_adapter else None,
            approximations=list(plan.approximations), notes=list(plan.notes),
        )
        if dtype == torch.float32:
            del tensors  # nothing left to write: free them before the check loads the checkpoint
        if check:
            _check(staging, ids, ref, plan, report, tolerance)
        if dtype != torch.float32:  # the checked float32 weights, rounded once to the storage dtype
            for f in [*staging.glob("*.safetensors"), *staging.glob("model.safetensors.index.json")]:
                f.unlink()
            report.exported_bytes = write_safetensors(staging, tensors, dtype, max_shard_size)
            if check:
                report.measured["max_abs_logit_diff_after_cast"] = _logit_diff(staging, ids, ref["reference"])
            del tensors
        (staging / "README.md").write_text(_model_card(report, plan))
        (staging / "loramix_export.json").write_text(json.dumps(report.to_dict(), indent=2))
        apply_umask_modes(staging)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except Exception as e:
        diskspace.raise_if_disk_full(e, output_dir.parent, needed, "the exported model", remove=staging)
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report


@torch.no_grad()
def _check(directory: Path, ids: torch.Tensor, ref: dict[str, Any], plan: ExportPlan, report: ExportReport,
           tolerance: float) -> None:
    from transformers import AutoModelForCausalLM

    exported, info = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                          output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if type(exported).__name__ != ARCHITECTURES[plan.format] or problems:
        raise ExportError(f"the written checkpoint does not load as {ARCHITECTURES[plan.format]}: "
                          f"{type(exported).__name__}, {problems}")
    logits = exported.eval()(input_ids=ids).logits.float()
    diff = float((logits - ref["reference"]).abs().max())
    report.check_tokens = ids.numel()
    report.max_abs_logit_diff = diff
    report.tolerance = tolerance
    report.logit_scale = max(1.0, float(ref["reference"].abs().max()))
    report.measured = _measure(ref, logits, ids, plan)
    if not diff <= tolerance * report.logit_scale:
        raise ExportError(
            f"refusing to write {report.output_dir}: the exported model's logits differ from the loramix model's "
            f"by up to {diff:.3e} (allowed: tolerance {tolerance:.0e} x the largest |logit| {report.logit_scale:.1f}) "
            f"on {ids.numel()} tokens"
        )


@torch.no_grad()
def _logit_diff(directory: Path, ids: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest float32 logit difference of the checkpoint in ``directory`` (weights upcast) from ``reference``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    return float((model(input_ids=ids).logits.float() - reference).abs().max())


def export_model(
    adapter_dir: str | Path,
    output_dir: str | Path,
    model: str | None = None,
    format: str = "auto",
    check: bool = True,
    allow_approximate: bool = False,
    dtype: str = "float32",
    check_text: str | None = None,
    check_tokens: int = 128,
    tolerance: float = DEFAULT_TOLERANCE,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> ExportReport:
    """Export a MixLoRA adapter and its base model as a standard MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE).

    Args:
        adapter_dir: a loramix adapter directory (or an official MixLoRA one).
        output_dir: where the Hugging Face checkpoint is written (config, safetensors shards, tokenizer,
            generation config, model card README.md, loramix_export.json).
        model: the base model the adapter was trained on (hub id, local directory, .gguf file); default =
            the packaged SmolLM2-135M-Instruct.
        format: auto, mixtral, qwen2_moe or qwen3_moe; auto picks by the base (llama/mistral -> mixtral,
            qwen2 -> qwen2_moe, qwen3 -> qwen3_moe).
        check: load the written checkpoint with transformers and compare its float32 logits with the loramix
            model's on the check tokens; a model that differs by more than tolerance x the largest |logit| is
            not written.
        allow_approximate: export even where the format cannot reproduce the adapter exactly (a non-constant
            balance bias, the switch router's capacity limit); the difference is measured on the check
            tokens and reported.
        dtype: weights dtype of the written checkpoint: float32, bfloat16 or float16 (the check runs on float32
            weights before the cast).
        check_text: text (or a path to a UTF-8 text file) tokenised for the check; default: a built-in paragraph.
        check_tokens: at most this many tokens of the check text.
        tolerance: largest allowed float32 logit difference, relative to the largest |logit| (at least 1):
            float32 rounding grows with the logits' size.
        max_shard_size: largest safetensors shard, e.g. 2GB or 500MB.
        overwrite: replace a non-empty output_dir.
    """
    from .checkpoint import load_adapter
    from .models import load_base_model

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir / 'adapter_config.json'} not found: not an adapter directory")
    base, tokenizer = load_base_model(model, dtype="float32", device="cpu")
    adapted = load_adapter(base, adapter_dir)
    base_name = model or getattr(base.config, "_name_or_path", None)
    return export_adapted(
        adapted, output_dir, tokenizer, format=format, check=check, allow_approximate=allow_approximate,
        dtype=dtype, check_text=check_text, check_tokens=check_tokens, tolerance=tolerance,
        max_shard_size=max_shard_size, overwrite=overwrite, source_adapter=str(adapter_dir),
        base_model=str(base_name) if base_name else None,
    )
