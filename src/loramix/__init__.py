"""loramix: Mixture-of-LoRA-Experts fine-tuning for Hugging Face causal language models."""

from . import interop  # noqa: F401  registers the official mixlora format with load_adapter
from ._version import __version__
from .allocator import tune_malloc
from .checkpoint import AdapterLoadError, load_adapter, save_adapter
from .compiled import compile_decoding
from .config import ConfigError, MixLoraConfig
from .ffn_spec import FFNNotSupportedError
from .injection import compute_aux_loss, get_config, inject, routing_stats, unload
from .merge import merge_and_unload, merge_attention

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
    "merge_and_unload",
    "merge_attention",
    "routing_stats",
    "save_adapter",
    "tune_malloc",
    "unload",
]
