"""loramix: Mixture-of-LoRA-Experts fine-tuning for Hugging Face causal language models."""

from ._version import __version__
from .allocator import tune_malloc
from .checkpoint import AdapterLoadError, load_adapter, save_adapter
from .compiled import compile_decoding
from .config import ConfigError, MixLoraConfig
from .ffn_spec import FFNNotSupportedError
from .injection import compute_aux_loss, get_config, inject, routing_stats, unload
from .merge import merge_and_unload, merge_attention


def __getattr__(name: str):  # loramix.load_exported without importing the export package at import time
    if name == "load_exported":
        from .export import load_exported

        return load_exported
    raise AttributeError(f"module 'loramix' has no attribute {name!r}")


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
