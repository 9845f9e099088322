"""Export a MixLoRA model as a checkpoint that other engines load.

Targets (``format``), one module each behind :class:`~loramix.export.target.ExportTarget`:

* ``mixtral`` (:mod:`.mixtral`) for Llama- and Mistral-family bases, ``qwen2_moe`` / ``qwen3_moe``
  (:mod:`.qwen_moe`) for Qwen2 / Qwen3 bases: standard MoE checkpoints whose experts are merged FFNs; they load
  in transformers, vLLM and llama.cpp (:mod:`.moe` says what they represent exactly);
* ``vllm`` (:mod:`.vllm`): loramix's native MixLoRA model for vLLM with the base weights stored once and the
  experts as low-rank factors, exact for every router, both expert types and per-layer expert counts;
  served by vLLM with :mod:`loramix.vllm_plugin`, read back by :func:`load_exported`.

The writer (:mod:`.writer`) checks its own output: it loads the written checkpoint back and compares its
float32 logits with the loramix model's on a few tokens, and refuses to write a model that differs.

To add a target: a module here with an :class:`ExportTarget` subclass, one entry in ``writer.TARGETS``.
"""

from .checking import DEFAULT_CHECK_TEXT, as_exported, check_batch
from .target import ExportError, ExportPlan, ExportReport, ExportTarget, write_safetensors
from .vllm import load_exported
from .writer import (
    ARCHITECTURES,
    BASE_TO_FORMAT,
    DEFAULT_TOLERANCE,
    FORMATS,
    TARGETS,
    export_adapted,
    export_model,
    plan_export,
    resolve_format,
)

__all__ = [
    "ARCHITECTURES", "BASE_TO_FORMAT", "DEFAULT_CHECK_TEXT", "DEFAULT_TOLERANCE", "FORMATS", "TARGETS",
    "ExportError", "ExportPlan", "ExportReport", "ExportTarget", "as_exported", "check_batch", "export_adapted",
    "export_model", "load_exported", "plan_export", "resolve_format", "write_safetensors",
]
