"""Old path of :mod:`loramix.cli.commands`, kept for one release."""

import warnings

from .cli.commands import *  # noqa: F401,F403
from .cli.commands import bench_harness, check_sampling  # noqa: F401

warnings.warn("loramix.commands is now loramix.cli.commands", DeprecationWarning, stacklevel=2)
