"""Old path of :mod:`loramix.ffn_spec`, kept for one release."""

import warnings

from .ffn_spec import FFNNotSupportedError, FFNSpec, check_targets, detect_ffn, linear_shape, linear_weight

warnings.warn("loramix.ffn is now loramix.ffn_spec", DeprecationWarning, stacklevel=2)

__all__ = ["FFNNotSupportedError", "FFNSpec", "check_targets", "detect_ffn", "linear_shape", "linear_weight"]
