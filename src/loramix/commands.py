"""Deprecated module path: the command functions live in :mod:`loramix.cli.commands`."""

from .cli.commands import *  # noqa: F401,F403
from .cli.commands import bench_harness, check_sampling  # noqa: F401
