"""loramix.plots: PNG files of a run's losses and expert loads."""

from __future__ import annotations

import json

import torch

from loramix.plots import plot_expert_utilisation, plot_loss_curves, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def test_loss_curves_read_the_metrics_file_and_write_a_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 0, "base_loss": 3.0}, {"step": 1, "loss": 3.1, "lm_loss": 3.0, "aux_loss": 0.1},
            {"step": 2, "loss": 2.9, "lm_loss": 2.8, "aux_loss": 0.1}, {"step": 2, "eval_loss": 2.85}]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_metrics(metrics) == rows and read_metrics(tmp_path / "missing.jsonl") == []
    out = plot_loss_curves(metrics, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == PNG


def test_expert_utilisation_handles_layers_without_tokens(tmp_path):
    counts = torch.tensor([[3, 1, 0, 0], [0, 0, 0, 0]])  # the second layer routed nothing
    out = plot_expert_utilisation(counts, tmp_path / "experts.png")
    assert out.read_bytes()[:8] == PNG
