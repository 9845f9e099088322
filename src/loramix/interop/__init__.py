"""Readers for adapters written by other MoE-LoRA implementations.

Importing this package registers each format with :func:`loramix.checkpoint.load_adapter`, which imports it on
its first call (``checkpoint.FORMAT_MODULES``), so ``load_adapter`` reads an official ``mixlora`` adapter
directory like a loramix one.
"""

from ..checkpoint import AdapterFormat, register_adapter_format
from .mixlora_official import (
    OfficialMixLoraError,
    convert_official_weights,
    is_official_mixlora,
    load_official_mixlora,
    official_to_loramix_config,
    read_official_adapter,
)

register_adapter_format(AdapterFormat("mixlora_official", is_official_mixlora, load_official_mixlora))

__all__ = [
    "OfficialMixLoraError",
    "convert_official_weights",
    "is_official_mixlora",
    "load_official_mixlora",
    "official_to_loramix_config",
    "read_official_adapter",
]
