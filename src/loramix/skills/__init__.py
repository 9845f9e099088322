"""Skill blending: independent skill adapters on one frozen base, a learned gate, per-example mixing.

``skills_add`` trains one adapter per skill (``loramix.train``) into a library directory and extends the
gate; ``skills_route`` shows the gate's weights; ``skills_generate`` generates with the adapters blended
per prompt (top-1 or soft); ``skills_compare_static`` puts the same prompts through PEFT's static weighted
merge of plain-LoRA skills. See docs/skills.md.
"""

from .api import skills_add, skills_compare_static, skills_generate, skills_list, skills_route
from .blend import SkillBlend
from .gate import Gate, GateConfig, apply_policy
from .library import SkillLibrary, SkillLibraryError
from .static_merge import StaticMergeError, build_static_merge, loramix_to_peft

__all__ = [
    "Gate",
    "GateConfig",
    "SkillBlend",
    "SkillLibrary",
    "SkillLibraryError",
    "StaticMergeError",
    "apply_policy",
    "build_static_merge",
    "loramix_to_peft",
    "skills_add",
    "skills_compare_static",
    "skills_generate",
    "skills_list",
    "skills_route",
]
