"""Base vs LoRA vs MixLoRA: train each adapter with the same budget on the same data, evaluate all on the
same tasks, and write a table (markdown + JSON) and PNG plots.

"Same budget" means the same optimiser steps, batch size, learning rate, sequence length, seed and data
(every option except ``adapter`` is shared). The LoRA baseline is ``train(adapter="lora")``: LoRA on the
same attention and FFN projections (a single always-on expert, i.e. plain LoRA), of the same rank, or with
``lora_rank="match"`` of the rank whose trainable parameter count is closest to the MixLoRA adapter's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .data import resolve_local
from .evaluation import evaluate, main_metric, results_table, task_path
from .plots import pyplot

TrainFn = Callable[..., dict[str, Any]]
LoadFn = Callable[..., tuple[Any, Any]]


def _default_train() -> TrainFn:
    from .train import train

    return train


def _default_load() -> LoadFn:
    from .generation import load_for_inference

    return load_for_inference


def compare(
    data: str,
    *,
    model: str | None = None,
    tasks: Sequence[str] = ("ARC-Easy", "boolq"),
    output_dir: str | os.PathLike[str] = "runs/compare",
    max_steps: int = 100,
    adapters: Sequence[str] = ("lora", "mixlora"),
    include_base: bool = True,
    data_dir: str | os.PathLike[str] | None = None,
    eval_limit: int | None = None,
    eval_batch_size: int = 8,
    max_new_tokens: int = 256,
    device: str | None = None,
    plots: bool = True,
    train_fn: TrainFn | None = None,
    load_fn: LoadFn | None = None,
    lora_rank: int | str | None = None,
    **train_options: Any,
) -> dict[str, Any]:
    """Train every adapter in ``adapters`` with identical options, evaluate them (and the base model).

    Args:
        data: training data (anything ``loramix.train.train`` accepts as ``data``).
        model: base model spec (``None`` = the default SmolLM2-135M-Instruct).
        tasks: evaluation tasks (see ``loramix.evaluation``); ``eval_limit`` items each.
        output_dir: one sub-directory per adapter run, plus ``compare.json``, ``compare.md`` and the PNGs.
        train_options: any further ``train`` option (``batch_size``, ``learning_rate``, ``num_experts``...),
            passed unchanged to every run -- the equal budget.
        train_fn / load_fn: replace ``loramix.train.train`` / ``loramix.generation.load_for_inference``
            (tests, custom pipelines).
        lora_rank: rank of the ``lora`` run on every projection (alphas scaled to keep alpha / r); ``"match"``
            picks the rank whose trainable parameters come closest to the ``mixlora`` run's; None = ``r``.

    Returns ``{"runs": {name: {"train": summary | None, "eval": evaluate() result}}, "table", "files"}``.
    """
    if load_fn is None:  # the files the runs need, before any model loads
        for task in [tasks] if isinstance(tasks, str) else tasks:
            task_path(task, data_dir)
    if train_fn is None and isinstance(data, str):
        for part in data.split(","):
            resolve_local(part.strip())
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora_options, matching = _lora_options(model, train_options, lora_rank)  # bad ranks fail before any work
    train_fn = train_fn or _default_train()
    load_fn = load_fn or _default_load()
    runs: dict[str, dict[str, Any]] = {}
    eval_kw = dict(data_dir=data_dir, limit=eval_limit, batch_size=eval_batch_size, max_new_tokens=max_new_tokens)
    if include_base:
        m, tok = load_fn(model, None, device=device)
        runs["base"] = {"train": None, "eval": evaluate(m, tok, tasks, **eval_kw)}
        del m
    for adapter in adapters:
        summary = train_fn(
            model=model,
            data=data,
            output_dir=str(out / adapter),
            adapter=adapter,
            max_steps=max_steps,
            **(lora_options if adapter == "lora" else train_options),
        )
        if summary.get("interrupted"):  # Ctrl-C / SIGTERM: stop here, with that run's checkpoint saved
            import signal

            from .stopping import StopAborted

            raise StopAborted(getattr(signal, summary.get("stop_signal") or "SIGINT"))
        adapter_dir = summary.get("adapter_dir") or str(out / adapter / "adapter")
        m, tok = load_fn(model, adapter_dir, device=device)
        runs[adapter] = {"train": summary, "eval": evaluate(m, tok, tasks, **eval_kw)}
        del m
    table = comparison_table(runs)
    files = {"json": str(out / "compare.json"), "markdown": str(out / "compare.md")}
    if plots:
        files["metrics_png"] = str(plot_metrics(runs, out / "compare_metrics.png"))
        loss_png = plot_losses({k: out / k / "metrics.jsonl" for k in adapters}, out / "compare_loss.png")
        if loss_png is not None:
            files["loss_png"] = str(loss_png)
    result = {
        "runs": runs,
        "table": table,
        "files": files,
        "max_steps": max_steps,
        "train_options": train_options,
        "lora_options": lora_options,
        "param_matching": matching,
    }
    Path(files["json"]).write_text(json.dumps(result, indent=2, default=str))
    Path(files["markdown"]).write_text(table + "\n")
    return result


def _lora_options(
    model: str | None, options: dict[str, Any], lora_rank: int | str | None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The ``lora`` run's options: ``options`` with ``r``/``attn_r`` set to ``lora_rank`` (alphas scaled)."""
    if lora_rank is None:
        return dict(options), None
    matching = None
    if lora_rank == "match":
        matching = matched_lora_rank(model, options)
        rank = matching["rank"]
    elif isinstance(lora_rank, int) and not isinstance(lora_rank, bool) and lora_rank > 0:
        rank = lora_rank
    else:
        raise ValueError(f"compare: lora_rank must be a positive int or 'match', got {lora_rank!r}")
    from .config import MixLoraConfig

    defaults = MixLoraConfig()
    r, attn_r = options.get("r", defaults.r), options.get("attn_r", defaults.attn_r)
    alpha, attn_alpha = options.get("alpha", defaults.alpha), options.get("attn_alpha", defaults.attn_alpha)
    lora = dict(options, r=rank, alpha=alpha * rank / r)
    if attn_r:
        lora.update(attn_r=rank, attn_alpha=attn_alpha * rank / attn_r)
    return lora, matching


