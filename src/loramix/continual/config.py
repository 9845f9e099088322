"""ContinualConfig: every option of ``loramix continual`` (each field is a CLI flag and a YAML key)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .experts import GUARDS
from .routing import ROUTING_POLICIES

METRICS = ("acc", "acc_norm")


@dataclass
class ContinualConfig:
    """Options of a continual-learning run (novelty detection, growing experts, maturity routing)."""

    # --- data ------------------------------------------------------------------------------------------
    model: str | None = None
    """Base model: hub id, local HF directory, .gguf file, or None for the packaged SmolLM2-135M-Instruct."""
    tasks: str = "sst2,boolq,ARC-Easy,openbookqa"
    """Comma-separated tasks in stream order: sst2 and LLM-Adapters commonsense sets (boolq, ARC-Easy,
    ARC-Challenge, openbookqa; piqa, winogrande, social_i_qa have only a test.json, split into disjoint train
    and test subsets); or synthetic / synthetic:<n> (no data needed)."""
    data_dir: str | None = None
    """Data root (default: $LORAMIX_DATA_DIR)."""
    output_dir: str = "runs/continual"
    train_per_task: int = 200
    """Training examples per task in the stream (random subset)."""
    test_per_task: int = 100
    """Test examples per task for the accuracy matrix (random subset)."""
    seed: int = 42
    chat_template: bool = True
    """Render prompts with the tokenizer's chat template (as loramix eval does)."""
    max_length: int = 384
    """Longest training sequence in tokens (contexts lose their start)."""
    device: str | None = None
    dtype: str = "auto"

    # --- novelty detection -----------------------------------------------------------------------------
    embedder: str = "hidden"
    """hidden = mean-pooled hidden states of the frozen base; sentence:<model> = sentence-transformers."""
    embed_layer: int = -1
    """Hidden-state layer the hidden embedder pools (-1 = last, 0 = token embeddings)."""
    threshold: float = 0.85
    """Cosine similarity to the best skill prototype below which an example is novel."""
    window: int = 8
    """Consecutive novel examples that create a new skill (and expert)."""
    detect_tolerance: int | None = None
    """A new expert within this many examples after a true task boundary detects it (default 2 * window)."""

    # --- experts ---------------------------------------------------------------------------------------
    r: int = 8
    """LoRA rank of every expert (on the FFN projections)."""
    alpha: float = 16.0
    dropout: float = 0.05
    expert_targets: list[str] | None = None
    """FFN roles with expert LoRA (gate/up/down); None = all the FFN has."""
    guard: str = "freeze"
    """How old experts are kept from drifting: freeze, l2 (penalty towards their old values), none."""
    l2_coef: float = 1.0
    """Weight of the L2 anchor penalty (guard=l2)."""
    train_lag: int = 0
    """Stream positions an assigned example waits before it trains. When a new skill is detected, queued
    examples nearer its prototype than any other (the new task's first examples, which arrived before the
    boundary was found and went to an older skill) go to the new expert instead. 0: train at once."""
    quarantine: int = 0
    """When a new skill is detected, queued examples of older skills that arrived within this many stream
    positions before the new skill's first member are dropped untrained (after the train_lag hand-over):
    the boundary lies in that stretch, so their task is uncertain and they must not move a finished
    expert. At most train_lag (older examples have trained already). 0: keep them."""

    # --- routing and maturity --------------------------------------------------------------------------
    routing: str = "hybrid"
    """hybrid = dense while the newest expert is immature, then sparse; or always dense / sparse."""
    temperature: float = 0.05
    """Softmax temperature over prototype similarities."""
    top_k: int = 1
    """Experts per example in sparse mode."""
    min_examples: int = 64
    """An expert is mature only after training on this many examples ..."""
    patience: int = 2
    """... and after this many validation losses without an improvement of more than min_delta."""
    min_delta: float = 0.01
    val_size: int = 16
    """Held-out examples of the newest skill used for its validation loss (0: never mature, always dense)."""
    val_every: int = 5
    """Hold out every n-th example assigned to the newest skill (until val_size are held out)."""
    eval_every: int = 5
    """Measure the newest expert's validation loss every this many training steps."""

    # --- optimisation ----------------------------------------------------------------------------------
    batch_size: int = 8
    steps_per_batch: int = 1
    """Optimiser steps per mini-batch of the stream (>1 replays each batch)."""
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    # --- evaluation and outputs ------------------------------------------------------------------------
    baselines: bool = True
    """Also run sequential fine-tuning of one LoRA and multi-task LoRA on all data."""
    metric: str = "acc"
    """Score for the accuracy matrix: acc (summed log-likelihood) or acc_norm (per character)."""
    eval_batch_size: int = 8
    plots: bool = True
    save_model: bool = True
    """Save the final experts, prototypes and routing state to <output_dir>/continual_model."""

    def __post_init__(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"ContinualConfig.{name}: {msg}")

        if isinstance(self.expert_targets, str):
            fail("expert_targets", "must be a list of roles, e.g. [up, down]")
        for name in ("train_per_task", "test_per_task", "window", "r", "batch_size", "steps_per_batch",
                     "val_every", "eval_every", "patience", "top_k", "eval_batch_size", "max_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(name, f"must be an int >= 1, got {v!r}")
        for name in ("min_examples", "val_size", "train_lag", "quarantine"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(name, f"must be an int >= 0, got {v!r}")
        if self.quarantine > self.train_lag:
            fail("quarantine", f"must be <= train_lag ({self.train_lag}): older examples have trained already, "
                 f"got {self.quarantine}")
        if not -1.0 <= float(self.threshold) <= 1.0:
            fail("threshold", f"is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.detect_tolerance is not None and self.detect_tolerance < 0:
            fail("detect_tolerance", "must be >= 0")
        if self.guard not in GUARDS:
            fail("guard", f"must be one of {GUARDS}, got {self.guard!r}")
        if self.routing not in ROUTING_POLICIES:
            fail("routing", f"must be one of {ROUTING_POLICIES}, got {self.routing!r}")
        if self.metric not in METRICS:
            fail("metric", f"must be one of {METRICS}, got {self.metric!r}")
        for name in ("temperature", "learning_rate", "alpha"):
            if float(getattr(self, name)) <= 0:
                fail(name, "must be > 0")
        for name in ("min_delta", "l2_coef", "weight_decay", "max_grad_norm"):
            if float(getattr(self, name)) < 0:
                fail(name, "must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if not (self.embedder == "hidden" or self.embedder.startswith("sentence:")):
            fail("embedder", f"must be hidden or sentence:<model>, got {self.embedder!r}")

    @property
    def tolerance(self) -> int:
        return self.detect_tolerance if self.detect_tolerance is not None else 2 * self.window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_config(config: str | Path | ContinualConfig | None = None, **overrides: Any) -> ContinualConfig:
    """A ContinualConfig from an options file (YAML/JSON, flat keys) and keyword overrides (which win)."""
    if isinstance(config, ContinualConfig):
        options = config.to_dict()
    elif config is not None:
        from ..train import load_options_file

        options = load_options_file(config)
    else:
        options = {}
    options.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(ContinualConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown continual option(s) {unknown}; known: {sorted(known)}")
    return ContinualConfig(**options)
