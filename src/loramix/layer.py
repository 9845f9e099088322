"""Old path of :mod:`loramix.moe_layer`, kept for one release."""

import warnings

from .moe_layer import AdapterExperts, ExpertLoRA, MixLoraFFN

warnings.warn("loramix.layer is now loramix.moe_layer", DeprecationWarning, stacklevel=2)

__all__ = ["AdapterExperts", "ExpertLoRA", "MixLoraFFN"]
