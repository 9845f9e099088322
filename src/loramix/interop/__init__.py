"""Readers for adapters written by other MoE-LoRA implementations."""

from .mixlora_official import (
    OfficialMixLoraError,
    convert_official_weights,
    load_official_mixlora,
    official_to_loramix_config,
    read_official_adapter,
)

__all__ = [
    "OfficialMixLoraError",
    "convert_official_weights",
    "load_official_mixlora",
    "official_to_loramix_config",
    "read_official_adapter",
]
