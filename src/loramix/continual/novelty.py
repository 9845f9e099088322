"""Novelty detection: embed examples, compare them with a library of skill prototypes, and create a new
skill only after a sustained stretch of novel examples.

Embeddings are L2-normalised; a skill's prototype is the running mean of the (normalised) embeddings
assigned to it, and similarity is cosine similarity. The default embedder mean-pools the hidden states
of the frozen base model (experts disabled, so embeddings never drift while experts train).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..embedding import HiddenStateEmbedder, SentenceEmbedder

# --------------------------------------------------------------------------------------------------
# embedders
# --------------------------------------------------------------------------------------------------
Embedder = Callable[[Sequence[str]], torch.Tensor]
"""texts -> (N, D) float32 CPU tensor of L2-normalised embeddings."""


def build_embedder(
    spec: str,
    model: Any,
    tokenizer: Any,
    *,
    layer: int = -1,
    batch_size: int = 16,
    max_length: int = 256,
    disable: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> Embedder:
    """``hidden`` (default), ``sentence:minilm``, ``sentence:<encoder directory>`` or ``sentence:<hub name>``
    (the last needs sentence-transformers)."""
    if spec == "hidden":
        return HiddenStateEmbedder(
            model, tokenizer, layer=layer, batch_size=batch_size, max_length=max_length, disable=disable
        )
    if spec.startswith("sentence:") and spec.split(":", 1)[1]:
        return SentenceEmbedder(spec.split(":", 1)[1], batch_size=batch_size, max_length=max_length)
    raise ValueError(f"embedder must be 'hidden' or 'sentence:<model>', got {spec!r}")


# --------------------------------------------------------------------------------------------------
# skill prototypes and detector
# --------------------------------------------------------------------------------------------------
class SkillPrototypes:
    """Skill prototypes: running means of the normalised embeddings assigned to each skill.

    Each skill also keeps the count, sum and sum of squares of the *held-out* similarities of its members
    (an example's similarity to the prototype before it joined; a founding member's similarity to the mean
    of the other founders), from which :meth:`spread` estimates how far the skill's own examples lie from
    its prototype.
    """

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []
        self.counts: list[int] = []
        self.sim_stats: list[list[float]] = []  # per skill: [n, sum, sum of squares] of held-out similarities

    def __len__(self) -> int:
        return len(self.counts)

    def add(self, embeddings: torch.Tensor) -> int:
        """New skill from ``(n, D)`` embeddings; returns its id."""
        embeddings = F.normalize(embeddings.reshape(-1, embeddings.shape[-1]).float(), dim=-1)  # (n, D)
        n = embeddings.shape[0]
        total = embeddings.sum(0)
        stats = [0.0, 0.0, 0.0]
        if n >= 2:  # leave-one-out similarity of each founder to the others' mean
            loo = F.normalize(total[None, :] - embeddings, dim=-1)  # (n, D)
            sims = (loo * embeddings).sum(-1)  # (n,)
            stats = [float(n), float(sims.sum()), float((sims**2).sum())]
        self.sums.append(total)
        self.counts.append(n)
        self.sim_stats.append(stats)
        return len(self.counts) - 1

    def update(self, skill: int, embedding: torch.Tensor) -> None:
        emb = embedding.reshape(-1).float()
        if self.counts[skill]:
            sim = float(F.normalize(emb, dim=0) @ F.normalize(self.sums[skill], dim=0))
            st = self.sim_stats[skill]
            st[0], st[1], st[2] = st[0] + 1, st[1] + sim, st[2] + sim * sim
        self.sums[skill] = self.sums[skill] + emb
        self.counts[skill] += 1

    def remove(self, skill: int, embedding: torch.Tensor) -> None:
        """Take one embedding back out of a skill's prototype (the similarity statistics are kept)."""
        if self.counts[skill] <= 1:
            raise ValueError(f"skill {skill} would have no member left")
        self.sums[skill] = self.sums[skill] - embedding.reshape(-1).float()
        self.counts[skill] -= 1

    def prototypes(self) -> torch.Tensor:
        """``(K, D)`` normalised prototypes (``(0, 0)`` when empty)."""
        if not self.sums:
            return torch.zeros(0, 0)
        return F.normalize(torch.stack(self.sums) / torch.tensor(self.counts, dtype=torch.float32)[:, None], dim=-1)

    def similarities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``(N, K)`` of ``(N, D)`` (or ``(D,)``) embeddings to every prototype."""
        emb = F.normalize(embeddings.reshape(-1, embeddings.shape[-1]).float(), dim=-1)
        if not self.sums:
            return torch.zeros(emb.shape[0], 0)
        return emb @ self.prototypes().t()

    def resultant(self, skill: int) -> float:
        """Estimated length ``rho`` of the mean of the skill's (unit) embeddings as the sample grows: with
        ``n`` members summing to ``S``, ``E|S/n|^2 = rho^2 + (1 - rho^2) / n``, so
        ``rho^2 = (|S|^2 / n - 1) / (n - 1)`` (clamped to (0, 1)). Needs ``n >= 2``."""
        n = self.counts[skill]
        if n < 2:
            raise ValueError(f"skill {skill} has {n} member(s); rho needs two")
        s2 = float(self.sums[skill] @ self.sums[skill])
        rho2 = min(max((s2 / n - 1.0) / (n - 1.0), 1e-8), 1.0 - 1e-8)
        return math.sqrt(rho2)

    def window_distance(self, skill: int, window: int) -> float:
        """Expected ``1 - cos`` between the mean of ``window`` of the skill's own examples and its prototype:
        ``1 - rho / sqrt(rho^2 + (1 - rho^2) / window)`` (the mean of ``window`` unit vectors around a mean
        of length ``rho`` has squared length ``rho^2 + (1 - rho^2) / window``)."""
        rho = self.resultant(skill)
        return 1.0 - rho / math.sqrt(rho * rho + (1.0 - rho * rho) / window)

    def spread(self) -> float | None:
        """Pooled standard deviation of the held-out member similarities over all skills (None before any
        skill has two members): how far a skill's own examples scatter around its prototype."""
        n = sum(st[0] for st in self.sim_stats)
        if n < 2:
            return None
        var = 0.0
        for k, s, ss in self.sim_stats:
            if k >= 2:
                var += ss - s * s / k  # within-skill sum of squared deviations
        groups = sum(1 for st in self.sim_stats if st[0] >= 2)
        return math.sqrt(max(var / max(n - groups, 1.0), 0.0)) or None

    def state_dict(self) -> dict[str, Any]:
        return {"sums": torch.stack(self.sums) if self.sums else torch.zeros(0), "counts": list(self.counts),
                "sim_stats": [list(st) for st in self.sim_stats]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts = [int(c) for c in state["counts"]]
        self.sums = [row.clone().float() for row in state["sums"]] if counts else []
        self.counts = counts
        self.sim_stats = [list(map(float, st)) for st in state.get("sim_stats", [[0.0, 0.0, 0.0]] * len(counts))]


@dataclass
class Decision:
    """One logged decision about a stream example (``skill``: the skill it was assigned to, if any)."""

    index: int
    best_similarity: float | None
    matched_skill: int | None
    decision: str  # known | novel | new_skill | outlier | founder (auto: joined an old skill, then founded a new one)
    skill: int | None = None
    num_skills: int = 0
    members: list[int] = field(default_factory=list)  # new_skill: the examples that formed the skill
    resolved_at: int | None = None  # outlier: the index whose arrival resolved this pending example
    shift: float | None = None  # threshold="auto": the window's distance ratio to its nearest skill

    def to_dict(self) -> dict[str, Any]:
        d = {"index": self.index, "best_similarity": self.best_similarity, "matched_skill": self.matched_skill,
             "decision": self.decision, "skill": self.skill, "num_skills": self.num_skills}
        if self.members:
            d["members"] = list(self.members)
        if self.resolved_at is not None:
            d["resolved_at"] = self.resolved_at
        if self.shift is not None:
            d["shift"] = round(self.shift, 3)
        return d


class NoveltyDetector:
    """Assigns stream examples to skills and decides when a new skill starts.

    The first ``window`` examples found the first skill. After that, two rules:

    * ``threshold="auto"`` (default, calibrated by the data): every example joins its nearest skill; after
      each one, the mean of the last ``window`` examples (those since the last new skill) is compared with
      every prototype. Its distance ``1 - cos`` to skill ``k``, divided by the distance expected for a mean of
      ``window`` of skill ``k``'s own examples (:meth:`SkillPrototypes.window_distance`, estimated from how
      concentrated skill ``k``'s members are), is the window's *shift*. When the shift to every skill exceeds
      ``shift`` (default 4), the window's examples that are nearer to their own mean than to any old
      prototype found a new skill (and leave the prototypes they had joined). Averaging ``window`` examples
      removes most of the per-example scatter, so this tells apart tasks whose single examples overlap, and
      the scale is set by each skill's own data: nothing depends on the embedder's absolute similarities.
    * ``threshold=<float>``: an example is novel when its best prototype similarity is below the threshold.
      Novel examples wait in a pending buffer; the ``window``-th consecutive one creates a new skill whose
      prototype is the mean of the buffer, and all of them are assigned to it. A known example ends the
      stretch: the pending examples were outliers and go to their nearest skill (without moving its
      prototype). Known examples update their skill's prototype.
    """

    def __init__(self, threshold: float | str = "auto", window: int = 8, library: SkillPrototypes | None = None,
                 *, shift: float = 4.0) -> None:
        if threshold != "auto" and not (isinstance(threshold, (int, float)) and -1.0 <= threshold <= 1.0):
            raise ValueError(f"threshold is 'auto' or a cosine similarity in [-1, 1], got {threshold!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if shift <= 1.0:
            raise ValueError(f"shift must be > 1 (own windows sit at about 1), got {shift}")
        self.threshold = threshold
        self.window = window
        self.shift = shift
        self.library = library if library is not None else SkillPrototypes()
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.recent: list[tuple[int, torch.Tensor, int]] = []  # auto: (index, embedding, skill) since a new skill
        self.log: list[Decision] = []
        self.created_at: list[int] = []  # stream index at which each skill was created

    @property
    def auto(self) -> bool:
        return self.threshold == "auto"

    def window_shift(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Shift ``(K,)`` of the mean of ``(w, D)`` embeddings to every skill (inf for a one-member skill)."""
        w = embeddings.shape[0]
        mean = F.normalize(embeddings.float().mean(0), dim=0)  # (D,)
        dist = 1.0 - self.library.similarities(mean)[0]  # (K,)
        expected = torch.tensor([self.library.window_distance(k, w) if self.library.counts[k] >= 2 else 0.0
                                 for k in range(len(self.library))])
        return torch.where(expected > 0, dist / expected.clamp(min=1e-12), torch.full_like(dist, math.inf))

    def observe(self, index: int, embedding: torch.Tensor) -> tuple[Decision, list[tuple[int, int]]]:
        """Process one example; returns its decision and the ``(index, skill)`` assignments it finalised."""
        emb = F.normalize(embedding.reshape(-1).float(), dim=0)
        sims = self.library.similarities(emb)[0]  # (K,)
        best = float(sims.max()) if sims.numel() else None
        matched = int(sims.argmax()) if sims.numel() else None
        if self.auto and matched is not None:
            return self._observe_auto(index, emb, best, matched)
        assignments: list[tuple[int, int]] = []
        records: list[Decision] = []
        if best is not None and best >= float(self.threshold):
            assert matched is not None
            for j, e in self.pending:  # the novel stretch was not sustained
                s = self.library.similarities(e)[0]
                skill = int(s.argmax())
                records.append(
                    Decision(j, float(s.max()), skill, "outlier", skill, len(self.library), resolved_at=index)
                )
                assignments.append((j, skill))
            self.pending.clear()
            self.library.update(matched, emb)
            decision = Decision(index, best, matched, "known", matched, len(self.library))
            assignments.append((index, matched))
        else:
            self.pending.append((index, emb))
            if len(self.pending) >= self.window:
                members = [j for j, _ in self.pending]
                skill = self.library.add(torch.stack([e for _, e in self.pending]))
                self.created_at.append(index)
                assignments.extend((j, skill) for j in members)
                self.pending.clear()
                decision = Decision(index, best, matched, "new_skill", skill, len(self.library), members=members)
            else:
                decision = Decision(index, best, matched, "novel", None, len(self.library))
        records.append(decision)
        self.log.extend(records)
        return decision, assignments

    def _observe_auto(self, index: int, emb: torch.Tensor, best: float | None,
                      matched: int) -> tuple[Decision, list[tuple[int, int]]]:
        self.library.update(matched, emb)
        self.recent.append((index, emb, matched))
        self.recent = self.recent[-self.window :]
        decision = Decision(index, best, matched, "known", matched, len(self.library))
        if len(self.recent) == self.window and self.library.counts[-1] >= 2 * self.window:
            window = torch.stack([e for _, e, _ in self.recent])  # (w, D)
            shifts = self.window_shift(window)
            decision.shift = float(shifts.min())
            if decision.shift > self.shift:
                founders = self._found(window)
                if founders is not None:
                    decision.decision, decision.skill = "new_skill", len(self.library) - 1
                    decision.members, decision.num_skills = founders, len(self.library)
        self.log.append(decision)
        # the earlier founders already joined their nearest skill; a learner with a training lag hands them
        # over (by nearest prototype) when it sees the new_skill decision
        if decision.decision == "new_skill" and index in decision.members:
            assert decision.skill is not None
            return decision, [(index, decision.skill)]
        if decision.decision == "new_skill":
            sims = self.library.similarities(emb)[0]
            return decision, [(index, int(sims[:-1].argmax()))]
        return decision, [(index, matched)]

    def _found(self, window: torch.Tensor) -> list[int] | None:
        """Found a skill from the window: the examples nearer the new skill's centre than to any old prototype
        (the centre starts as the window's mean and is re-estimated from those examples twice, so a window
        that straddles the boundary keeps only the new task's side) leave the skills they joined and become
        its members; their earlier ``known`` records become ``founder`` records. None (nothing changes) when
        fewer than two qualify."""
        old = self.library.similarities(window).max(dim=1).values  # (w,)
        keep = list(range(len(self.recent)))
        for _ in range(3):
            center = F.normalize(window[keep].mean(0), dim=0)  # (D,)
            nearer = [j for j in range(len(self.recent)) if float(window[j] @ center) >= float(old[j])]
            if len(nearer) < 2:
                return None
            if nearer == keep:
                break
            keep = nearer
        for j in keep:
            _, e, skill = self.recent[j]
            if self.library.counts[skill] > 1:
                self.library.remove(skill, e)
        members = [self.recent[j][0] for j in keep]
        new_skill = self.library.add(torch.stack([self.recent[j][1] for j in keep]))
        moved = set(members)
        for d in reversed(self.log[-self.window :]):
            if d.index in moved and d.decision == "known":
                d.decision, d.skill = "founder", new_skill
        self.created_at.append(self.recent[-1][0])
        self.recent = []
        return members
