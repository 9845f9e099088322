"""Continual-learning metrics, boundary detection, routing weights and maturity: pure functions against
hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch

from loramix.config import ConfigError
from loramix.continual import (
    ContinualConfig,
    HybridRouter,
    MaturityTracker,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    boundary_detection,
    forgetting_per_task,
    forward_transfer,
    plot_accuracy_matrix,
    resolve_config,
    route_weights,
    similarity_report,
    summarize,
)

# R[j][i]: score on task i after training on task j
R3 = [
    [0.9, 0.2, 0.1],
    [0.6, 0.8, 0.3],
    [0.5, 0.7, 0.7],
]
BASE3 = [0.25, 0.1, 0.2]


def test_acc_bwt_fwt_forgetting_by_hand():
    assert average_accuracy(R3) == pytest.approx((0.5 + 0.7 + 0.7) / 3)
    # BWT = ((0.5 - 0.9) + (0.7 - 0.8)) / 2
    assert backward_transfer(R3) == pytest.approx(-0.25)
    # FWT = ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.2 - 0.1) + (0.3 - 0.2)) / 2
    assert forward_transfer(R3, BASE3) == pytest.approx(0.1)
    # f_0 = max(0.9, 0.6) - 0.5 = 0.4; f_1 = max(0.2, 0.8) - 0.7 = 0.1
    assert forgetting_per_task(R3) == pytest.approx([0.4, 0.1])
    assert average_forgetting(R3) == pytest.approx(0.25)


def test_forgetting_uses_best_earlier_stage_not_just_diagonal():
    # task 0 peaks after task 1 (positive transfer), then drops: forgetting counts from the peak,
    # BWT from the diagonal -- the two metrics differ here by construction.
    R = [
        [0.5, 0.0, 0.0, 0.0],
        [0.9, 0.6, 0.0, 0.0],
        [0.7, 0.6, 0.8, 0.1],
        [0.6, 0.7, 0.4, 0.9],
    ]
    assert forgetting_per_task(R) == pytest.approx([0.3, -0.1, 0.4])
    assert average_forgetting(R) == pytest.approx(0.2)
    assert backward_transfer(R) == pytest.approx(((0.6 - 0.5) + (0.7 - 0.6) + (0.4 - 0.8)) / 3)
    assert average_accuracy(R) == pytest.approx(0.65)


def test_summarize_and_single_task():
    s = summarize(R3, BASE3)
    assert s["acc"] == pytest.approx(19 / 30) and s["bwt"] == pytest.approx(-0.25)
    assert s["final_scores"] == [0.5, 0.7, 0.7]
    one = summarize([[0.4]], [0.1])
    assert one["acc"] == pytest.approx(0.4)
    assert one["bwt"] is None and one["fwt"] is None and one["forgetting"] is None
    assert summarize(R3)["fwt"] is None


@pytest.mark.parametrize("bad", [[], [[0.1, 0.2]], [[0.1], [0.2]], [[float("nan")]], [["x"]]])
def test_bad_matrices_are_rejected(bad):
    with pytest.raises(ValueError):
        average_accuracy(bad)


def test_fwt_needs_one_base_score_per_task():
    with pytest.raises(ValueError, match="base scores"):
        forward_transfer(R3, [0.1, 0.2])


def test_boundary_detection_by_hand():
    # boundaries 0, 100, 200; creations at 7 (detects 0), 50 (spurious), 104 (detects 100), 109 (spurious:
    # 100 is already taken), nothing for 200 within 10
    res = boundary_detection([7, 50, 104, 109, 230], [0, 100, 200], tolerance=10)
    assert res["precision"] == pytest.approx(2 / 5)
    assert res["recall"] == pytest.approx(2 / 3)
    assert res["f1"] == pytest.approx(2 * (0.4 * 2 / 3) / (0.4 + 2 / 3))
    assert res["spurious"] == [50, 109, 230]
    assert res["missed"] == [200]
    assert [m["delay"] for m in res["matches"]] == [7, 4]


def test_boundary_detection_edges():
    perfect = boundary_detection([3, 51], [0, 48], tolerance=3)
    assert perfect["precision"] == 1.0 and perfect["recall"] == 1.0 and perfect["spurious"] == []
    late = boundary_detection([3, 52], [0, 48], tolerance=3)  # one step outside the window
    assert late["recall"] == 0.5 and late["spurious"] == [52] and late["missed"] == [48]
    early = boundary_detection([47], [48], tolerance=5)  # before the boundary never counts
    assert early["recall"] == 0.0
    none = boundary_detection([], [0, 10], tolerance=2)
    assert none["precision"] is None and none["recall"] == 0.0 and none["f1"] is None
    with pytest.raises(ValueError):
        boundary_detection([1], [0], tolerance=-1)


def test_plot_and_json(tmp_path):
    png = plot_accuracy_matrix(R3, ["a", "b", "c"], tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    with pytest.raises(ValueError):
        plot_accuracy_matrix(R3, ["a", "b"], tmp_path / "bad.png")
    json.dumps(summarize(R3, BASE3))  # JSON-serialisable


def test_route_weights_dense_and_sparse():
    sims = torch.tensor([[0.9, 0.5, 0.7], [0.2, 0.3, 0.1]])
    dense = route_weights(sims, "dense", temperature=0.1)
    expected = torch.softmax(sims / 0.1, dim=-1)
    assert torch.allclose(dense, expected)
    top1 = route_weights(sims, "sparse", temperature=0.1, top_k=1)
    assert torch.equal(top1, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    top2 = route_weights(sims, "sparse", temperature=0.1, top_k=2)
    a = torch.softmax(torch.tensor([0.9, 0.7]) / 0.1, 0)
    assert torch.allclose(top2[0], torch.tensor([a[0], 0.0, a[1]]))
    assert torch.allclose(top2.sum(-1), torch.ones(2))
    assert route_weights(sims, "sparse", top_k=9).shape == (2, 3)  # k capped at K
    with pytest.raises(ValueError):
        route_weights(sims, "topk")
    with pytest.raises(ValueError):
        route_weights(sims, "dense", temperature=0.0)


def test_maturity_needs_examples_and_plateau():
    t = MaturityTracker(min_examples=10, patience=2, min_delta=0.05)
    assert not t.add_val_loss(3.0)  # best
    assert not t.add_val_loss(2.5)  # improved by 0.5
    assert not t.add_val_loss(2.48)  # < min_delta: 1 bad
    assert not t.add_val_loss(2.47)  # 2 bad: plateau, but only 0 examples
    assert t.plateaued and not t.mature
    assert not t.add_examples(9)
    assert t.add_examples(1)  # 10 examples: mature now
    assert t.mature and not t.add_val_loss(0.1)  # latched; returns False after the switch
    assert t.mature


def test_maturity_improvement_resets_patience():
    t = MaturityTracker(min_examples=0, patience=2, min_delta=0.0)
    t.add_val_loss(2.0)
    t.add_val_loss(2.0)  # 1 bad
    t.add_val_loss(1.0)  # improvement: reset
    assert t.bad_evals == 0 and not t.mature
    t.add_val_loss(1.5)
    assert t.add_val_loss(1.2)
    assert t.state()["best_val_loss"] == 1.0 and t.state()["val_losses"] == [2.0, 2.0, 1.0, 1.5, 1.2]


def test_hybrid_router_switches_dense_to_sparse_and_back():
    router = HybridRouter("hybrid", temperature=0.1, min_examples=2, patience=1, min_delta=0.0)
    assert router.mode == "dense"  # no expert
    first = router.new_expert()
    assert router.mode == "dense"
    first.add_examples(2)
    first.add_val_loss(1.0)
    first.add_val_loss(1.0)
    assert first.mature and router.mode == "sparse"
    assert torch.equal(router.weights(torch.tensor([[0.9]])), torch.tensor([[1.0]]))
    router.new_expert()  # a new immature expert: collaborative (dense) again for the prompts nearest it
    assert router.mode == "dense"
    assert bool((router.weights(torch.tensor([[0.4, 0.9]])) > 0).all())
    assert torch.equal(router.weights(torch.tensor([[0.9, 0.4]])), torch.tensor([[1.0, 0.0]]))  # first: ready
    with pytest.raises(ValueError, match="2 skills for 3 experts"):
        router.new_expert()
        router.weights(torch.tensor([[0.9, 0.4]]))
    assert HybridRouter("sparse").mode == "sparse" and HybridRouter("dense").mode == "dense"
    with pytest.raises(ValueError):
        HybridRouter("learned")


def test_similarity_report_by_hand():
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    rep = similarity_report(emb, [0, 0, 1, 1], threshold=0.9)
    # task 1 prototype: normalize((0.3, 0.9)); example 2's own similarity = 0.9 / |(0.3, 0.9)|
    p1 = torch.nn.functional.normalize(torch.tensor([0.3, 0.9]), dim=0)
    assert rep["own_min"] == pytest.approx(float(p1[1]), abs=1e-6)
    assert rep["other_max"] == pytest.approx(0.6, abs=1e-6)  # example 3 vs task 0 = (1, 0)
    assert rep["own_above_threshold"] == pytest.approx(1.0)
    assert rep["other_below_threshold"] == pytest.approx(1.0)


def test_config_validation_and_resolution(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tasks: synthetic\nthreshold: 0.7\nwindow: 3\nlearning_rate: 1e-3\n")
    cfg = resolve_config(path, window=5)
    assert cfg.tasks == "synthetic" and cfg.threshold == 0.7 and cfg.window == 5 and cfg.learning_rate == 1e-3
    assert cfg.tolerance == 10
    assert resolve_config(cfg).window == 5
    with pytest.raises(ConfigError, match="unknown"):
        resolve_config(None, windw=3)
    for bad in ({"guard": "ewc"}, {"routing": "topk"}, {"window": 0}, {"threshold": 1.5}, {"metric": "f1"},
                {"embedder": "bert"}, {"expert_targets": "up"}, {"train_lag": 4, "quarantine": 8}):
        with pytest.raises(ConfigError, match=next(iter(bad)) if len(bad) == 1 else "quarantine"):
            ContinualConfig(**bad)
    assert ContinualConfig(train_lag=16, quarantine=8).quarantine == 8


def test_cli_continual_command_offers_every_config_field(capsys):
    """``loramix continual`` is wired to ``continual_command``, whose flags come from its signature."""
    import dataclasses

    from loramix import cli
    from loramix.cli.commands import continual_command

    parser = cli.build_parser()
    fn, kwargs = cli.parse([
        "continual", "--tasks", "synthetic:4", "--threshold", "0.8", "--window", "3", "--no-baselines",
        "--expert-targets", "[up, down]", "--learning-rate", "1e-3", "--config", "c.yaml",
    ])
    assert fn is continual_command
    assert kwargs == {"config": "c.yaml", "tasks": "synthetic:4", "threshold": 0.8, "window": 3,
                      "baselines": False, "expert_targets": ["up", "down"], "learning_rate": 1e-3}
    kwargs.pop("config")
    cfg = resolve_config(None, **kwargs)
    assert cfg.expert_targets == ["up", "down"] and cfg.baselines is False
    with pytest.raises(SystemExit):
        parser.parse_args(["continual", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(ContinualConfig):
        assert "--" + f.name.replace("_", "-") in text
    assert "Examples whose mean is tested" in text  # field docs become the help


def test_dense_weights_drop_negligible_experts():
    sims = torch.tensor([[0.9, 0.1, 0.85], [0.5, 0.5, 0.5]])
    w = route_weights(sims, "dense", temperature=0.05)
    assert w[0, 1] == 0.0 and w[0, 0] > w[0, 2] > 0  # e^-16 of the top weight: dropped, row renormalised
    assert torch.allclose(w.sum(-1), torch.ones(2)) and torch.allclose(w[1], torch.full((3,), 1 / 3))
    full = route_weights(sims, "dense", temperature=0.05, min_weight=0.0)
    assert full[0, 1] > 0 and torch.allclose(full, torch.softmax(sims / 0.05, dim=-1))


def test_default_learning_budget_fits_tasks_of_a_few_dozen_examples():
    """With the defaults a task of 48 examples must get a real learning budget: the earlier defaults (learning
    rate 5e-4, one step per batch of 8, 8 held out) gave it 5 optimiser steps, and SST-2 was not learned (0.433
    before and after on 60 test items; 0.833 with these defaults, 48 examples, one LoRA); the validation
    hold-out, which never trains, stays a small share of it."""
    cfg = ContinualConfig(tasks="synthetic")
    trained = 48 - cfg.val_size
    steps = -(-trained // cfg.batch_size) * cfg.steps_per_batch
    assert steps >= 20 and cfg.learning_rate >= 1e-3
    assert cfg.val_size <= 48 // 10 and cfg.val_size * cfg.val_every <= 2 * cfg.window  # held out early, few
