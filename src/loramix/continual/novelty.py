"""Novelty detection: embed examples, compare them with a library of skill prototypes, and create a new
skill only after a sustained stretch of novel examples.

Embeddings are L2-normalised; a skill's prototype is the running mean of the (normalised) embeddings
assigned to it, and similarity is cosine similarity. The default embedder mean-pools the hidden states
of the frozen base model (experts disabled, so embeddings never drift while experts train).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..embedding import SentenceEmbedder, mean_pool

# --------------------------------------------------------------------------------------------------
# embedders
# --------------------------------------------------------------------------------------------------
Embedder = Callable[[Sequence[str]], torch.Tensor]
"""texts -> (N, D) float32 CPU tensor of L2-normalised embeddings."""


class HiddenStateEmbedder:
    """Masked mean of one layer's hidden states of a causal LM (``layer=-1``: the last one).

    ``disable`` is a context-manager factory that turns adapters off during embedding (for example
    ``ExpertBank.disabled``), so the embedding is the frozen base model's whatever the experts learn.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        layer: int = -1,
        batch_size: int = 16,
        max_length: int = 256,
        disable: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.batch_size = batch_size
        self.max_length = max_length
        self.disable = disable

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            raise ValueError("nothing to embed")
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        was_training = self.model.training
        self.model.eval()
        out = []
        guard = self.disable() if self.disable is not None else contextlib.nullcontext()
        try:
            with guard:
                for start in range(0, len(texts), self.batch_size):
                    ids = [self.tokenizer(t)["input_ids"][: self.max_length] or [pad]
                           for t in texts[start : start + self.batch_size]]
                    width = max(len(x) for x in ids)
                    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
                    mask = torch.zeros((len(ids), width), dtype=torch.long)
                    for j, x in enumerate(ids):
                        input_ids[j, : len(x)] = torch.tensor(x)
                        mask[j, : len(x)] = 1
                    hidden = self.model(
                        input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True
                    ).hidden_states[self.layer]  # (B, L, H)
                    pooled = mean_pool(hidden.float(), mask.to(hidden.device))  # (B, H)
                    out.append(F.normalize(pooled, dim=-1).cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out)


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
    """Skill prototypes: running means of the normalised embeddings assigned to each skill."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []
        self.counts: list[int] = []

    def __len__(self) -> int:
        return len(self.counts)

    def add(self, embeddings: torch.Tensor) -> int:
        """New skill from ``(n, D)`` embeddings; returns its id."""
        embeddings = embeddings.reshape(-1, embeddings.shape[-1]).float()
        self.sums.append(embeddings.sum(0))
        self.counts.append(embeddings.shape[0])
        return len(self.counts) - 1

    def update(self, skill: int, embedding: torch.Tensor) -> None:
        self.sums[skill] = self.sums[skill] + embedding.reshape(-1).float()
        self.counts[skill] += 1

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

    def state_dict(self) -> dict[str, Any]:
        return {"sums": torch.stack(self.sums) if self.sums else torch.zeros(0), "counts": list(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counts = [int(c) for c in state["counts"]]
        self.sums = [row.clone().float() for row in state["sums"]] if counts else []
        self.counts = counts


@dataclass
class Decision:
    """One logged decision about a stream example (``skill``: the skill it was assigned to, if any)."""

    index: int
    best_similarity: float | None
    matched_skill: int | None
    decision: str  # known | novel | new_skill | outlier
    skill: int | None = None
    num_skills: int = 0
    members: list[int] = field(default_factory=list)  # new_skill: the examples that formed the skill
    resolved_at: int | None = None  # outlier: the index whose arrival resolved this pending example

    def to_dict(self) -> dict[str, Any]:
        d = {"index": self.index, "best_similarity": self.best_similarity, "matched_skill": self.matched_skill,
             "decision": self.decision, "skill": self.skill, "num_skills": self.num_skills}
        if self.members:
            d["members"] = list(self.members)
        if self.resolved_at is not None:
            d["resolved_at"] = self.resolved_at
        return d


class NoveltyDetector:
    """Assigns stream examples to skills; creates a skill after ``window`` consecutive novel examples.

    An example is novel when its best prototype similarity is below ``threshold`` (always, while the
    library is empty). Novel examples wait in a pending buffer; the ``window``-th consecutive one creates
    a new skill whose prototype is the mean of the buffer, and all of them are assigned to it. A known
    example ends the stretch: the pending examples were outliers and go to their nearest skill (without
    moving its prototype). Known examples update their skill's prototype.
    """

    def __init__(self, threshold: float = 0.85, window: int = 8, library: SkillPrototypes | None = None) -> None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.threshold = threshold
        self.window = window
        self.library = library if library is not None else SkillPrototypes()
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.log: list[Decision] = []
        self.created_at: list[int] = []  # stream index at which each skill was created

    def observe(self, index: int, embedding: torch.Tensor) -> tuple[Decision, list[tuple[int, int]]]:
        """Process one example; returns its decision and the ``(index, skill)`` assignments it finalised."""
        emb = F.normalize(embedding.reshape(-1).float(), dim=0)
        sims = self.library.similarities(emb)[0]  # (K,)
        best = float(sims.max()) if sims.numel() else None
        matched = int(sims.argmax()) if sims.numel() else None
        assignments: list[tuple[int, int]] = []
        records: list[Decision] = []
        if best is not None and best >= self.threshold:
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
