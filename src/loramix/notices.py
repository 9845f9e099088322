"""Third-party log notices that loramix drops, installed by ``import loramix`` before any of those packages loads.

bitsandbytes logs, once per process on CPUs without its optional ``kernels`` package, that it "failed to load"
a faster 4-bit kernel (it uses its own); transformers and peft import bitsandbytes whenever it is installed, so
every loramix user would see it, quantizing or not. Only that one notice is dropped; every other bitsandbytes
message passes.
"""

from __future__ import annotations

import logging

KERNELS_NOTICE = "kernels-community"
"""The text that marks bitsandbytes' missing-kernels notice."""


class DropKernelsNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return KERNELS_NOTICE not in record.getMessage()


def install() -> None:
    """Add the filter to the logger bitsandbytes writes the notice to (once per process)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, DropKernelsNotice) for f in logger.filters):
        logger.addFilter(DropKernelsNotice())
