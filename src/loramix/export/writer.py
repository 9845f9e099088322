"""Writing an export: pick the target, plan, build, check the written directory, move it into place.

Every target goes through the same steps (:class:`loramix.export.target.ExportTarget`): the checkpoint is
written to a staging directory beside ``output_dir``, loaded back by the target and its float32 logits are
compared with the loramix model's on a few tokens; a model that differs is not written, and nothing partial
is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import diskspace
from .._version import __version__
from ..checkpoint import apply_umask_modes
from ..injection import get_state
from ..quantized import refuse_quantized
from .checking import check_batch, measure, reference_run
from .mixtral import MixtralTarget
from .qwen_moe import Qwen2MoETarget, Qwen3MoETarget
from .target import (
    ExportError,
    ExportPlan,
    ExportReport,
    ExportTarget,
    human_bytes,
    layer_expert_counts,
    write_safetensors,
)
from .vllm import VllmTarget

#: every target by format name
TARGETS: dict[str, ExportTarget] = {t.name: t for t in (MixtralTarget(), Qwen2MoETarget(), Qwen3MoETarget(),
                                                         VllmTarget())}
FORMATS = ("auto", *TARGETS)
#: base model_type -> the standard MoE format ``auto`` picks
BASE_TO_FORMAT = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
#: the architecture of each standard MoE format (the vllm format's depends on the base: ``vllm.VLLM_ARCHITECTURES``)
ARCHITECTURES = {name: t.architecture for name, t in TARGETS.items() if hasattr(t, "architecture")}
DEFAULT_TOLERANCE = 1e-4


def _supported_text() -> str:
    return ", ".join(f"{base} -> {fmt}" for base, fmt in BASE_TO_FORMAT.items())


def resolve_format(model: nn.Module, format: str = "auto") -> str:
    """The export format for this base model; raises :class:`ExportError` naming the supported bases."""
    if format not in FORMATS:
        raise ExportError(f"format={format!r} is unknown; choose one of {', '.join(FORMATS)}")
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if format == "auto":
        target = BASE_TO_FORMAT.get(model_type)
        if target is None:
            raise ExportError(
                f"no standard MoE architecture represents a MixLoRA model on a {model_type!r} base exactly; "
                f"supported bases: {_supported_text()}"
            )
    else:
        target = format
        if model_type not in TARGETS[target].bases:
            standard = BASE_TO_FORMAT.get(model_type)
            hint = f"; use format={standard!r} (or auto)" if standard else f"; supported bases: {_supported_text()}"
            raise ExportError(f"format={format!r} cannot represent a {model_type!r} base "
                              f"(it takes {', '.join(TARGETS[target].bases)}){hint}")
    TARGETS[target].check_base(cfg)
    return target


def plan_export(model: nn.Module, format: str = "auto") -> ExportPlan:
    """Decide the exported architecture and list what it cannot reproduce exactly.

    Raises :class:`ExportError` for adapters the format cannot represent at all (for the standard MoE formats:
    ``top_p`` router, ``adapter`` experts, uneven expert counts with more than one expert per token).
    """
    get_state(model)  # a loramix model, or a clear error
    target = resolve_format(model, format)
    counts = layer_expert_counts(model, _supported_text())
    return TARGETS[target].plan(model, counts)


def _model_card(report: ExportReport, plan: ExportPlan, target: ExportTarget) -> str:
    base = report.base_model or "unknown"
    lines = [
        "---",
        "library_name: " + ("vllm" if plan.format == "vllm" else "transformers"),
        "tags: [loramix, mixlora, mixture-of-experts, moe]",
        *([f"base_model: {base}"] if report.base_model and "/" in base and not os.path.isabs(base) else []),
        "---",
        "",
        f"# {plan.architecture} exported by loramix {__version__}",
        "",
        f"A Mixture-of-LoRA-Experts model exported by [loramix](https://pypi.org/project/loramix/) {__version__} "
        f"in its `{plan.format}` format: it loads with {target.loads_with}.",
        "",
        f"- source adapter: `{report.source_adapter or 'an in-memory loramix model'}`",
        f"- base model: `{base}`",
        f"- experts per layer: {plan.num_experts}, experts per token: {plan.experts_per_token}",
        f"- weights: {report.dtype}, {human_bytes(report.exported_bytes)}",
        "",
        *target.card_lines(plan),
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
    from ..merge import merge_attention
    from ..models import DTYPE_CHOICES

    output_dir = Path(output_dir)
    if isinstance(dtype, str):
        if dtype not in DTYPE_CHOICES:
            raise ExportError(f"dtype={dtype!r} is unknown; choose one of {', '.join(DTYPE_CHOICES)}")
        dtype = DTYPE_CHOICES[dtype]
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise ExportError(f"output_dir {output_dir} exists and is not empty; pass overwrite=True (--overwrite)")
    refuse_quantized(dict(model.named_modules()), "export")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ExportError("export needs the model in float32 (load the base with dtype='float32')")
    plan = plan_export(model, format)
    target = TARGETS[plan.format]
    if plan.approximations and not allow_approximate:
        raise ExportError(
            "the exported model would not compute exactly what the loramix model does:\n- "
            + "\n- ".join(plan.approximations)
            + "\nPass allow_approximate=True (--allow-approximate) to export anyway; the difference is then "
            "measured on the check text and printed"
        )
    model.eval()
    ids = check_batch(tokenizer, model.config.vocab_size, check_text, check_tokens) if check else None
    ref = reference_run(model, plan, ids) if check else None
    base_params = {id(p): p for n, p in model.named_parameters() if "lora_" not in n and "mixlora_" not in n}
    base_count = sum(p.numel() for p in base_params.values())
    merge_attention(model)
    tensors = target.tensors(model, plan)
    config = target.config(model, plan, dtype)
    keep = getattr(target, "float32_tensors", ())

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
            output_dir=str(output_dir), format=plan.format, architecture=plan.architecture,
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
            _check(target, staging, ids, ref, plan, report, tolerance)
        if dtype != torch.float32:  # the checked float32 weights, rounded once to the storage dtype
            for f in [*staging.glob("*.safetensors"), *staging.glob("model.safetensors.index.json")]:
                f.unlink()
            report.exported_bytes = write_safetensors(staging, tensors, dtype, max_shard_size, keep)
            if check:
                report.measured["max_abs_logit_diff_after_cast"] = _logit_diff(target, staging, ids, ref["reference"])
            del tensors
        (staging / "README.md").write_text(_model_card(report, plan, target))
        (staging / "loramix_export.json").write_text(json.dumps(report.to_dict(), indent=2))
        apply_umask_modes(staging)
        if output_dir.exists():
            shutil.rmtree(output_dir) if output_dir.is_dir() else output_dir.unlink()
        os.replace(staging, output_dir)
    except Exception as e:
        diskspace.raise_if_disk_full(e, output_dir.parent, needed, "the exported model", remove=staging)
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return report


@torch.no_grad()
def _check(target: ExportTarget, directory: Path, ids: torch.Tensor, ref: dict[str, Any], plan: ExportPlan,
           report: ExportReport, tolerance: float) -> None:
    exported = target.load(directory)
    logits = exported(input_ids=ids).logits.float()
    diff = float((logits - ref["reference"]).abs().max())
    report.check_tokens = ids.numel()
    report.max_abs_logit_diff = diff
    report.tolerance = tolerance
    report.logit_scale = max(1.0, float(ref["reference"].abs().max()))
    report.measured = measure(ref, logits, ids, plan)
    if not diff <= tolerance * report.logit_scale:
        raise ExportError(
            f"refusing to write {report.output_dir}: the exported model's logits differ from the loramix model's "
            f"by up to {diff:.3e} (allowed: tolerance {tolerance:.0e} x the largest |logit| {report.logit_scale:.1f}) "
            f"on {ids.numel()} tokens"
        )


@torch.no_grad()
def _logit_diff(target: ExportTarget, directory: Path, ids: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest float32 logit difference of the checkpoint in ``directory`` (weights upcast) from ``reference``."""
    model = target.load(directory)
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
    """Export a MixLoRA adapter and its base model as a checkpoint another engine serves.

    Args:
        adapter_dir: a loramix adapter directory (or an official MixLoRA one).
        output_dir: where the checkpoint is written (config, safetensors shards, tokenizer, generation config,
            model card README.md, loramix_export.json).
        model: the base model the adapter was trained on (hub id, local directory, .gguf file); default =
            the packaged SmolLM2-135M-Instruct. A base whose weights differ from those the adapter records is
            refused (:class:`loramix.AdapterLoadError`).
        format: auto, mixtral, qwen2_moe, qwen3_moe or vllm. auto picks the standard MoE format of the base
            (llama/mistral -> mixtral, qwen2 -> qwen2_moe, qwen3 -> qwen3_moe); vllm writes loramix's native
            MixLoRA model for vLLM (base weights once, low-rank experts; served with ``pip install loramix[vllm]``).
        check: load the written checkpoint back and compare its float32 logits with the loramix model's on the
            check tokens; a model that differs by more than tolerance x the largest |logit| is not written.
        allow_approximate: export even where the format cannot reproduce the adapter exactly (for the standard
            MoE formats a non-constant balance bias; the switch router's capacity limit); the difference is
            measured on the check tokens and reported.
        dtype: weights dtype of the written checkpoint: float32, bfloat16 or float16 (the check runs on float32
            weights before the cast).
        check_text: text (or a path to a UTF-8 text file) tokenised for the check; default: a built-in paragraph.
        check_tokens: at most this many tokens of the check text.
        tolerance: largest allowed float32 logit difference, relative to the largest |logit| (at least 1):
            float32 rounding grows with the logits' size.
        max_shard_size: largest safetensors shard, e.g. 2GB or 500MB.
        overwrite: replace a non-empty output_dir.
    """
    from ..checkpoint import load_adapter
    from ..models import load_base_model

    adapter_dir = Path(adapter_dir)
    output_dir = Path(output_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir / 'adapter_config.json'} not found: not an adapter directory")
    if format not in FORMATS:  # before the model loads
        raise ExportError(f"format={format!r} is unknown; choose one of {', '.join(FORMATS)}")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise ExportError(f"output_dir {output_dir} exists and is not empty; pass overwrite=True (--overwrite)")
    base, tokenizer = load_base_model(model, dtype="float32", device="cpu")
    adapted = load_adapter(base, adapter_dir, strict_base=True)  # an export of another base is not the adapter
    base_name = model or getattr(base.config, "_name_or_path", None)
    return export_adapted(
        adapted, output_dir, tokenizer, format=format, check=check, allow_approximate=allow_approximate,
        dtype=dtype, check_text=check_text, check_tokens=check_tokens, tolerance=tolerance,
        max_shard_size=max_shard_size, overwrite=overwrite, source_adapter=str(adapter_dir),
        base_model=str(base_name) if base_name else None,
    )
