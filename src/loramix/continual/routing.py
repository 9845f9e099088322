"""Maturity-aware routing over skill experts by similarity to the skill prototypes.

An expert is *ready* once it is mature (enough examples seen AND its validation loss stopped improving) or
once its task has ended (a newer skill was detected, so it no longer trains). An example whose most similar
skill has a ready expert goes to its top-k most similar skills (sparse; top-1 = delegation to one expert); an
example whose most similar skill is the newest, still immature one is mixed densely over all experts
(softmax of the prototype similarities / temperature: collaborative, older experts still contribute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROUTING_POLICIES = ("hybrid", "dense", "sparse")


def route_weights(sims: torch.Tensor, mode: str, *, temperature: float = 0.05, top_k: int = 1,
                  min_weight: float = 1e-3) -> torch.Tensor:
    """Mixing weights ``(N, K)`` from prototype similarities ``(N, K)``; every row sums to one.

    ``dense``: ``softmax(sims / temperature)``, weights below ``min_weight`` set to 0 and the row
    renormalised (an expert with a negligible share is not run: it would cost its activations' memory and
    time for less than ``min_weight`` of the output). ``sparse``: the ``top_k`` most similar skills only,
    softmax-weighted among themselves (``top_k=1``: one-hot on the argmax).
    """
    if sims.dim() != 2:
        raise ValueError(f"sims must be (N, K), got shape {tuple(sims.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sims = sims.float()
    if sims.shape[1] == 0:
        return sims
    if mode == "dense":
        w = (sims / temperature).softmax(dim=-1)
        if min_weight > 0:  # the largest weight is >= 1/K, so no row becomes empty when min_weight <= 1/K
            w = torch.where(w >= min(min_weight, 1.0 / sims.shape[1]), w, torch.zeros_like(w))
            w = w / w.sum(dim=-1, keepdim=True)
        return w
    if mode != "sparse":
        raise ValueError(f"mode must be 'dense' or 'sparse', got {mode!r}")
    k = min(max(int(top_k), 1), sims.shape[1])
    top, idx = sims.topk(k, dim=-1)  # (N, k)
    out = torch.zeros_like(sims)
    return out.scatter(1, idx, (top / temperature).softmax(dim=-1))


@dataclass
class MaturityTracker:
    """Decides when an expert is mature: ``examples >= min_examples`` and a validation-loss plateau.

    A plateau is ``patience`` consecutive validation losses that do not improve on the best so far by
    more than ``min_delta``. Maturity latches: once mature, always mature.
    """

    min_examples: int = 64
    patience: int = 2
    min_delta: float = 0.01
    examples: int = 0
    best: float = math.inf
    bad_evals: int = 0
    mature: bool = False
    ended: bool = False  # its task ended: a newer expert exists (set by HybridRouter.new_expert)
    history: list[float] | None = None

    def __post_init__(self) -> None:
        if self.min_examples < 0 or self.patience < 1 or self.min_delta < 0:
            raise ValueError("MaturityTracker: need min_examples >= 0, patience >= 1, min_delta >= 0")
        if self.history is None:
            self.history = []

    @property
    def ready(self) -> bool:
        """Routed sparsely: mature, or its task has ended."""
        return self.mature or self.ended

    @property
    def plateaued(self) -> bool:
        return self.bad_evals >= self.patience

    def add_examples(self, n: int) -> bool:
        self.examples += int(n)
        return self._update()

    def add_val_loss(self, loss: float) -> bool:
        """Record one validation loss; returns True when this call made the expert mature."""
        assert self.history is not None
        self.history.append(float(loss))
        if loss < self.best - self.min_delta:
            self.best = float(loss)
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        return self._update()

    def restart_plateau(self) -> None:
        """Forget the best loss and the patience count (the history stays): the next loss starts a new
        comparison. Called when the validation set changed, since losses on different sets do not compare."""
        self.best = math.inf
        self.bad_evals = 0

    def _update(self) -> bool:
        if not self.mature and self.examples >= self.min_examples and self.plateaued:
            self.mature = True
            return True
        return False

    def state(self) -> dict:
        return {"examples": self.examples, "best_val_loss": None if math.isinf(self.best) else self.best,
                "bad_evals": self.bad_evals, "mature": self.mature, "ended": self.ended,
                "val_losses": list(self.history or [])}


class HybridRouter:
    """Routing policy of the continual model, per example: sparse when its most similar skill's expert is
    ready (mature, or its task has ended), dense when that is the newest expert and it is still immature.

    ``policy``: ``hybrid`` (the rule above), or ``dense`` / ``sparse`` for every example (ablations).
    """

    def __init__(
        self,
        policy: str = "hybrid",
        *,
        temperature: float = 0.05,
        top_k: int = 1,
        min_examples: int = 64,
        patience: int = 2,
        min_delta: float = 0.01,
    ) -> None:
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {ROUTING_POLICIES}, got {policy!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.policy = policy
        self.temperature = temperature
        self.top_k = top_k
        self.maturity_args = {"min_examples": min_examples, "patience": patience, "min_delta": min_delta}
        self.trackers: list[MaturityTracker] = []  # one per expert, in creation order

    def new_expert(self) -> MaturityTracker:
        for old in self.trackers:
            old.ended = True
        tracker = MaturityTracker(**self.maturity_args)
        self.trackers.append(tracker)
        return tracker

    @property
    def newest(self) -> MaturityTracker | None:
        return self.trackers[-1] if self.trackers else None

    @property
    def mode(self) -> str:
        """The mode of examples nearest the newest skill (hybrid: dense until its expert is mature); examples
        nearest an older skill are routed sparsely in any case (see :meth:`weights`)."""
        if self.policy != "hybrid":
            return self.policy
        newest = self.newest
        return "sparse" if newest is not None and newest.mature else "dense"

    def weights(self, sims: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Weights ``(N, K)`` for similarities ``(N, K)`` to the skills of the K experts. ``mode`` forces one
        mode for every row; otherwise the policy's, and with ``hybrid`` each row is sparse when its most
        similar skill's expert is ready, dense when it is the immature newest one."""
        kw = {"temperature": self.temperature, "top_k": self.top_k}
        if mode is not None or self.policy != "hybrid" or sims.dim() != 2 or sims.shape[1] == 0:
            return route_weights(sims, mode or self.mode, **kw)
        if sims.shape[1] != len(self.trackers):
            raise ValueError(f"similarities to {sims.shape[1]} skills for {len(self.trackers)} experts")
        ready = torch.tensor([t.ready for t in self.trackers])
        if bool(ready.all()):
            return route_weights(sims, "sparse", **kw)
        sparse_rows = ready[sims.argmax(dim=-1)]  # (N,)
        if not bool(sparse_rows.any()):
            return route_weights(sims, "dense", **kw)
        sparse, dense = route_weights(sims, "sparse", **kw), route_weights(sims, "dense", **kw)
        return torch.where(sparse_rows[:, None], sparse, dense)
