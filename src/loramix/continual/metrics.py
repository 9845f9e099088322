"""Continual-learning metrics, as pure functions of an accuracy matrix (plus a heatmap plot).

``R[j][i]`` is the score on task ``i`` after training on task ``j`` (``T x T``, rows = training stage).
Definitions (Lopez-Paz & Ranzato 2017, GEM; Chaudhry et al. 2018 for forgetting):

* ``ACC = mean_i R[T-1][i]``
* ``BWT = mean_{i<T-1} (R[T-1][i] - R[i][i])``          (negative = forgetting)
* ``FWT = mean_{i>0} (R[i-1][i] - b_i)``                ``b_i``: the base model's score on task ``i``
* ``forgetting = mean_{i<T-1} (max_{l<T-1} R[l][i] - R[T-1][i])``

Metrics that need two tasks or more are ``None`` when ``T == 1`` (JSON ``null``).

For a score where lower is better (the response ``loss``), ``higher_is_better=False`` keeps the signs
meaning the same thing: BWT, FWT and forgetting are computed on the negated score, so a negative BWT is
still forgetting (the loss of an earlier task went up by that much), a positive FWT still helps, and
forgetting is the rise of the loss above its best earlier value; ACC stays the mean final loss itself.
A stream whose tasks have different scores is summarised per score (:func:`summarize_by_score`), each
over the tasks with that score, since averaging accuracies with losses means nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Matrix = Sequence[Sequence[float]]


def check_matrix(R: Matrix) -> int:
    """Number of tasks ``T``; raises ValueError unless ``R`` is a non-empty square matrix of numbers."""
    T = len(R)
    if T == 0:
        raise ValueError("accuracy matrix is empty")
    for j, row in enumerate(R):
        if len(row) != T:
            raise ValueError(f"accuracy matrix must be square (T={T}); row {j} has {len(row)} entries")
        for i, v in enumerate(row):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
                raise ValueError(f"R[{j}][{i}] must be a number, got {v!r}")
    return T


def average_accuracy(R: Matrix) -> float:
    """ACC: mean score over all tasks after the last task."""
    T = check_matrix(R)
    return sum(R[T - 1]) / T


def backward_transfer(R: Matrix) -> float | None:
    """BWT: how training on later tasks changed the earlier ones (final minus just-learned score)."""
    T = check_matrix(R)
    if T < 2:
        return None
    return sum(R[T - 1][i] - R[i][i] for i in range(T - 1)) / (T - 1)


def forward_transfer(R: Matrix, base: Sequence[float]) -> float | None:
    """FWT: score on task ``i`` before training on it (after task ``i-1``) minus the base model's."""
    T = check_matrix(R)
    if len(base) != T:
        raise ValueError(f"base scores: expected {T} values, got {len(base)}")
    if T < 2:
        return None
    return sum(R[i - 1][i] - base[i] for i in range(1, T)) / (T - 1)


def forgetting_per_task(R: Matrix) -> list[float]:
    """``f_i = max_{l<T-1} R[l][i] - R[T-1][i]`` for every ``i < T-1`` (empty when T == 1)."""
    T = check_matrix(R)
    return [max(R[stage][i] for stage in range(T - 1)) - R[T - 1][i] for i in range(T - 1)]


def average_forgetting(R: Matrix) -> float | None:
    """Mean of :func:`forgetting_per_task` (Chaudhry et al. 2018)."""
    f = forgetting_per_task(R)
    return sum(f) / len(f) if f else None


def summarize(R: Matrix, base: Sequence[float] | None = None, *, higher_is_better: bool = True) -> dict[str, Any]:
    """All matrix metrics in one dict: acc, bwt, fwt (None without base scores), forgetting, per task.

    ``higher_is_better=False`` (a loss): bwt, fwt and forgetting of the negated matrix, so their signs read
    as for an accuracy; ``acc`` is the mean final score as it is."""
    check_matrix(R)
    sign = 1.0 if higher_is_better else -1.0
    S = [[sign * v for v in row] for row in R]
    sb = [sign * v for v in base] if base is not None else None
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(S),
        "fwt": forward_transfer(S, sb) if sb is not None else None,
        "forgetting": average_forgetting(S),
        "forgetting_per_task": forgetting_per_task(S),
        "final_scores": list(R[len(R) - 1]),
        "higher_is_better": higher_is_better,
    }


