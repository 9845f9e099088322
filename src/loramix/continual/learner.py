"""ContinualLearner: novelty detection + growable experts + maturity routing, trained online on a stream.

The learner never sees task labels. For each arriving example it asks the :class:`NoveltyDetector`
which skill it belongs to; a sustained novel stretch creates a skill, and with it a new expert (old
experts are frozen, or anchored by an L2 penalty). Examples assigned to a trainable expert are queued
and trained in mini-batches with routing weights from the prototype similarities (dense while the
newest expert is immature, sparse once mature). A few examples of the newest skill are held out as its
validation set; their loss, measured every ``eval_every`` steps, drives the maturity decision and, with
``restore_best``, picks the weights the expert keeps: when it stops training (a newer skill is detected, or
:meth:`finish` at the end of the stream), the newest expert goes back to the weights of its lowest validation
loss, the untrained expert (which adds nothing to the model) being the first candidate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .config import ContinualConfig
from .experts import GUARDS, ExpertBank
from .novelty import Decision, Embedder, NoveltyDetector, SkillPrototypes
from .routing import HybridRouter
from .stream import EncodedExample

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)


def batch_tensors(examples: Sequence[EncodedExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on context and padding)."""
    rows = [ex.context_ids + ex.target_ids for ex in examples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for j, (ex, r) in enumerate(zip(examples, rows, strict=True)):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
        labels[j, len(ex.context_ids) : len(r)] = torch.tensor(ex.target_ids)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def target_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the target tokens (shift by one).

    Only the positions that predict a target token go through the LM head (``logits_to_keep`` with a boolean
    mask, where the model's forward takes it): the full ``(batch, length, vocabulary)`` logits, their float32
    copy and their gradient would cost gigabytes for a 49k vocabulary, for the few target tokens of a
    multiple-choice answer."""
    labels = batch["labels"]
    targets = labels[:, 1:] != IGNORE_INDEX  # (B, L-1): position p predicts token p + 1
    if _takes_logits_to_keep(model):
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = targets
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
        if logits.dim() == 2:  # (number of target tokens, V), in row-major order like labels[keep-shifted]
            return F.cross_entropy(logits.float(), labels[:, 1:][targets])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def _takes_logits_to_keep(model: Any) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


_DEFAULTS = ContinualConfig()  # the learner's training options default to loramix continual's


class ContinualLearner:
    """Online learner over an unlabeled task stream; see the module docstring.

    Args:
        model: the causal LM that ``bank`` is attached to.
        tokenizer: its tokenizer (only the pad id is used here).
        bank: the growable experts on ``model``.
        embedder: texts -> normalised embeddings (should use the frozen base: ``bank.disabled``).
        detector: novelty detector holding the skill prototypes.
        router: routing policy and per-expert maturity trackers.
        guard: ``freeze`` old experts, anchor them with ``l2`` (``l2_coef * ||theta - theta_old||^2``),
            or ``none`` (old experts keep training: an ablation that forgets).
        auto_temperature: route with the temperature set to the skills' pooled similarity spread
            (:meth:`SkillPrototypes.spread`), updated whenever weights are computed.
        restore_best: an expert that stops training keeps the weights of its lowest validation loss (the
            untrained expert included), not its last ones; :meth:`best_weights` and :meth:`save` use them too.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        bank: ExpertBank,
        embedder: Embedder,
        detector: NoveltyDetector | None = None,
        router: HybridRouter | None = None,
        *,
        guard: str = "freeze",
        l2_coef: float = _DEFAULTS.l2_coef,
        learning_rate: float = _DEFAULTS.learning_rate,
        weight_decay: float = _DEFAULTS.weight_decay,
        max_grad_norm: float = _DEFAULTS.max_grad_norm,
        batch_size: int = _DEFAULTS.batch_size,
        steps_per_batch: int = _DEFAULTS.steps_per_batch,
        val_size: int = _DEFAULTS.val_size,
        val_every: int = _DEFAULTS.val_every,
        eval_every: int = _DEFAULTS.eval_every,
        train_lag: int = 0,
        quarantine: int = 0,
        auto_temperature: bool = False,
        restore_best: bool = _DEFAULTS.restore_best,
    ) -> None:
        if train_lag < 0:
            raise ValueError(f"train_lag must be >= 0, got {train_lag}")
        if not 0 <= quarantine <= train_lag:
            raise ValueError(f"quarantine must be in [0, train_lag={train_lag}], got {quarantine}")
        if guard not in GUARDS:
            raise ValueError(f"guard must be one of {GUARDS}, got {guard!r}")
        if batch_size < 1 or steps_per_batch < 1 or val_every < 1 or eval_every < 1 or val_size < 0:
            raise ValueError("batch_size, steps_per_batch, val_every, eval_every must be >= 1; val_size >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.bank = bank
        self.embedder = embedder
        self.detector = detector or NoveltyDetector()
        self.router = router or HybridRouter()
        self.guard = guard
        self.l2_coef = l2_coef
        self.lr = learning_rate
        self.weight_decay = weight_decay
        self.max_grad_norm = max_grad_norm
        self.batch_size = batch_size
        self.steps_per_batch = steps_per_batch
        self.val_size = val_size
        self.val_every = val_every
        self.eval_every = eval_every
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        self.device = next(model.parameters()).device
        self.optimizer: torch.optim.Optimizer | None = None
        self.train_lag = train_lag
        self.quarantine = quarantine
        self.auto_temperature = auto_temperature
        self.waiting: dict[int, EncodedExample] = {}  # examples the detector has not assigned yet
        self.queue: list[tuple[EncodedExample, int]] = []  # assigned, not yet trained
        self.val: list[EncodedExample] = []  # held-out examples of the newest skill
        self.val_measured = 0  # size of the validation set at its last measurement
        self.newest_assigned = 0
        self.step = 0
        self.events: list[dict[str, Any]] = []
        self.counts = {"trained": 0, "held_out": 0, "frozen_skipped": 0, "quarantined": 0}
        self.losses: list[float] = []
        self.restore_best = restore_best
        self.best_state: list[torch.Tensor] | None = None  # the newest expert's best weights so far
        self.best_loss = math.inf  # their validation loss on the first best_on examples of self.val
        self.best_on = 0
        self.best_step: int | None = None  # the step they were measured at (None: untrained)

    # --- public API -----------------------------------------------------------------------------------
    @property
    def library(self) -> SkillPrototypes:
        return self.detector.library

    def observe(self, examples: Sequence[EncodedExample]) -> list[Decision]:
        """Feed stream examples (in order); trains whenever a mini-batch of assigned examples is ready."""
        missing = [ex for ex in examples if ex.embedding is None]
        if missing:
            for ex, emb in zip(missing, self.embedder([ex.prompt for ex in missing]), strict=True):
                ex.embedding = emb
        decisions = []
        for ex in examples:
            self.waiting[ex.index] = ex
            decision, assignments = self.detector.observe(ex.index, ex.embedding)
            if decision.decision == "new_skill":
                self._new_expert(decision)
            for index, skill in assignments:
                self._assign(self.waiting.pop(index), skill)
            self._train_ready(ex.index)
            decisions.append(decision)
        return decisions

    def flush(self) -> None:
        """Train the assigned examples still queued, in queue order and mini-batches of at most
        ``batch_size`` (with a training lag the queue can hold several batches), e.g. before an evaluation."""
        while self.queue:
            batch, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size :]
            self._train(batch)

    def finish(self) -> None:
        """End of the stream: train what is queued, then the newest expert keeps its best validation weights
        (``restore_best``), as an expert does when a newer skill is detected."""
        self.flush()
        self._restore_best()

    @contextlib.contextmanager
    def best_weights(self) -> Iterator[None]:
        """Within the block the newest expert holds the weights it would keep if the stream ended now (its
        best validation state, ``restore_best``); its training weights are back afterwards. Nothing the
        learner decides later depends on it, so evaluating inside it does not change the run."""
        if self._best_beats_current():
            assert self.best_state is not None
            with self._newest_holding(self.best_state):
                yield
        else:
            yield

    def routing_weights(self, embeddings: torch.Tensor, mode: str | None = None) -> torch.Tensor | None:
        """Expert weights ``(N, E)`` for ``(N, D)`` embeddings (None before the first expert exists)."""
        experts = self.bank.num_experts
        if experts == 0:
            return None
        if self.auto_temperature:
            spread = self.library.spread()
            if spread:
                self.router.temperature = spread
        # the detector adds a new skill's prototype just before its expert exists (the queue of the
        # previous skill is flushed in between): route over the skills that have an expert
        return self.router.weights(self.library.similarities(embeddings)[:, :experts], mode)

    @property
    def mode(self) -> str:
        return self.router.mode

    # --- internals ------------------------------------------------------------------------------------
    def _event(self, kind: str, **data: Any) -> None:
        self.events.append({"event": kind, "step": self.step, **data})
        logger.info("step %d: %s %s", self.step, kind, {k: v for k, v in data.items() if k != "members"})

    def _train_ready(self, current: int) -> None:
        """Train full batches of queued examples that are at least ``train_lag`` stream positions behind
        ``current`` (with no lag: every queued example, in queue order)."""
        while True:
            ready = [i for i, (ex, _) in enumerate(self.queue) if ex.index <= current - self.train_lag]
            if len(ready) < self.batch_size:
                return
            batch = ready[: self.batch_size]  # queue positions, in queue order
            self._train([self.queue[i] for i in batch])
            taken = set(batch)
            self.queue = [q for i, q in enumerate(self.queue) if i not in taken]

    def _reclaim(self, new_skill: int) -> list[EncodedExample]:
        """Take the queued (untrained) examples whose nearest prototype is the new skill's out of the queue:
        they arrived before its boundary was detected and were assigned to an older skill. The prototypes
        are left as they are."""
        if not self.queue:
            return []
        nearest = self.library.similarities(torch.stack([ex.embedding for ex, _ in self.queue])).argmax(dim=1)
        moved = self._take_queued([k == new_skill for k in nearest.tolist()])
        if moved:
            self._event("reclaimed", expert=new_skill, indices=[ex.index for ex in moved])
        return moved

    def _drop_before_boundary(self, first_member: int) -> None:
        """Drop the queued examples that arrived within ``quarantine`` positions before ``first_member`` (the
        new skill's first example): the boundary is somewhere in that stretch, so they may belong to the
        new task, and training them would move an older expert."""
        start = first_member - self.quarantine
        dropped = [ex.index for ex in self._take_queued([start <= ex.index < first_member for ex, _ in self.queue])]
        if dropped:
            self.counts["quarantined"] += len(dropped)
            self._event("quarantined", indices=dropped)

    def _take_queued(self, chosen: Sequence[bool]) -> list[EncodedExample]:
        """Remove the queued examples flagged in ``chosen`` (one flag per queue entry); returns them in order."""
        taken = [ex for (ex, _), c in zip(self.queue, chosen, strict=True) if c]
        self.queue = [q for q, c in zip(self.queue, chosen, strict=True) if not c]
        return taken

    def _new_expert(self, decision: Decision) -> None:
        # with a training lag, examples of the new task that went to an older skill may still be untrained
        moved = self._reclaim(decision.skill) if self.train_lag else []
        if self.quarantine and decision.members:
            self._drop_before_boundary(min(decision.members))
        self.flush()  # examples of the previous newest skill train before it is frozen
        self._restore_best()  # ... and it keeps its best validation weights
        for e in range(self.bank.num_experts):
            if self.guard == "freeze":
                self.bank.set_trainable(e, False)
            elif self.guard == "l2" and e not in self.bank.snapshots:
                self.bank.take_snapshot(e)  # anchored to its values when it stopped being the newest
        expert = self.bank.add_expert()
        self.router.new_expert()
        params = self.bank.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        self.val = []
        self.val_measured = 0
        self.newest_assigned = 0
        if self.restore_best:
            self.best_state = self.bank.copy_expert(expert)  # the untrained expert is the first candidate
            self.best_loss, self.best_on, self.best_step = math.inf, 0, None
        self._event("new_expert", expert=expert, index=decision.index, members=len(decision.members),
                    mode=self.router.mode)
        for ex in moved:
            self._assign(ex, expert)

    def _assign(self, ex: EncodedExample, skill: int) -> None:
        newest = self.bank.num_experts - 1
        if skill == newest:
            self.newest_assigned += 1
            if len(self.val) < self.val_size and self.newest_assigned % self.val_every == 0:
                self.val.append(ex)
                self.counts["held_out"] += 1
                return
            self.queue.append((ex, skill))
        elif self.bank.is_trainable(skill):
            self.queue.append((ex, skill))
        else:
            self.counts["frozen_skipped"] += 1  # its expert is frozen: routed, nothing to train

    def _train(self, items: Sequence[tuple[EncodedExample, int]]) -> None:
        assert self.optimizer is not None
        examples = [ex for ex, _ in items]
        weights = self.routing_weights(torch.stack([ex.embedding for ex in examples]))
        batch = batch_tensors(examples, self.pad_id, self.device)
        params = self.bank.trainable_parameters()
        self.model.train()
        for _ in range(self.steps_per_batch):
            with self.bank.route(weights):
                loss = target_loss(self.model, batch)
            if self.guard == "l2" and self.bank.snapshots:
                loss = loss + self.l2_coef * self.bank.l2_penalty()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.optimizer.step()
            self.losses.append(float(loss.detach()))
        self.model.eval()
        self.step += 1
        self.counts["trained"] += len(examples)
        newest = self.bank.num_experts - 1
        tracker = self.router.newest
        assert tracker is not None
        became = tracker.add_examples(sum(1 for _, s in items if s == newest))
        if self.step % self.eval_every == 0 and self.val:
            restarted = len(self.val) != self.val_measured
            if restarted:
                # the validation set grew since the last measurement: its losses do not compare with the
                # earlier ones, so the plateau test starts again (the set stops growing at val_size)
                tracker.restart_plateau()
                self.val_measured = len(self.val)
            val_loss = self.validation_loss()
            if self.best_state is not None and val_loss < self._kept_loss():
                self.best_state = self.bank.copy_expert(newest)
                self.best_loss, self.best_on, self.best_step = val_loss, len(self.val), self.step
            became = tracker.add_val_loss(val_loss) or became
            self._event("val_loss", expert=newest, loss=val_loss, examples=tracker.examples,
                        val_examples=len(self.val), restarted=restarted)
        if became:
            self._event("mature", expert=newest, examples=tracker.examples, mode=self.router.mode)

    # --- best validation weights of the newest expert ------------------------------------------------------
    @contextlib.contextmanager
    def _newest_holding(self, state: list[torch.Tensor]) -> Iterator[None]:
        """The newest expert's parameters set to ``state`` within the block, restored afterwards."""
        newest = self.bank.num_experts - 1
        saved = self.bank.copy_expert(newest)
        self.bank.load_expert(newest, state)
        try:
            yield
        finally:
            self.bank.load_expert(newest, saved)

    def _kept_loss(self) -> float:
        """The kept weights' validation loss on the current validation set, measured again when the set has
        grown since (losses on different sets do not compare)."""
        assert self.best_state is not None
        if self.best_on != len(self.val):
            with self._newest_holding(self.best_state):
                self.best_loss = self.validation_loss()
            self.best_on = len(self.val)
        return self.best_loss

    def _best_beats_current(self) -> bool:
        """Whether the kept weights have a lower validation loss than the newest expert's current ones."""
        if self.best_state is None or not self.val:  # restore_best off, or nothing to compare on
            return False
        return self._kept_loss() < self.validation_loss()

    def _restore_best(self) -> None:
        """The newest expert takes its kept weights if their validation loss is lower than its current ones'."""
        if self._best_beats_current():
            assert self.best_state is not None
            self.bank.load_expert(self.bank.num_experts - 1, self.best_state)
            self._event("restored", expert=self.bank.num_experts - 1, from_step=self.best_step,
                        val_loss=self.best_loss, val_examples=len(self.val))

    @torch.no_grad()
    def validation_loss(self, examples: Sequence[EncodedExample] | None = None) -> float:
        """Target loss of the newest skill's held-out examples under the current routing."""
        examples = list(self.val if examples is None else examples)
        if not examples:
            raise ValueError("no validation examples")
        was_training = self.model.training
        self.model.eval()
        total, n = 0.0, 0
        try:
            for start in range(0, len(examples), self.batch_size):
                chunk = examples[start : start + self.batch_size]
                weights = self.routing_weights(torch.stack([ex.embedding for ex in chunk]))
                batch = batch_tensors(chunk, self.pad_id, self.device)
                n_tok = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                with self.bank.route(weights):
                    total += float(target_loss(self.model, batch)) * n_tok
                n += n_tok
        finally:
            self.model.train(was_training)
        return total / max(n, 1)

    # --- save / load ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Experts + skill prototypes + routing state: everything inference routing needs. The newest expert is
        saved with the weights it would keep if the stream ended now (:meth:`best_weights`)."""
        directory = Path(directory)
        with self.best_weights():
            return self._save(directory)

    def _save(self, directory: Path) -> Path:
        from safetensors.torch import save_file

        extra = {"routing": {"policy": self.router.policy, "temperature": self.router.temperature,
                             "top_k": self.router.top_k, "mode": self.router.mode,
                             "maturity": [t.state() for t in self.router.trackers]},
                 "skills": {"counts": self.library.counts, "created_at": self.detector.created_at,
                            "threshold": self.detector.threshold, "window": self.detector.window}}
        self.bank.save(directory, extra)
        if len(self.library):
            save_file({"sums": self.library.state_dict()["sums"].contiguous()}, str(directory / "skills.safetensors"))
        return directory


def load_continual(model: Any, directory: str | Path) -> tuple[ExpertBank, SkillPrototypes, HybridRouter]:
    """Attach saved experts to ``model`` (frozen) and restore the skill prototypes and routing mode.

    Route with ``bank.route(router.weights(library.similarities(embedder(texts))))``.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    bank, extra = ExpertBank.load(model, directory)
    library = SkillPrototypes()
    counts = extra["skills"]["counts"]
    if counts:
        library.load_state_dict({"sums": load_file(str(directory / "skills.safetensors"))["sums"], "counts": counts})
    if len(library) != bank.num_experts:
        bank.detach()
        raise ValueError(f"{directory}: {len(library)} skills but {bank.num_experts} experts")
    r = extra["routing"]
    router = HybridRouter(r["policy"], temperature=r["temperature"], top_k=r["top_k"])
    for state in r["maturity"]:
        tracker = router.new_expert()
        tracker.examples, tracker.mature = state["examples"], state["mature"]
    return bank, library, router


def write_jsonl(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path
