"""Deprecated module path: the skill library's functions live in :mod:`loramix.skills.api`."""

from .api import *  # noqa: F401,F403
