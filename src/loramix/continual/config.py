"""ContinualConfig: every option of ``loramix continual`` (each field is a CLI flag and a YAML key)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .experts import GUARDS
from .routing import ROUTING_POLICIES

METRICS = ("auto", "acc", "acc_norm", "loss")


@dataclass
class ContinualConfig:
    """Options of a continual-learning run (novelty detection, growing experts, maturity routing)."""

    # --- data ------------------------------------------------------------------------------------------
    model: str | None = None
    """Base model: hub id, local HF directory, .gguf file, or None for the packaged SmolLM2-135M-Instruct."""
    tasks: str = "sst2,boolq,ARC-Easy,openbookqa"
    """Comma-separated tasks in stream order (at least two). Each is a data file (.json, .jsonl, .csv, .tsv,
    .parquet or a directory, read as loramix train reads it: prompt/response, instruction/output, messages or
    multiple-choice rows), a hub data set (owner/name, owner/name@split, or hf:<name> for an id without an
    owner), or a built-in task (a bare name): sst2 and the
    LLM-Adapters commonsense sets (boolq, ARC-Easy, ARC-Challenge, openbookqa; piqa, winogrande, social_i_qa
    have only a test.json, split into disjoint train and test subsets) under data_dir; or synthetic /
    synthetic:<n> alone (no data needed)."""
    test_data: str | None = None
    """Comma-separated test files / hub ids, one per task in --tasks order; an empty entry (or no
    --test-data) holds out test_per_task random rows of that task's data as its test set."""
    data_dir: str | None = None
    """Data root of the built-in tasks, and where relative task / test files not found from the working
    directory are looked up (default: $LORAMIX_DATA_DIR)."""
    output_dir: str = "runs/continual"
    """Run directory: the summary, accuracy matrix, decision log, plots and the saved experts."""
    train_per_task: int = 200
    """Training examples per task in the stream (random subset)."""
    test_per_task: int = 100
    """Test examples per task for the accuracy matrix (random subset, or rows held out of a task file)."""
    seed: int = 42
    """Seed of the task subsets and held-out rows, expert initialisation and the baselines' data order."""
    chat_template: bool = True
    """Render prompts with the tokenizer's chat template (as loramix eval does)."""
    max_length: int = 384
    """Longest training sequence in tokens (contexts lose their start)."""
    device: str | None = None
    """cpu, cuda, cuda:1 ... (default: CUDA when available)."""
    dtype: str = "auto"
    """The base model's dtype: auto, float32, bfloat16 or float16 (experts stay float32)."""

    # --- novelty detection -----------------------------------------------------------------------------
    embedder: str = "hidden"
    """hidden = mean-pooled hidden states of the frozen base; sentence:<model> = sentence-transformers."""
    embed_layer: int = -1
    """Hidden-state layer the hidden embedder pools (-1 = last, 0 = token embeddings)."""
    threshold: float | str = "auto"
    """auto: a new skill starts when the mean of the last window examples lies farther from every skill's
    prototype than shift times the distance expected for that skill's own examples (calibrated by each
    skill's data). A number: cosine similarity to the best prototype below which one example is novel
    (window consecutive novel examples then create a skill)."""
    window: int = 8
    """Examples whose mean is tested for a new skill (auto); consecutive novel examples that create one
    (fixed threshold). The first window examples found the first skill."""
    shift: float = 4.0
    """threshold=auto: how many times farther than expected from every prototype a window mean must lie to
    start a new skill (a window of a skill's own examples lies at about 1)."""
    detect_tolerance: int | None = None
    """A new expert within this many examples after a true task boundary detects it (default 2 * window)."""

    # --- experts ---------------------------------------------------------------------------------------
    r: int = 8
    """LoRA rank of every expert (on the FFN projections)."""
    alpha: float = 16.0
    """LoRA scale of every expert: its update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the experts' LoRA input during training."""
    expert_targets: list[str] | None = None
    """FFN roles with expert LoRA (gate/up/down); None = all the FFN has."""
    guard: str = "freeze"
    """How old experts are kept from drifting: freeze, l2 (penalty towards their old values), none."""
    l2_coef: float = 1.0
    """Weight of the L2 anchor penalty (guard=l2)."""
    train_lag: int | None = None
    """Stream positions an assigned example waits before it trains. When a new skill is detected, queued
    examples nearer its prototype than any other (the new task's first examples, which arrived before the
    boundary was found and went to an older skill) go to the new expert instead. None: 2 * window (longer
    than the detection delay); 0: train at once."""
    quarantine: int = 0
    """When a new skill is detected, queued examples of older skills that arrived within this many stream
    positions before the new skill's first member are dropped untrained (after the train_lag hand-over):
    the boundary lies in that stretch, so their task is uncertain and they must not move a finished
    expert. At most train_lag (older examples have trained already). 0: keep them."""

    # --- routing and maturity --------------------------------------------------------------------------
    routing: str = "hybrid"
    """hybrid = dense while the newest expert is immature, then sparse; or always dense / sparse."""
    temperature: float | str = "auto"
    """Softmax temperature over prototype similarities. auto: the pooled standard deviation of the skills'
    own held-out similarities (updated as skills grow), so routing weights follow how far apart skills are
    for this embedder and data."""
    top_k: int = 1
    """Experts per example in sparse mode."""
    min_examples: int = 16
    """An expert is mature only after training on this many examples ..."""
    patience: int = 2
    """... and after this many validation losses without an improvement of more than min_delta."""
    min_delta: float = 0.01
    """Smallest validation-loss drop that counts as an improvement (see patience)."""
    val_size: int = 4
    """Held-out examples of the newest skill used for its validation loss (0: never mature, always dense). They
    never train, so they are kept few: a task of a few dozen examples loses only these."""
    val_every: int = 4
    """Hold out every n-th example assigned to the newest skill (until val_size are held out)."""
    eval_every: int = 2
    """Measure the newest expert's validation loss every this many training steps."""
    restore_best: bool = False
    """An expert that stops training (a newer skill is detected, or the stream ends) keeps the weights of its
    lowest validation loss, the untrained expert (the model without it) included, instead of its last ones;
    evaluations and the saved model use those weights. Only as good as the validation set: with val_size 4 the
    choice is noisy (docs/reports/continual.md, the learning budget)."""

    # --- optimisation ----------------------------------------------------------------------------------
    batch_size: int = 4
    """Examples per training mini-batch of the stream."""
    steps_per_batch: int = 2
    """Optimiser steps per mini-batch of the stream (>1 replays each batch): with the default batch size and
    learning rate, a task of 48 examples gets about 22 steps."""
    learning_rate: float = 2e-3
    """AdamW learning rate of the experts (and of the baselines' LoRA)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip each step's gradient norm to this (0 = no clipping)."""

    # --- evaluation and outputs ------------------------------------------------------------------------
    baselines: bool = True
    """Also run sequential fine-tuning of one LoRA and multi-task LoRA on all data."""
    metric: str = "auto"
    """Score of each task for the accuracy matrix. auto: multiple-choice accuracy (acc) for multiple-choice
    data, pass@1 for rows with tests (test_list), otherwise the mean loss per response token (lower is
    better); acc / acc_norm (per character): that accuracy for multiple-choice tasks; loss: every task."""
    max_new_tokens: int = 128
    """Longest completion generated for pass@1."""
    code_timeout: float = 5.0
    """Seconds each pass@1 program may run (in its own process; see docs/continual.md before scoring code
    from a model you do not trust)."""
    eval_batch_size: int = 8
    """Examples per forward when scoring the test sets."""
    plots: bool = True
    """Write the accuracy-matrix plots (PNG) into output_dir."""
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
        if self.train_lag is None:
            self.train_lag = 2 * self.window if isinstance(self.window, int) else 0
        for name in ("min_examples", "val_size", "train_lag", "quarantine"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(name, f"must be an int >= 0, got {v!r}")
        if self.quarantine > self.train_lag:
            fail("quarantine", f"must be <= train_lag ({self.train_lag}): older examples have trained already, "
                 f"got {self.quarantine}")
        self.threshold = _auto_or_float(self.threshold, "threshold", fail)
        if self.threshold != "auto" and not -1.0 <= self.threshold <= 1.0:
            fail("threshold", f"is auto or a cosine similarity in [-1, 1], got {self.threshold}")
        self.temperature = _auto_or_float(self.temperature, "temperature", fail)
        if float(self.shift) <= 1.0:
            fail("shift", f"must be > 1 (a skill's own windows lie at about 1), got {self.shift}")
        if self.max_new_tokens < 1 or float(self.code_timeout) <= 0:
            fail("max_new_tokens" if self.max_new_tokens < 1 else "code_timeout", "must be > 0")
        self._check_stream(fail)
        if self.detect_tolerance is not None and self.detect_tolerance < 0:
            fail("detect_tolerance", "must be >= 0")
        if self.guard not in GUARDS:
            fail("guard", f"must be one of {GUARDS}, got {self.guard!r}")
        if self.routing not in ROUTING_POLICIES:
            fail("routing", f"must be one of {ROUTING_POLICIES}, got {self.routing!r}")
        if self.metric not in METRICS:
            fail("metric", f"must be one of {METRICS}, got {self.metric!r}")
        if self.temperature != "auto" and self.temperature <= 0:
            fail("temperature", "must be auto or > 0")
        for name in ("learning_rate", "alpha"):
            if float(getattr(self, name)) <= 0:
                fail(name, "must be > 0")
        for name in ("min_delta", "l2_coef", "weight_decay", "max_grad_norm"):
            if float(getattr(self, name)) < 0:
                fail(name, "must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", f"must be in [0, 1), got {self.dropout}")
        if not (self.embedder == "hidden" or self.embedder.startswith("sentence:")):
            fail("embedder", f"must be hidden or sentence:<model>, got {self.embedder!r}")

    def _check_stream(self, fail: Any) -> None:
        from .stream import split_entries

        if not isinstance(self.tasks, str) or not self.tasks.strip():
            fail("tasks", f"must be a comma-separated list of tasks, got {self.tasks!r}")
        entries = split_entries(self.tasks)
        if any(not e for e in entries):
            fail("tasks", f"has an empty entry: {self.tasks!r}")
        if len(entries) == 1:
            n = entries[0].split(":", 1)[1] if entries[0].startswith("synthetic:") else None
            if not entries[0].startswith("synthetic") or (n is not None and n.strip() == "1"):
                fail("tasks", f"a continual stream needs at least two tasks, --tasks has one ({entries[0]!r}); "
                     "list the tasks in stream order, comma-separated (e.g. --tasks first.jsonl,second.jsonl)")
        if self.test_data is not None:
            tests = split_entries(self.test_data)
            if len(tests) != len(entries):
                fail("test_data", f"has {len(tests)} entries for {len(entries)} tasks; give one per task in "
                     "--tasks order (an empty entry holds out test_per_task rows of that task)")

    @property
    def tolerance(self) -> int:
        return self.detect_tolerance if self.detect_tolerance is not None else 2 * self.window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _auto_or_float(value: Any, name: str, fail: Any) -> float | str:
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            return float(value)
        except ValueError:
            fail(name, f"must be auto or a number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(name, f"must be auto or a number, got {value!r}")
    return float(value)


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
