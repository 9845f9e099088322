"""PNG plots of a run: loss curves and expert utilisation per layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (PNG files, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Training loss (total and LM), aux loss and validation loss against the step."""
    rows = read_metrics(metrics_path)
    plt = pyplot()
    fig, (ax, ax_aux) = plt.subplots(1, 2, figsize=(11, 4))
    train = [r for r in rows if "loss" in r]
    base = [{"step": r["step"], "eval_loss": r["base_loss"]} for r in rows if "base_loss" in r]
    val = base + [r for r in rows if "eval_loss" in r]  # the base model's loss is step 0 of the curve
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (lm + aux)", alpha=0.5)
        ax.plot([r["step"] for r in train], [r["lm_loss"] for r in train], label="train lm loss")
        ax_aux.plot([r["step"] for r in train], [r["aux_loss"] for r in train], color="tab:red")
    if val:
        ax.plot([r["step"] for r in val], [r["eval_loss"] for r in val], "o-", label="validation lm loss")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    ax_aux.set(xlabel="step", ylabel="aux loss", title="router aux loss")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def plot_expert_utilisation(counts: torch.Tensor, out_png: str | Path) -> Path:
    """Heatmap of each layer's share of tokens per expert (rows: layers, columns: experts)."""
    counts = counts.float().cpu()  # (L, E)
    share = counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * share.shape[1], 1.5 + 0.25 * share.shape[0]))
    im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set(xlabel="expert", ylabel="layer", title="share of routed tokens")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
