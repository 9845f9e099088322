"""Old path of :mod:`loramix.skills.api`, kept for one release."""

import warnings

from .api import *  # noqa: F401,F403

warnings.warn("loramix.skills.commands is now loramix.skills.api", DeprecationWarning, stacklevel=2)
