"""Continual learning with growing LoRA experts (``loramix continual``).

A stream of examples from tasks that arrive one after another, without task labels: a novelty
detector compares each example's embedding with skill prototypes and creates a new expert after a
sustained novel stretch; old experts are frozen (or L2-anchored); routing by prototype similarity is
dense while the newest expert matures and sparse afterwards. ``run_continual`` adds baselines and the
standard metrics (ACC, BWT, FWT, forgetting, boundary-detection precision/recall).
"""

from .config import ContinualConfig, resolve_config
from .experts import ExpertBank, FFNExpert, GrowableFFN
from .learner import ContinualLearner, load_continual
from .metrics import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    boundary_detection,
    forgetting_per_task,
    forward_transfer,
    plot_accuracy_matrix,
    summarize,
)
from .novelty import Decision, HiddenStateEmbedder, NoveltyDetector, SentenceEmbedder, SkillPrototypes, build_embedder
from .routing import HybridRouter, MaturityTracker, route_weights
from .run import (
    format_report,
    routed_multiple_choice,
    run_continual,
    score_routed,
    similarity_report,
)
from .stream import EncodedExample, Example, Stream, Task, build_stream, load_task, load_tasks, synthetic_tasks

__all__ = [
    "ContinualConfig",
    "ContinualLearner",
    "Decision",
    "EncodedExample",
    "Example",
    "ExpertBank",
    "FFNExpert",
    "GrowableFFN",
    "HiddenStateEmbedder",
    "HybridRouter",
    "MaturityTracker",
    "NoveltyDetector",
    "SentenceEmbedder",
    "SkillPrototypes",
    "Stream",
    "Task",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "boundary_detection",
    "build_embedder",
    "build_stream",
    "format_report",
    "forgetting_per_task",
    "forward_transfer",
    "load_continual",
    "load_task",
    "load_tasks",
    "plot_accuracy_matrix",
    "resolve_config",
    "route_weights",
    "routed_multiple_choice",
    "run_continual",
    "score_routed",
    "similarity_report",
    "summarize",
    "synthetic_tasks",
]


def __getattr__(name: str):
    if name == "SkillLibrary":  # the old name, kept for one release (loramix.skills.SkillLibrary is another class)
        import warnings

        warnings.warn("loramix.continual.SkillLibrary is now SkillPrototypes", DeprecationWarning, stacklevel=2)
        return SkillPrototypes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