def summarize_by_score(
    R: Matrix, base: Sequence[float] | None, scores: Sequence[str], higher_is_better: dict[str, bool]
) -> dict[str, dict[str, Any]]:
    """:func:`summarize` per score name, over the tasks (columns) scored with it.

    ``scores[i]`` is task ``i``'s score. With task subset ``G``: ``acc = mean_{i in G} R[T-1][i]``,
    ``bwt = mean_{i in G, i<T-1} s(R[T-1][i] - R[i][i])``, ``fwt = mean_{i in G, i>0} s(R[i-1][i] - b_i)``,
    ``forgetting = mean_{i in G, i<T-1} (max_{l<T-1} sR[l][i] - sR[T-1][i])`` with ``s = +1`` (higher is
    better) or ``-1``; a metric with no task in its range is None."""
    T = check_matrix(R)
    if len(scores) != T:
        raise ValueError(f"expected {T} score names, got {len(scores)}")
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(scores):
        cols = [i for i in range(T) if scores[i] == name]
        sign = 1.0 if higher_is_better[name] else -1.0

        def mean(xs: list[float]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        f = [max(sign * R[stage][i] for stage in range(T - 1)) - sign * R[T - 1][i] for i in cols if i < T - 1]
        out[name] = {
            "tasks": cols,
            "acc": mean([R[T - 1][i] for i in cols]),
            "bwt": mean([sign * (R[T - 1][i] - R[i][i]) for i in cols if i < T - 1]),
            "fwt": mean([sign * (R[i - 1][i] - base[i]) for i in cols if i > 0]) if base is not None else None,
            "forgetting": mean(f),
            "final_scores": [R[T - 1][i] for i in cols],
            "higher_is_better": higher_is_better[name],
        }
    return out


# --------------------------------------------------------------------------------------------------
# novelty detection at task boundaries
# --------------------------------------------------------------------------------------------------
def boundary_detection(
    created_at: Sequence[int], boundaries: Sequence[int], tolerance: int
) -> dict[str, Any]:
    """Precision/recall of expert creation against the true task boundaries of a stream.

    ``created_at``: stream indices at which a new expert was created; ``boundaries``: indices where a
    task starts (include the first task's start, 0, when the learner starts without experts). A
    creation at ``c`` detects boundary ``b`` when ``b <= c <= b + tolerance``; boundaries are matched
    in order, each to the earliest unmatched creation in its window, and each creation detects at most
    one boundary. Unmatched creations are spurious; unmatched boundaries are missed.
    ``precision`` is None when nothing was created.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    created = sorted(int(c) for c in created_at)
    used = [False] * len(created)
    matches: list[tuple[int, int]] = []
    missed: list[int] = []
    for b in sorted(int(x) for x in boundaries):
        hit = next((k for k, c in enumerate(created) if not used[k] and b <= c <= b + tolerance), None)
        if hit is None:
            missed.append(b)
        else:
            used[hit] = True
            matches.append((b, created[hit]))
    spurious = [c for c, u in zip(created, used, strict=True) if not u]
    n_match = len(matches)
    precision = n_match / len(created) if created else None
    recall = n_match / len(boundaries) if boundaries else None
    f1 = None
    if precision is not None and recall is not None and precision + recall > 0:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tolerance": tolerance,
        "matches": [{"boundary": b, "created_at": c, "delay": c - b} for b, c in matches],
        "spurious": spurious,
        "missed": missed,
    }


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------
def save_json(data: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def plot_accuracy_matrix(
    R: Matrix, task_names: Sequence[str], path: str | Path, *, title: str = "accuracy matrix"
) -> Path:
    """Heatmap of ``R`` (rows: after training on task j, columns: evaluated task i), values written in."""
    from ..plots import pyplot

    plt = pyplot()
    T = check_matrix(R)
    if len(task_names) != T:
        raise ValueError(f"expected {T} task names, got {len(task_names)}")
    size = 1.6 + 0.9 * T
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    flat = [v for row in R for v in row]
    lo, hi = min(0.0, *flat), max(1.0, *flat)  # accuracies fill [0, 1]; losses can exceed it
    im = ax.imshow([list(row) for row in R], cmap="viridis", vmin=lo, vmax=hi)
    for j in range(T):
        for i in range(T):
            v = R[j][i]
            ax.text(i, j, f"{v:.2f}", ha="center", va="center", color="white" if v < lo + 0.6 * (hi - lo) else "black")
    ax.set_xticks(range(T), list(task_names), rotation=30, ha="right")
    ax.set_yticks(range(T), [f"after {n}" for n in task_names])
    ax.set(xlabel="evaluated task", ylabel="training stage", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
