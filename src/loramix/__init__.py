"""loramix: Mixture-of-LoRA-Experts fine-tuning for Hugging Face causal language models.

The names below are imported on first use (PEP 562), so ``import loramix`` and the ``loramix`` command's
``--help`` do not load torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import notices
from ._version import __version__

notices.install()  # before anything imports bitsandbytes

_EXPORTS = {
    "AdapterLoadError": "checkpoint",
    "ConfigError": "config",
    "FFNNotSupportedError": "ffn_spec",
    "MixLoraConfig": "config",
    "compile_decoding": "compiled",
    "compute_aux_loss": "injection",
    "get_config": "injection",
    "inject": "injection",
    "load_adapter": "checkpoint",
    "load_exported": "export",
    "merge_and_unload": "merge",
    "merge_attention": "merge",
    "routing_stats": "injection",
    "save_adapter": "checkpoint",
    "tune_malloc": "allocator",
    "unload": "injection",
}


__all__ = [
    "AdapterLoadError",
    "ConfigError",
    "FFNNotSupportedError",
    "MixLoraConfig",
    "__version__",
    "compile_decoding",
    "compute_aux_loss",
    "get_config",
    "inject",
    "load_adapter",
    "load_exported",
    "merge_and_unload",
    "merge_attention",
    "routing_stats",
    "save_adapter",
    "tune_malloc",
    "unload",
]

if TYPE_CHECKING:
    from .allocator import tune_malloc
    from .checkpoint import AdapterLoadError, load_adapter, save_adapter
    from .compiled import compile_decoding
    from .config import ConfigError, MixLoraConfig
    from .export import load_exported
    from .ffn_spec import FFNNotSupportedError
    from .injection import compute_aux_loss, get_config, inject, routing_stats, unload
    from .merge import merge_and_unload, merge_attention


def __getattr__(name: str) -> Any:
    """A public name from its module, or a submodule (``loramix.train``), imported on first access."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
