"""The interface every export target implements, and the records an export produces.

A target is one on-disk format (``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``vllm``). The writer
(:mod:`loramix.export.writer`) asks it, in order, for:

1. :meth:`ExportTarget.plan` -- which experts per token, what it cannot reproduce exactly (``ExportError`` for
   adapters it cannot represent at all);
2. :meth:`ExportTarget.config` and :meth:`ExportTarget.tensors` -- the ``config.json`` and the float32 tensors,
   built from the adapted model through its public accessors (``FrozenFFN.frozen_weights``,
   ``ExpertLoRA.merged_delta`` / ``factors``, ``Router.export_state``);
3. :meth:`ExportTarget.load` -- the written directory loaded back as a float32 torch model, whose logits the
   writer compares with the loramix model's before it moves the directory into place;
4. :meth:`ExportTarget.card_lines` -- the model card's format-specific lines.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..injection import get_state
from ..moe_layer import MixLoraFFN


class ExportError(ValueError):
    """The adapter cannot be exported as asked; the message names the option or field to change."""


@dataclass
class ExportPlan:
    """What :func:`loramix.export.export_model` will write, decided before any weight is touched."""

    format: str
    num_experts: int  # experts per MoE layer in the exported model (the largest count; padded layers)
    experts_per_token: int
    layer_experts: list[int]  # loramix's expert count of each decoder layer (0 = frozen FFN)
    approximations: list[str] = field(default_factory=list)  # what the export does not reproduce exactly
    notes: list[str] = field(default_factory=list)  # exact mappings worth knowing
    architecture: str = ""  # config.json's architectures[0]
    drop_balance_bias: bool = False  # the exported router chooses without the balance bias (an approximation)


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
            f"size: exported {human_bytes(self.exported_bytes)} ({self.exported_params / 1e6:.1f}M params); "
            f"base {human_bytes(self.base_bytes)} ({self.base_params / 1e6:.1f}M params, {self.dtype}); "
            + (f"adapter {human_bytes(self.adapter_bytes)}" if self.adapter_bytes is not None
               else "adapter: in memory"),
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


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class ExportTarget:
    """One export format. Subclasses set ``name``, ``bases`` and ``loads_with`` and implement the methods."""

    name: ClassVar[str]
    bases: ClassVar[tuple[str, ...]]  # the base model_types this format represents
    loads_with: ClassVar[str]  # for the model card: which software loads the checkpoint

    def check_base(self, cfg: Any) -> None:
        """Raise :class:`ExportError` for a base config this format cannot represent (beyond its model_type)."""

    def plan(self, model: nn.Module, layer_experts: list[int]) -> ExportPlan:
        raise NotImplementedError

    def config(self, model: nn.Module, plan: ExportPlan, dtype: torch.dtype) -> Any:
        """The checkpoint's config: an object with ``save_pretrained(directory)``."""
        raise NotImplementedError

    def tensors(self, model: nn.Module, plan: ExportPlan) -> dict[str, torch.Tensor]:
        """The float32 tensors by on-disk name; the model's attention LoRA is already merged."""
        raise NotImplementedError

    def load(self, directory: Path) -> nn.Module:
        """The written checkpoint as a float32 torch model in eval mode (the writer's check runs it)."""
        raise NotImplementedError

    def card_lines(self, plan: ExportPlan) -> list[str]:
        """Format-specific lines of the model card (after the summary)."""
        return []


# --------------------------------------------------------------------------------------------------
# helpers every target uses
# --------------------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module, supported: str) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ExportError(f"{type(model).__name__}: no model.layers decoder list; supported bases: {supported}")
    return layers


def layer_expert_counts(model: nn.Module, supported: str) -> list[int]:
    """Each decoder layer's expert count (0 = frozen FFN); raises for untracked layers or no MoE layer."""
    state = get_state(model)
    tracked = set(map(id, state.moe_layers.values()))
    counts = []
    for i, block in enumerate(decoder_layers(model, supported)):
        mlp = getattr(block, state.config.mlp_name, None)
        counts.append(mlp.num_experts if isinstance(mlp, MixLoraFFN) else 0)
        if isinstance(mlp, MixLoraFFN) and id(mlp) not in tracked:
            raise ExportError(f"layer {i}: a MixLoRA layer that loramix does not track; re-load the adapter")
    if not any(counts):
        raise ExportError("the model has no MixLoRA layer to export")
    return counts


def bias_is_constant(layer: MixLoraFFN) -> bool:
    _, bias = layer.router.export_state()
    return bool((bias == bias[0]).all())


def biased_layers(model: nn.Module, counts: list[int]) -> list[int]:
    """Decoder layers whose balance bias differs between experts (it then changes which experts are chosen)."""
    state = get_state(model)
    layers = decoder_layers(model, "")
    return [i for i, n in enumerate(counts) if n and not bias_is_constant(getattr(layers[i], state.config.mlp_name))]


def write_safetensors(directory: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                      max_shard_size: str | int = "2GB", keep_float32: tuple[str, ...] = ()) -> int:
    """Sharded safetensors (plus ``model.safetensors.index.json`` when there are several); returns bytes.

    Tensors whose name ends with one of ``keep_float32`` stay float32 whatever ``dtype`` is (routers).
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    cast = {k: (v if k.endswith(keep_float32) and keep_float32 else v.to(dtype)).contiguous()
            for k, v in tensors.items()}
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