def count_trainable(base: Any, config: Any) -> int:
    """Trainable parameters of ``config`` injected into ``base`` (``base`` is left as it was)."""
    from .injection import inject, unload

    model = inject(base, config)
    try:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    finally:
        unload(model)


def matched_lora_rank(model: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The LoRA rank (same projections as the MixLoRA run) whose trainable count is closest to MixLoRA's.

    LoRA parameters grow linearly with the rank, so two injections (ranks 1 and 2) give the line.
    """
    from .config import MixLoraConfig
    from .models import load_base_model
    from .train import split_options

    mix_options = split_options({k: v for k, v in options.items() if k != "adapter"})["mixlora"]
    base, _ = load_base_model(model, device="cpu", dtype="float32")
    target = count_trainable(base, MixLoraConfig(**mix_options))

    def lora(rank: int) -> MixLoraConfig:
        attn_r = rank if mix_options.get("attn_r", MixLoraConfig.attn_r) else 0
        return MixLoraConfig(**{**mix_options, "num_experts": 1, "router": "dense", "r": rank, "attn_r": attn_r,
                                "balance_coef": 0.0, "z_loss_coef": 0.0, "entropy_coef": 0.0})

    one, two = count_trainable(base, lora(1)), count_trainable(base, lora(2))
    per_rank, fixed = two - one, 2 * one - two  # params(rank) = fixed + rank * per_rank
    rank = max(1, round((target - fixed) / per_rank))
    return {"rank": rank, "mixlora_params": target, "lora_params": fixed + rank * per_rank}


def comparison_table(runs: dict[str, dict[str, Any]]) -> str:
    """Markdown: task metrics side by side, then the training cost of each adapter run."""
    lines = [results_table({name: r["eval"] for name, r in runs.items()}), ""]
    lines += ["| run | steps | train s | trainable params | final val loss |", "|---|---:|---:|---:|---:|"]
    for name, r in runs.items():
        s = r.get("train") or {}

        def cell(key: str, s: dict[str, Any] = s) -> str:
            v = s.get(key)
            if v is None:
                return "-"
            return f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v)

        lines.append(
            f"| {name} | {cell('steps')} | {cell('train_seconds')} | {cell('trainable_params')} | "
            f"{cell('final_val_loss')} |"
        )
    return "\n".join(lines)


def plot_metrics(runs: dict[str, dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """One bar chart per task: the headline metric of every run (accuracy in %, or perplexity)."""
    plt = pyplot()
    tasks: list[str] = []
    for r in runs.values():
        tasks += [t for t in r["eval"]["tasks"] if t not in tasks]
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(3.2 * max(len(tasks), 1), 3.4), squeeze=False)
    names = list(runs)
    for ax, task in zip(axes[0], tasks, strict=False):
        values, metric = [], ""
        for name in names:
            res = runs[name]["eval"]["tasks"].get(task)
            if res is None:
                values.append(0.0)
                continue
            metric, v = main_metric(res)
            values.append(v if metric == "perplexity" else 100 * v)
        bars = ax.bar(names, values, color=["tab:gray", "tab:blue", "tab:orange", "tab:green"][: len(names)])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(task)
        ax.set_ylabel("perplexity (lower is better)" if metric == "perplexity" else f"{metric} (%)")
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_losses(metrics_files: dict[str, Path], path: str | os.PathLike[str]) -> Path | None:
    """Training LM loss (and validation loss) of every adapter run on one plot; None if no run logged any."""
    curves = {}
    for name, f in metrics_files.items():
        if Path(f).is_file():
            rows = [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
            curves[name] = rows
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        train = [r for r in rows if "step" in r and ("lm_loss" in r or "loss" in r)]
        if train:
            ax.plot(
                [r["step"] for r in train],
                [r.get("lm_loss", r.get("loss")) for r in train],
                label=f"{name} train",
            )
        val = [r for r in rows if "eval_loss" in r]
        if val:
            ax.plot([r["step"] for r in val], [r["eval_loss"] for r in val], "o--", label=f"{name} val")
    ax.set(xlabel="step", ylabel="LM loss", title="training with the same budget")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
