"""`loramix train`: fine-tune a base model with MixLoRA (or plain LoRA) through HF Trainer.

Recipe: (1) resolve the configs, (2) load the base model and data, (3) inject the adapter,
(4) train with Trainer (AdamW, warmup + cosine, clipping, accumulation, its own router LR,
adapter-only checkpoints, resumable, stops on divergence), (5) save the adapter, metrics, plots
and a summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainerState, TrainingArguments

from . import diskspace
from .checkpoint import (
    AdapterLoadError,
    is_trainable_name,
    load_adapter_weights,
    save_adapter,
    trainable_state_dict,
    verify_adapter,
)
from .checks import check_int, check_number
from .config import ConfigError, MixLoraConfig, yaml_error_text
from .data import DataCollator, DataConfig, build_datasets, load_raw
from .injection import get_state, inject
from .models import load_base_model, resolve_dtype
from .routers import update_balance_biases
from .stopping import StopSignals, any_rank_max

ADAPTERS = ("mixlora", "lora")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = ".tmp-"
"""A checkpoint is written to ``.tmp-checkpoint-N`` and renamed to ``checkpoint-N`` once complete."""
REPLACED_DIR = ".replaced-run"
"""Where an ``overwrite`` run keeps the previous run's files until it has saved something of its own."""

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/inf or exceeded ``max_loss``; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Options of a training run (every one is also a CLI flag and a YAML key)."""

    model: str | None = None
    """Base model: hub id, local HF directory, .gguf file, or None for the packaged SmolLM2-135M-Instruct."""
    output_dir: str = "runs/loramix"
    """Run directory: the adapter, checkpoints, metrics, plots and ``summary.json`` go here."""
    adapter: str = "mixlora"
    """``mixlora`` or ``lora`` (plain LoRA baseline = one expert with a dense router, i.e. exactly LoRA)."""
    max_steps: int = 100
    """Optimiser steps; <= 0 trains for ``num_epochs`` instead."""
    num_epochs: float = 1.0
    """Passes over the training data when ``max_steps`` <= 0 (fractions allowed)."""
    batch_size: int = 4
    """Examples per device per forward pass."""
    grad_accum: int = 1
    """Gradient accumulation: effective batch = batch_size * grad_accum * processes."""
    learning_rate: float = 2e-4
    """Peak learning rate of the adapter weights (AdamW)."""
    router_lr: float | None = None
    """Learning rate of the router weights (None = learning_rate; 0 = the router weights stay frozen, while the
    balance bias still moves at ``balance_bias_rate``); lower values calm routing."""
    weight_decay: float = 0.0
    """AdamW weight decay of the adapter weights."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up from 0."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule after warm-up: a transformers scheduler name (cosine, linear, constant, ...)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 = no clipping)."""
    seed: int = 42
    """Seed of weight initialisation, data shuffling and the validation split."""
    eval_steps: int = 50
    """Validate (and checkpoint) every this many steps; the best adapter by validation loss is kept."""
    save_total_limit: int = 2
    """Checkpoints kept in output_dir (oldest removed first; the newest and the best are always kept)."""
    logging_steps: int = 1
    """Log the training loss every this many steps."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding, faster on long-tailed data)."""
    precision: str = "auto"
    """auto = bf16 on CUDA when supported, fp32 on CPU."""
    quantize: str | None = None
    """4bit (NF4) / 8bit base model through bitsandbytes (CPU or CUDA; ``pip install 'loramix[quant]'``)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more compute."""
    compile: bool = False
    """Compile the model with ``torch.compile`` (HF Trainer's ``torch_compile``): the MixLoRA layers trace whole,
    with no host sync, so the step runs as fused kernels. The first steps compile (minutes on CPU)."""
    model_cache_dir: str | None = None
    """Where converted GGUF models are cached."""
    resume: bool | str = False
    """True = latest complete checkpoint in output_dir; a path = that checkpoint."""
    overwrite: bool = False
    """Replace the run already in output_dir. Without it (or ``resume``) a non-empty output_dir is refused.
    The previous run's files are kept aside and deleted only once the new run has saved a checkpoint or its
    adapter; if it fails before, they are put back."""
    max_loss: float = 20.0
    """Stop when the training loss is non-finite or above this (divergence)."""
    plots: bool = True
    """Write loss and expert-load plots (PNG, matplotlib) into output_dir."""

    def __post_init__(self) -> None:
        self._check_types()
        if self.adapter not in ADAPTERS:
            raise ConfigError(f"TrainConfig.adapter: must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"TrainConfig.precision: must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("batch_size", "grad_accum", "eval_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"TrainConfig.learning_rate: must be > 0, got {self.learning_rate}")
        if self.router_lr is not None and self.router_lr < 0:
            raise ConfigError(f"TrainConfig.router_lr: must be >= 0 (0 = frozen router), got {self.router_lr}")
        if self.max_steps <= 0 and self.num_epochs <= 0:
            raise ConfigError("TrainConfig.max_steps / num_epochs: one of them must be positive")

    def _check_types(self) -> None:
        """Types and ranges of the plain fields, so ``batch_size: four`` names its field (not a TypeError)."""
        for name in ("max_steps", "seed"):
            check_int(f"TrainConfig.{name}", getattr(self, name), None)
        for name in ("batch_size", "grad_accum", "eval_steps", "save_total_limit", "logging_steps"):
            check_int(f"TrainConfig.{name}", getattr(self, name), 1)
        check_number("TrainConfig.num_epochs", self.num_epochs, 0.0)
        check_number("TrainConfig.learning_rate", self.learning_rate)
        check_number("TrainConfig.router_lr", self.router_lr, optional=True)
        check_number("TrainConfig.weight_decay", self.weight_decay, 0.0)
        check_number("TrainConfig.warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        check_number("TrainConfig.max_grad_norm", self.max_grad_norm, 0.0)
        check_number("TrainConfig.max_loss", self.max_loss, 0.0, low_open=True)
        for name in ("group_by_length", "gradient_checkpointing", "compile", "plots", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"TrainConfig.{name}: must be true or false, got {getattr(self, name)!r}")
        for name in ("output_dir", "adapter", "lr_scheduler", "precision"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"TrainConfig.{name}: must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("model", "quantize", "model_cache_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"TrainConfig.{name}: must be a non-empty string or None, got {value!r}")
        if not isinstance(self.resume, (bool, str)) or self.resume == "":
            raise ConfigError(f"TrainConfig.resume: must be true, false or a checkpoint path, got {self.resume!r}")
        from transformers import SchedulerType

        schedulers = [s.value for s in SchedulerType]
        if self.lr_scheduler not in schedulers:
            raise ConfigError(f"TrainConfig.lr_scheduler: must be one of {schedulers}, got {self.lr_scheduler!r}")
        if self.resume and self.overwrite:
            raise ConfigError("TrainConfig.resume / overwrite: resume continues the run in output_dir, overwrite "
                              "replaces it; pass one of them")


SECTIONS: dict[str, type] = {"train": TrainConfig, "data": DataConfig, "mixlora": MixLoraConfig}


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def split_options(options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Send each flat option to every config section that declares it (``seed`` goes to train and data)."""
    known = {name: [s for s, cls in SECTIONS.items() if name in field_names(cls)] for name in options}
    unknown = sorted(k for k, owners in known.items() if not owners)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; see `loramix train --help`")
    out: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in options.items():
        for section in known[name]:
            out[section][name] = value
    return out


def load_options_file(path: str | Path) -> dict[str, Any]:
    """Read a flat YAML/JSON options file (keys = CLI flag names with underscores)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error_text(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{path}: option names must be text, got {bad}")
    return {k.replace("-", "_"): _coerce(v) for k, v in data.items()}


def _coerce(value: Any) -> Any:
    """Expand environment variables in strings (``data: $LORAMIX_DATA_DIR/x.jsonl``) and read numbers
    such as ``2e-4``, which YAML 1.1 leaves as strings."""
    if not isinstance(value, str):
        return value
    try:
        return float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        return os.path.expandvars(value)


def resolve(config: str | Path | None = None, **overrides: Any) -> tuple[TrainConfig, DataConfig, MixLoraConfig]:
    """Options file first, explicit keyword arguments win."""
    options = load_options_file(config) if config else {}
    options.update({k: v for k, v in overrides.items() if v is not None})
    sections = split_options(options)
    if "data" not in sections["data"]:
        raise ConfigError("DataConfig.data: a data set is required (--data <hub name or file>)")
    train_cfg = TrainConfig(**sections["train"])
    data_cfg = DataConfig(**sections["data"])
    mix = sections["mixlora"]
    if train_cfg.adapter == "lora":  # one always-chosen expert == plain LoRA on the same projections
        mix.update(num_experts=1, router="dense", balance_coef=0.0, z_loss_coef=0.0, entropy_coef=0.0)
    return train_cfg, data_cfg, MixLoraConfig(**mix)


# --- Trainer pieces ----------------------------------------------------------------------------------
def _add_counts(total: torch.Tensor | None, outputs: Any) -> torch.Tensor | None:
    """``total`` plus this forward's (L, E) tokens per expert (unchanged when the model reports none)."""
    stats = outputs.get("routing_stats")
    if stats is None:
        return total
    counts = stats["tokens_per_expert"].detach()  # (L, E) on the device: read when the run reports it
    return counts if total is None else total + counts


class LoramixTrainer(Trainer):
    """Trainer that checkpoints only adapter weights, logs the aux loss and stops on divergence."""

    def __init__(self, *args: Any, router_lr: float | None = None, max_loss: float = 20.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.router_lr = router_lr
        self.max_loss = max_loss
        self.model_accepts_loss_kwargs = False  # loss is a per-batch mean; Trainer scales it for accumulation
        # sums over the forwards since the last log, kept on the device and read once per log (pop_running)
        self.running: dict[str, torch.Tensor | float] = {"aux_loss": 0.0, "lm_loss": 0.0, "tokens": 0.0, "n": 0.0}
        self.expert_counts: torch.Tensor | None = None  # (L, E) tokens per expert over training
        self.eval_expert_counts: torch.Tensor | None = None  # (L, E) over evaluation forwards (reset by caller)
        self.checkpoint_bytes = 0  # expected size of one checkpoint (expected_checkpoint_bytes), for messages
        self._write_error: BaseException | None = None  # the first full-disk error of the checkpoint being written
        self._in_checkpoint = False

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            router = [p for n, p in params if "mixlora_router" in n]
            other = [p for n, p in params if "mixlora_router" not in n]
            groups = [{"params": other, "lr": self.args.learning_rate}]
            if router:
                lr = self.args.learning_rate if self.router_lr is None else self.router_lr  # 0: frozen router
                groups.append({"params": router, "lr": lr})
            self.optimizer = torch.optim.AdamW(groups, weight_decay=self.args.weight_decay, betas=(0.9, 0.999))
        return self.optimizer

    def _get_grad_norm(self, model, grad_norm=None):  # noqa: ANN001
        """The gradient norm of the step (Trainer's), and a stop before the optimiser applies non-finite
        gradients that came from a finite loss. The norm is global over processes, so every rank stops
        together. Under fp16 with a loss scaler, an overflow is the scaler's business: it skips the step."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and getattr(self.accelerator, "scaler", None) is None:
            value = float(grad_norm)
            if not math.isfinite(value):
                raise TrainingDivergedError(
                    f"gradient norm {value} at step {self.state.global_step + 1} is not finite (the loss was finite)")
        return grad_norm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        outputs = model(**inputs)
        loss = outputs["loss"]  # language-model loss + router aux loss (added by the model's forward hook)
        aux = outputs.get("aux_loss")
        aux = aux.detach() if aux is not None else torch.zeros((), device=loss.device)
        lm_loss = outputs.get("lm_loss", loss)
        if model.training:
            value = float(loss.detach())
            if not math.isfinite(value) or value > self.max_loss:
                raise TrainingDivergedError(
                    f"training loss {value:.4g} at step {self.state.global_step + 1} is "
                    f"{'not finite' if not math.isfinite(value) else f'above max_loss={self.max_loss}'}"
                )
            self.running["aux_loss"] = self.running["aux_loss"] + aux.float()
            self.running["lm_loss"] = self.running["lm_loss"] + lm_loss.detach().float()
            self.running["tokens"] = self.running["tokens"] + inputs["attention_mask"].sum()
            self.running["n"] += 1
            self.expert_counts = _add_counts(self.expert_counts, outputs)
        else:
            loss = lm_loss  # validation reports the language-model loss alone
            self.eval_expert_counts = _add_counts(self.eval_expert_counts, outputs)
        return (loss, outputs) if return_outputs else loss

    def pop_running(self) -> dict[str, float]:
        n = max(self.running["n"], 1.0)
        out = {"aux_loss": float(self.running["aux_loss"]) / n, "lm_loss": float(self.running["lm_loss"]) / n,
               "tokens": float(self.running["tokens"])}
        self.running = dict.fromkeys(self.running, 0.0)
        return out

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        tensors = None  # under FSDP, Trainer gathered the full state dict on every rank: no rank-0-only gather
        if self.is_fsdp_enabled and state_dict:
            tensors = {n: t for n, t in state_dict.items() if is_trainable_name(n)}
        if self.args.should_save:
            self._write(lambda: save_adapter(self.accelerator.unwrap_model(self.model),
                                             output_dir or self.args.output_dir, tensors))

    def _write(self, write: Any) -> None:
        """One of a checkpoint's writes. A full disk is recorded (the first error kept), not raised, so this
        process still joins the collectives that follow (FSDP's optimizer gather, the barriers) and every
        process learns of it when the checkpoint is complete (:meth:`_save_checkpoint`)."""
        if not self._in_checkpoint:
            return write()
        try:
            write()
        except Exception as e:
            if not diskspace.is_disk_full(e, self.args.output_dir, self.checkpoint_bytes):
                raise
            self._write_error = self._write_error or e

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        self._write(lambda: super(LoramixTrainer, self)._save_optimizer_and_scheduler(output_dir))

    def _save_scaler(self, output_dir: str) -> None:
        self._write(lambda: super(LoramixTrainer, self)._save_scaler(output_dir))

    def _save_rng_state(self, output_dir: str) -> None:
        self._write(lambda: super(LoramixTrainer, self)._save_rng_state(output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_adapter_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write the checkpoint into ``.tmp-checkpoint-N`` and rename it to ``checkpoint-N`` once every file
        (adapter, optimizer, scheduler, RNG states of every rank, trainer state) is there, so a run killed
        while saving leaves no half-written ``checkpoint-N`` for a resume to trip over."""
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: str(staging)  # type: ignore[method-assign]
        self._write_error, self._in_checkpoint = None, True
        try:
            self._write(lambda: super(LoramixTrainer, self)._save_checkpoint(model, trial))
        finally:
            del self._get_output_dir  # back to the class's method
            self._in_checkpoint = False
        # every rank has written its files into the staging directory; did any of them find the disk full?
        if any_rank_max(int(self._write_error is not None), self.args.device):
            self._checkpoint_failed(run_dir, staging, name)
        written, final = staging / name, run_dir / name
        if self.state.best_model_checkpoint == str(written):  # the best is this checkpoint: record its real path
            self.state.best_model_checkpoint = str(final)
            if self.args.should_save:
                self.state.save_to_json(str(written / "trainer_state.json"))
        if self.args.should_save:
            if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
                old = run_dir / f"{STAGING_PREFIX}old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
                os.rename(written, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(written, final)
            staging.rmdir()
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _checkpoint_failed(self, run_dir: Path, staging: Path, name: str) -> None:
        """A full disk stopped the checkpoint: remove its staging directory, try to save the adapter alone
        (smaller), and stop the run with one line saying what was kept where. Every process calls this."""
        step = self.state.global_step
        model = self.accelerator.unwrap_model(self.model)
        tensors = trainable_state_dict(model)  # every rank: gathers FSDP shards
        error = self._write_error
        if not self.args.should_save:
            raise diskspace.DiskFullError(
                f"{run_dir}: the disk is full: {name} could not be written (the main process says what was kept)",
                directory=run_dir, needed=self.checkpoint_bytes, free=diskspace.free_bytes(run_dir)) from error
        shutil.rmtree(staging, ignore_errors=True)
        free = diskspace.free_bytes(run_dir)
        message = (diskspace.full_message(run_dir, self.checkpoint_bytes, free, name, "about ")
                   + f"; its partial files ({staging.name}) were removed")
        alone: Path | None = run_dir / f"adapter-step-{step}"
        try:
            save_adapter(model, alone, tensors)
            message += f"; the adapter of step {step} alone is saved in {alone}"
        except Exception as e:
            if not diskspace.is_disk_full(e, run_dir, diskspace.tensor_bytes(tensors.values())):
                raise
            shutil.rmtree(alone, ignore_errors=True)
            alone = None
            message += f"; the adapter of step {step} alone could not be saved either"
        done = sorted((p for p in run_dir.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir()),
                      key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))
        if done:
            message += f"; free some space and continue from {done[-1].name} with --resume true"
        raise diskspace.DiskFullError(message, directory=run_dir, needed=self.checkpoint_bytes, free=free,
                                      saved=alone) from error


def expected_checkpoint_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of one checkpoint, bytes of the adapter alone), estimated from the model: the adapter's tensors
    (with 160 bytes of safetensors header per tensor and 4 KiB for its config), AdamW's two float32 moments per
    trainable weight, and 64 KiB for the trainer state, scheduler and RNG states."""
    tensors = trainable_state_dict(model)
    adapter = diskspace.tensor_bytes(tensors.values()) + 160 * len(tensors) + (4 << 10)
    moments = 2 * diskspace.tensor_bytes((p for p in model.parameters() if p.requires_grad), torch.float32)
    return adapter + moments + (64 << 10), adapter


def check_disk_space(trainer: LoramixTrainer, out: Path, model: nn.Module, save_total_limit: int) -> None:
    """Before training: refuse when the disk of ``out`` cannot hold one checkpoint and the adapter; warn when
    it cannot hold what the run keeps at once (``save_total_limit`` checkpoints, one more while the next is
    written, and the adapter). The main process looks; every process stops when it refuses."""
    checkpoint, adapter = expected_checkpoint_bytes(model)
    trainer.checkpoint_bytes = checkpoint
    problem: diskspace.DiskFullError | None = None
    if trainer.args.should_save:
        try:
            diskspace.check_free_space(
                out, checkpoint + adapter, "one checkpoint and the adapter",
                wanted=(save_total_limit + 1) * checkpoint + adapter,
                wanted_what=f"{save_total_limit + 1} checkpoints (--save-total-limit {save_total_limit}, and one more "
                            "while the next is written) and the adapter")
        except diskspace.DiskFullError as e:
            problem = e
    if any_rank_max(int(problem is not None), trainer.args.device):
        raise problem or diskspace.DiskFullError(f"{out}: not enough free disk space (the main process says more)",
                                                 directory=out, needed=checkpoint + adapter, free=0)


class MetricsCallback(TrainerCallback):
    """Progress bar (loss, aux loss, lr, tokens/s) and one JSON line of metrics per log event."""

    def __init__(self, trainer: LoramixTrainer, path: Path) -> None:
        self.trainer = trainer
        self.path = path
        self.bar = None
        self.last_time = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)
        self.last_time = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        logs = dict(logs or {})
        if "loss" in logs:
            now = time.perf_counter()
            run = self.trainer.pop_running()
            logs.update(aux_loss=run["aux_loss"], lm_loss=run["lm_loss"],
                        tokens_per_s=run["tokens"] / max(now - self.last_time, 1e-9))
            self.last_time = now
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}", aux=f"{logs['aux_loss']:.4f}",
                                 lr=f"{logs.get('learning_rate', 0):.2e}", tok_s=f"{logs['tokens_per_s']:.0f}")
        elif self.bar is not None and "eval_loss" in logs:
            self.bar.write(f"step {state.global_step}: validation loss {logs['eval_loss']:.4f}")

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.close_bar()  # the final validation after training is reported by the summary, not here

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class BalanceBiasCallback(TrainerCallback):
    """Apply the pending balance-bias counts at the end of every optimizer step (on every rank: the counts
    are all-reduced), not only before the next forward.

    The update sequence is the same, but checkpoints, the final adapter and the ranks' weights then never
    hold rank-local counts that have not been summed yet (which made 2-process ranks disagree).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        update_balance_biases(list(get_state(self.model).moe_layers.values()))


class InterruptCallback(StopSignals, TrainerCallback):
    """First Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, stop. A second one aborts
    (:class:`loramix.stopping.StopSignals`).

    At every step end the processes of a distributed run agree on whether any of them got a signal (a MAX
    all-reduce), so all of them save and stop at the same step even when the signal reached them during
    different steps, or reached some of them only."""

    def __init__(self) -> None:
        StopSignals.__init__(self)
        self.signum = 0  # the signal the run stopped for, agreed over processes (0: it did not stop)

    @property
    def requested(self) -> bool:
        """Whether the run stopped for a signal (with a checkpoint of the step it stopped at)."""
        return bool(self.signum)

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.install()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.signum = self.agreed(args.device) if args.world_size > 1 else self.received
        if self.signum:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        self.restore()


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a CUDA device that supports it, ``fp16`` on an older CUDA device (T4, V100),
    ``fp32`` on CPU (CPU bf16 autocast works but is slower than float32 on most CPUs)."""
    if precision != "auto":
        return precision
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return names[resolve_dtype("auto")]  # the dtype loading with dtype="auto" picks on the default device


def _precision_flags(precision: str) -> dict[str, bool]:
    """TrainingArguments' mixed-precision flags: autocast to bf16/fp16 (fp16 with a loss scaler) on top of the
    frozen weights loaded in that dtype, while the trainable weights stay float32."""
    precision = resolve_precision(precision)
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _training_args(cfg: TrainConfig, has_val: bool) -> TrainingArguments:
    try:
        import tensorboard  # noqa: F401

        report_to = ["tensorboard"]
    except ImportError:
        report_to = "none"
    return TrainingArguments(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.num_epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if has_val else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.eval_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=has_val,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False,
        report_to=report_to,
        torch_compile=cfg.compile,
        prediction_loss_only=True,  # evaluation needs the loss only: never gather (rows, length, vocab) logits
        disable_tqdm=True,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        **_precision_flags(cfg.precision),
    )


def _keep_model_columns(ds: Any) -> Any:
    if ds is None:
        return None
    extra = [c for c in ds.column_names if c not in ("input_ids", "attention_mask", "labels")]
    return ds.remove_columns(extra) if extra else ds


# --- output directory and resume ------------------------------------------------------------------
def _is_rank_zero() -> bool:
    """Whether this process is the main one (before Trainer exists: torchrun/accelerate set ``RANK``)."""
    return os.environ.get("RANK", "0") == "0"


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why a training run cannot resume from ``checkpoint`` (a missing or damaged file), or None."""
    path = Path(checkpoint)
    if not path.is_dir():
        return f"{path} is not a directory"
    state = path / "trainer_state.json"
    if not state.is_file():
        return f"{state} is missing"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return f"{state} is not valid JSON ({e})"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (path / name).is_file():
            return f"{path / name} is missing"
    try:
        verify_adapter(path)
    except (AdapterLoadError, FileNotFoundError) as e:
        return str(e)
    return None


def resume_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint a run with ``cfg`` resumes from: ``cfg.resume`` itself, or with ``resume=True`` the
    newest complete ``checkpoint-N`` in ``output_dir``; incomplete newer ones are skipped with a warning."""
    if not cfg.resume:
        return None
    if cfg.resume is not True:
        problem = checkpoint_problem(cfg.resume)
        if problem:
            raise ConfigError(f"TrainConfig.resume: cannot resume from {cfg.resume}: {problem}")
        return Path(cfg.resume)
    out = Path(cfg.output_dir)
    found = [p for p in out.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir()] if out.is_dir() else []
    if not found:
        raise FileNotFoundError(f"--resume: no checkpoint-* directory in {out}")
    skipped = []
    for path in sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            if skipped:
                logger.warning("resuming from %s: skipped the incomplete %s", path.name, "; ".join(skipped))
            return path
        skipped.append(f"{path.name} ({problem})")
    raise FileNotFoundError(f"--resume: no complete checkpoint in {out}: {'; '.join(skipped)}")


class OutputDirGuard:
    """Keeps a previous run in ``output_dir`` safe: a non-empty directory is refused unless the run resumes
    it or ``overwrite`` is set; with ``overwrite`` the old files move to ``output_dir/.replaced-run`` and are
    deleted only by :meth:`commit` (the new run saved a checkpoint or adapter), or put back by
    :meth:`restore` when the new run fails first. A new run into an absent or empty directory that fails before
    its training starts (:meth:`training_starts`) leaves nothing behind: :meth:`restore` removes what it wrote
    and the directories it made."""

    def __init__(self, out: Path, stash: Path | None = None, made: list[Path] | None = None) -> None:
        self.out = out
        self.stash = stash
        self.made = made  # None: the directory held a run (or is resumed); else the folders this run created
        self.started = False

    @classmethod
    def prepare(cls, cfg: TrainConfig) -> OutputDirGuard:
        out = Path(cfg.output_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"TrainConfig.output_dir: {out} exists and is not a directory")
        if cfg.resume or not _is_rank_zero():
            out.mkdir(parents=True, exist_ok=True)
            return cls(out)
        entries = sorted(out.iterdir()) if out.is_dir() else []
        if not entries:
            made = [d for d in (out, *out.parents) if not d.exists()]  # deepest first
            out.mkdir(parents=True, exist_ok=True)
            return cls(out, made=made)
        if not cfg.overwrite:
            shown = ", ".join(p.name for p in entries[:6]) + (", ..." if len(entries) > 6 else "")
            raise ConfigError(
                f"TrainConfig.output_dir: {out} is not empty ({shown}); continue that run with --resume true, "
                "replace it with --overwrite, or choose another --output-dir"
            )
        stash = out / REPLACED_DIR
        if stash.is_dir():  # an earlier overwrite stopped before saving anything: its files are not a run
            for p in entries:
                if p != stash:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        else:
            stash.mkdir()
            for p in entries:
                os.rename(p, stash / p.name)
        logger.warning("overwrite: the previous run in %s is kept in %s until this run saves a checkpoint",
                       out, stash)
        return cls(out, stash)

    def commit(self) -> None:
        """The new run has saved something: delete the previous run."""
        if self.stash is not None and self.stash.exists():
            shutil.rmtree(self.stash)
        self.stash = None

    def training_starts(self) -> None:
        """From here on a failed run keeps its files (its metrics and log show how far it got)."""
        self.started = True

    def restore(self) -> None:
        """The new run failed before saving anything: remove its files and put the previous run back (or, for
        a new run that failed before training started, remove the directories it made)."""
        if self.made is not None and not self.started and self.stash is None:
            for p in self.out.iterdir() if self.out.is_dir() else ():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
            for d in self.made:
                with contextlib.suppress(OSError):  # only while empty
                    d.rmdir()
            return
        if self.stash is None or not self.stash.is_dir():
            return
        for p in self.out.iterdir():
            if p != self.stash:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()
        for p in self.stash.iterdir():
            os.rename(p, self.out / p.name)
        self.stash.rmdir()
        self.stash = None


class _CommitOnSave(TrainerCallback):
    """Tells the output guard when the first checkpoint is in place."""

    def __init__(self, guard: OutputDirGuard) -> None:
        self.guard = guard

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.is_world_process_zero:
            self.guard.commit()


# --- the recipe ----------------------------------------------------------------------------------
def train(
    config: str | Path | None = None, *, callbacks: list[TrainerCallback] | None = None, **options: Any
) -> dict[str, Any]:
    """Fine-tune a model; returns the run summary (also written to ``<output_dir>/summary.json``).

    ``config`` is an optional YAML file of options; keyword ``options`` override it. Options are the
    fields of TrainConfig, DataConfig and MixLoraConfig (e.g. ``data=..., num_experts=8, top_k=2``).
    ``callbacks`` are extra HF TrainerCallbacks (library use only).

    A non-empty ``output_dir`` is refused unless ``resume`` (continue it) or ``overwrite`` (replace it)
    is set. A run stopped by Ctrl-C (SIGINT) or SIGTERM saves a checkpoint and returns with ``"interrupted": True``
    and ``"stop_signal"`` (``"SIGINT"`` or ``"SIGTERM"``).

    Args:
        config: YAML file of options (flags and keyword options override it).
    """
    train_cfg, data_cfg, mix_cfg = resolve(config, **options)
    resume_from = resume_checkpoint(train_cfg)  # checked before anything is written
    guard = OutputDirGuard.prepare(train_cfg)
    try:
        return _train(train_cfg, data_cfg, mix_cfg, callbacks, guard, resume_from)
    except BaseException:
        guard.restore()
        raise


def _train(
    train_cfg: TrainConfig,
    data_cfg: DataConfig,
    mix_cfg: MixLoraConfig,
    callbacks: list[TrainerCallback] | None,
    guard: OutputDirGuard,
    resume_from: Path | None,
) -> dict[str, Any]:
    # 1. configs
    out = Path(train_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {"train": dataclasses.asdict(train_cfg), "data": dataclasses.asdict(data_cfg),
                "mixlora": mix_cfg.to_dict()}
    torch.manual_seed(train_cfg.seed)

    # 2. model and data
    precision = resolve_precision(train_cfg.precision)
    if precision == "fp16" and not torch.cuda.is_available():
        logger.warning("precision fp16 on CPU: accelerate has no fp16 mixed precision there, so the fp16 weights "
                       "run without autocast or loss scaling; use bf16 or fp32 on CPU")
    precision_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    raw_data = load_raw(data_cfg)  # files, hub data set and fields checked before the model loads
    base, tokenizer = load_base_model(
        train_cfg.model,
        cache_dir=train_cfg.model_cache_dir,
        dtype=precision_dtype,
        quantize=train_cfg.quantize,
        gradient_checkpointing=train_cfg.gradient_checkpointing,
    )
    train_ds, val_ds, data_stats = build_datasets(data_cfg, tokenizer, raw=raw_data)
    train_ds, val_ds = _keep_model_columns(train_ds), _keep_model_columns(val_ds)

    # 3. adapter
    model = inject(base, mix_cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    # 4. train
    has_val = val_ds is not None and len(val_ds) > 0
    trainer = LoramixTrainer(
        model=model,
        args=_training_args(train_cfg, has_val),
        train_dataset=train_ds,
        eval_dataset=val_ds if has_val else None,
        data_collator=DataCollator(tokenizer),
        router_lr=train_cfg.router_lr,
        max_loss=train_cfg.max_loss,
    )
    metrics_path = out / "metrics.jsonl"  # empty or absent unless resuming (OutputDirGuard)
    trainer.remove_callback(PrinterCallback)  # our progress bar replaces the printed dicts
    progress = MetricsCallback(trainer, metrics_path)
    trainer.add_callback(progress)
    trainer.add_callback(BalanceBiasCallback(model))
    interrupt = InterruptCallback()
    trainer.add_callback(interrupt)
    trainer.add_callback(_CommitOnSave(guard))
    for cb in callbacks or []:
        trainer.add_callback(cb)
    check_disk_space(trainer, out, model, train_cfg.save_total_limit)
    if trainer.is_world_process_zero() and resume_from is None:  # a resumed run writes it with its adapter
        (out / "resolved_config.yaml").write_text(_yaml(resolved))

    base_val = None
    if has_val and not train_cfg.resume:  # at init the adapted model equals the base model
        base_val = trainer.evaluate(metric_key_prefix="base")["base_loss"]
    started = time.perf_counter()
    diverged = None
    finished = resume_from is not None and _reached_max_steps(resume_from, train_cfg.max_steps)
    guard.training_starts()
    try:
        if finished:
            _restore_finished_run(trainer, resume_from)  # Trainer would take one step past max_steps
        else:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except diskspace.DiskFullError as e:
        if e.saved is not None and trainer.is_world_process_zero():
            guard.commit()  # the adapter of the step is saved: the run has something of its own
        raise
    except TrainingDivergedError as e:
        diverged = str(e)
        for layer in get_state(model).moe_layers.values():  # the diverged forwards' assignments were counted
            layer.mixlora_router.balance_pending.zero_()  # after the last step's bias update: drop them
        if trainer.is_world_process_zero():
            save_adapter(model, out / "last_good")  # the update that diverged was never applied
            guard.commit()
    finally:
        progress.close_bar()  # an error's message starts on a line of its own
    elapsed = time.perf_counter() - started
    trainer.eval_expert_counts = None
    final_val = trainer.evaluate()["eval_loss"] if has_val and diverged is None else None

    # 5. save and report
    summary: dict[str, Any] = {
        "output_dir": str(out),
        "adapter_dir": str(out / "adapter"),
        "steps": trainer.state.global_step,
        "already_finished": finished,  # resumed at --max-steps: nothing was trained
        "precision": precision,
        "interrupted": interrupt.requested,
        "stop_signal": signal.Signals(interrupt.signum).name if interrupt.requested else None,
        "resumed_from": str(resume_from) if resume_from else None,
        "diverged": diverged,
        "train_seconds": round(elapsed, 1),
        "trainable_params": trainable,
        "total_params": total,
        "base_val_loss": base_val,
        "final_val_loss": final_val,
        "best_val_loss": trainer.state.best_metric,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "data": data_stats if isinstance(data_stats, dict) else str(data_stats),
    }
    widths = [layer.num_experts for layer in get_state(model).moe_layers.values()]
    if trainer.expert_counts is not None:  # over all training forwards
        summary["expert_share"], summary["expert_share_min"] = expert_shares(trainer.expert_counts, widths)
    if final_val is not None and trainer.eval_expert_counts is not None:  # the final model on validation data
        summary["val_expert_share"], summary["val_expert_share_min"] = expert_shares(trainer.eval_expert_counts, widths)
    if trainer.args.world_size > 1:  # each rank records a digest of its weights: ranks must agree
        digest_dir = out / "rank_digests"
        digest_dir.mkdir(exist_ok=True)
        (digest_dir / f"rank{trainer.args.process_index}.txt").write_text(weights_digest(model))
    final = trainable_state_dict(model) if diverged is None else None  # every rank: gathers FSDP shards
    if trainer.is_world_process_zero():
        if diverged is None:
            try:
                save_adapter(model, out / "adapter", final)
                tokenizer.save_pretrained(out / "adapter")
            except Exception as e:
                done = sorted(p.name for p in out.glob("checkpoint-*"))
                diskspace.raise_if_disk_full(
                    e, out, diskspace.tensor_bytes(final.values()), "the adapter", remove=out / "adapter",
                    tail=f"; the checkpoints are kept ({', '.join(done)})" if done else "")
                raise
            guard.commit()
        if resume_from is not None:
            (out / "resolved_config.yaml").write_text(_yaml(resolved))
        if train_cfg.plots:
            from .plots import plot_expert_utilisation, plot_loss_curves

            plot_loss_curves(metrics_path, out / "loss_curves.png")
            if trainer.expert_counts is not None:
                plot_expert_utilisation(trainer.expert_counts, out / "expert_utilisation.png")
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if diverged is not None:
        raise TrainingDivergedError(f"{diverged}; the last good adapter is in {out / 'last_good'}"
                                    f" (checkpoints: {sorted(p.name for p in out.glob('checkpoint-*'))})")
    return summary


def _reached_max_steps(checkpoint: Path, max_steps: int) -> bool:
    """Whether ``checkpoint`` is at or past ``max_steps`` (> 0): resuming it has nothing left to train."""
    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return max_steps > 0 and state.global_step >= max_steps


def _restore_finished_run(trainer: LoramixTrainer, checkpoint: Path) -> None:
    """The state and weights a finished run ended with, from its last checkpoint: the best checkpoint's
    adapter where the run keeps the best one, otherwise the checkpoint's own."""
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    best = trainer.state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and Path(best).is_dir():
        trainer._load_best_model()
    else:
        trainer._load_from_checkpoint(str(checkpoint))
    logger.warning("%s is at step %d, which reaches --max-steps: nothing left to train; the run's adapter is "
                   "saved from it (raise --max-steps to train further)", checkpoint, trainer.state.global_step)


def _count(n: int) -> str:
    """A parameter count for people: ``26.3 M``, ``136 M`` or, below a million, ``41,216``."""
    return f"{n / 1e6:.3g} M" if n >= 1e6 else f"{n:,}"


def summary_text(summary: dict[str, Any]) -> str:
    """A few lines for people about a run: steps, time, validation loss before and after, where the files
    are. ``summary`` is what :func:`train` returns; every figure stays in ``<output_dir>/summary.json``."""
    out = Path(summary["output_dir"])
    steps, seconds = summary["steps"], summary["train_seconds"]
    per_step = f", {seconds / steps:.1f} s per step" if steps else ""
    params = f"{_count(summary['trainable_params'])} of {_count(summary['total_params'])} parameters trainable"
    if summary.get("already_finished"):
        lines = [f"Nothing left to train: the run was already at step {steps}, which reaches --max-steps "
                 f"({summary['precision']}; {params})."]
    else:
        lines = [f"Trained {steps} steps in {_duration(seconds)}{per_step} ({summary['precision']}; {params})."]
    if summary.get("resumed_from"):
        lines.append(f"Resumed from {summary['resumed_from']}.")
    data = summary.get("data")
    if isinstance(data, dict) and data.get("summary"):
        lines.append(f"Data: {data['summary']}.")
    before, after = summary.get("base_val_loss"), summary.get("final_val_loss")
    if after is not None:
        text = f"{after:.3f} with the adapter"
        if before is not None:
            text = f"{before:.3f} before training, " + text
        best_name = Path(summary["best_checkpoint"]).name if summary.get("best_checkpoint") else None
        if best_name and best_name != f"checkpoint-{steps}":
            text += f" (the adapter of {best_name}, the lowest validation loss, is the one saved)"
        lines.append(f"Validation loss: {text}.")
    elif before is not None:
        lines.append(f"Validation loss before training: {before:.3f}.")
    if summary.get("interrupted"):
        by = f" by {summary['stop_signal']}" if summary.get("stop_signal") else ""
        lines.append(f"Interrupted{by}: continue with --resume true --output-dir {out}.")
    if summary.get("diverged"):
        lines.append(f"Stopped: {summary['diverged']}; the last good adapter is in {out / 'last_good'}.")
    else:
        lines.append(f"Adapter: {summary['adapter_dir']} (loramix generate --adapter {summary['adapter_dir']} "
                     "--prompt ...)")
    files = sorted(p.name + "/" * p.is_dir() for p in out.glob("[!.]*")) if out.is_dir() else []
    lines.append(f"Files in {out}/: {', '.join(files) or 'none'} (summary.json holds every figure of the run)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"


def expert_shares(
    counts: torch.Tensor, widths: list[int] | None = None
) -> tuple[list[list[float]], float | None]:
    """Per-layer fraction of assignments of each expert (rows of ``counts`` (L, E_max)) and the smallest share
    of a real expert (``widths[l]`` = experts of layer l; the rest of a row is padding)."""
    counts = counts.float().cpu()  # the run's device counts are read here
    share = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)  # (L, E_max)
    widths = widths or [counts.shape[1]] * counts.shape[0]
    real = [row[:w] for row, w, total in zip(share, widths, counts.sum(-1), strict=True) if total > 0]
    return share.tolist(), (float(torch.cat(real).min()) if real else None)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over the adapter's trainable tensors (names and bytes), for cross-rank checks."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(trainable_state_dict(model).items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)

