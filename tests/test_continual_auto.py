"""Defaults calibrated by the data: threshold="auto" (window-mean shift), temperature="auto", and a whole run
on a stream of data files with every detection and routing option at its default."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from helpers.tiny_lm import byte_lm
from loramix.continual import NoveltyDetector, SkillPrototypes, boundary_detection
from loramix.continual.config import ContinualConfig


def cloud(center: torch.Tensor, n: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` unit vectors scattered around ``center``: ``(n, D)``."""
    return F.normalize(center[None, :] + noise * torch.randn(n, center.shape[0], generator=gen), dim=-1)


def stream_of(clouds: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    rows, bounds = [], []
    for c in clouds:
        bounds.append(len(rows))
        rows.extend(c)
    return rows, bounds


def run_detector(det: NoveltyDetector, rows: list[torch.Tensor]) -> list[int]:
    for i, e in enumerate(rows):
        det.observe(i, e)
    return det.created_at


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_finds_a_tight_task_inside_a_loose_tasks_scatter(seed):
    """Task B's single examples are as close to task A's prototype as A's own examples (no fixed threshold
    can tell them apart), but B's examples share a direction, so the mean of a window of them lies far
    from A's prototype: auto detects B at its start, with no spurious skill in either task."""
    gen = torch.Generator().manual_seed(seed)
    D = 64
    mu_a = F.normalize(torch.randn(D, generator=gen), dim=0)
    offset = F.normalize(torch.randn(D, generator=gen), dim=0)
    mu_b = F.normalize(mu_a + 0.7 * offset, dim=0)
    a, b = cloud(mu_a, 48, 0.09, gen), cloud(mu_b, 48, 0.03, gen)
    proto_a = F.normalize(a.mean(0), dim=0)
    # per example, B is inside A's own scatter: its similarities to A's prototype overlap A's own
    assert (b @ proto_a).max() > torch.quantile(a @ proto_a, 0.05)
    rows, bounds = stream_of([a, b])
    created = run_detector(NoveltyDetector("auto", 8), rows)
    det = boundary_detection(created, bounds, 16)
    assert det["precision"] == 1.0 and det["recall"] == 1.0, created
    # the fixed-threshold rule at A's 5th percentile keeps B in A's skill
    fixed = run_detector(NoveltyDetector(float(torch.quantile(a @ proto_a, 0.05)), 8), rows)
    assert boundary_detection(fixed, bounds, 16)["recall"] < 1.0


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_needs_no_threshold_for_another_scale_of_similarities(seed):
    """The same stream at two embedding scales of similarity (isotropic vs a shared dominant direction that
    pushes every cosine towards 1, as mean-pooled LM states do): auto detects every boundary in both."""
    gen = torch.Generator().manual_seed(seed)
    D = 64
    centers = [F.normalize(torch.randn(D, generator=gen), dim=0) for _ in range(4)]
    shared = F.normalize(torch.randn(D, generator=gen), dim=0)
    for anisotropy in (0.0, 6.0):
        clouds = [F.normalize(cloud(c, 40, 0.15, gen) + anisotropy * shared, dim=-1) for c in centers]
        rows, bounds = stream_of(clouds)
        created = run_detector(NoveltyDetector("auto", 8), rows)
        det = boundary_detection(created, bounds, 16)
        assert det["precision"] == 1.0 and det["recall"] == 1.0, (anisotropy, created)


def test_auto_founders_leave_the_old_prototype():
    gen = torch.Generator().manual_seed(5)
    a = cloud(F.normalize(torch.randn(32, generator=gen), dim=0), 40, 0.05, gen)
    b = cloud(F.normalize(torch.randn(32, generator=gen), dim=0), 40, 0.05, gen)
    det = NoveltyDetector("auto", 8)
    run_detector(det, list(a) + list(b))
    assert det.created_at and len(det.library) == 2
    new = next(d for d in det.log if d.decision == "new_skill" and d.skill == 1)
    assert new.members and min(new.members) >= 40 and new.shift > det.shift
    # every B example that arrived before the new skill existed was taken back out of A's prototype
    assert det.library.counts[0] == 40
    assert det.library.counts[1] == 40


def test_spread_and_resultant_estimate_the_cloud():
    gen = torch.Generator().manual_seed(0)
    lib = SkillPrototypes()
    x = cloud(F.normalize(torch.randn(48, generator=gen), dim=0), 400, 0.1, gen)
    lib.add(x[:8])
    for e in x[8:]:
        lib.update(0, e)
    true_rho = float(x.mean(0).norm())
    assert lib.resultant(0) == pytest.approx(true_rho, abs=0.01)
    sims = x @ F.normalize(x.mean(0), dim=0)
    assert lib.spread() == pytest.approx(float(sims.std()), rel=0.25)


def test_config_defaults_are_data_calibrated():
    cfg = ContinualConfig(tasks="synthetic")
    assert cfg.threshold == "auto" and cfg.temperature == "auto" and cfg.train_lag == 2 * cfg.window
    assert ContinualConfig(tasks="synthetic", threshold="0.9").threshold == 0.9
    assert ContinualConfig(tasks="synthetic", window=4, train_lag=0).train_lag == 0
    with pytest.raises(Exception, match="threshold: must be auto or a number"):
        ContinualConfig(tasks="synthetic", threshold="high")
    with pytest.raises(Exception, match="shift: must be > 1"):
        ContinualConfig(tasks="synthetic", shift=1.0)


# --------------------------------------------------------------------------------------------------
# a run on data files, every detection / routing option at its default
# --------------------------------------------------------------------------------------------------
ALPHABETS = ("abcdefgh", "01234567", "KLMNOPQR")


def words(rng: random.Random, alphabet: str) -> str:
    return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(3, 6))) for _ in range(rng.randint(12, 18)))


@pytest.fixture(scope="module")
def file_run(tmp_path_factory):
    from loramix.cli.commands import continual_command

    root = tmp_path_factory.mktemp("cl-files")
    rng = random.Random(0)
    n = 40
    (root / "notes.jsonl").write_text("".join(
        json.dumps({"prompt": words(rng, ALPHABETS[0]), "response": "ant"}) + "\n" for _ in range(n)))
    (root / "quiz.json").write_text(json.dumps([
        {"question": words(rng, ALPHABETS[1]), "choices": ["ant", "bee", "cow"], "answer": 1} for _ in range(n)]))
    (root / "code.jsonl").write_text("".join(
        json.dumps({"text": words(rng, ALPHABETS[2]), "code": "def f():\n    return 3",
                    "test_list": ["assert f() == 3"]}) + "\n" for _ in range(n)))
    model, tok = byte_lm("llama")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    tasks = ",".join(str(root / f) for f in ("notes.jsonl", "quiz.json", "code.jsonl"))
    summary = continual_command(model=str(root / "model"), output_dir=str(root / "out"), tasks=tasks,
                                train_per_task=32, test_per_task=6, learning_rate=1e-2, batch_size=8,
                                max_new_tokens=8, eval_batch_size=8, dropout=0.0)
    return summary, root / "out"


def test_file_stream_with_defaults_detects_every_task(file_run):
    summary, _ = file_run
    assert summary["config"]["threshold"] == "auto" and summary["config"]["temperature"] == "auto"
    det = summary["detection"]
    assert summary["experts"] == 3 and det["precision"] == 1.0 and det["recall"] == 1.0, summary["expert_created_at"]
    owners = [list(v) for v in summary["skill_tasks"].values()]
    assert all(len(o) == 1 for o in owners)


def test_file_stream_scores_each_task_by_its_kind(file_run):
    from loramix.continual.run import format_report

    summary, out = file_run
    assert summary["tasks"] == ["notes", "quiz", "code"]
    assert summary["scores"] == ["loss", "acc", "pass@1"]
    assert summary["score"].startswith("mixed")
    matrix = json.loads((out / "accuracy_matrix.json").read_text())
    by = matrix["continual"]["by_score"]
    assert set(by) == {"loss", "acc", "pass@1"} and by["loss"]["higher_is_better"] is False
    R = matrix["continual"]["R"]
    assert R[0][0] < matrix["base"][0]  # the notes expert lowered its task's response loss
    assert by["loss"]["bwt"] == pytest.approx(-(R[2][0] - R[0][0]))
    assert R[1][1] == 1.0 and R[2][1] == 1.0  # the quiz expert learned its constant answer and kept it
    assert matrix["aux_loss"]["tasks"] == ["code"] and len(matrix["aux_loss"]["continual"]) == 3
    assert len(matrix["aux_loss"]["sequential"]) == 3
    report = format_report(summary)
    assert "score: mixed" in report and "lower is better" in report
    assert "| continual | loss |" in report and "| sequential | acc |" in report


def test_hub_entries_go_through_datasets_load_dataset(monkeypatch, tmp_path):
    """``owner/name@split`` and ``hf:name`` entries are hub data sets, loaded by datasets.load_dataset."""
    import datasets

    from loramix.continual import load_tasks

    calls = []

    def fake_load(name, subset=None, split=None, cache_dir=None):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"prompt": f"{name} q{i}", "response": f"a{i}"} for i in range(20)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    tasks = load_tasks("someone/tickets@validation,hf:mbpp", test_per_task=4, train_per_task=8)
    assert calls == [("someone/tickets", "validation"), ("mbpp", "train")]
    assert [t.name for t in tasks] == ["tickets@validation", "mbpp"] and len(tasks[0].train) == 8


ORDERS = [("social_i_qa", "sst2", "piqa"), ("sst2", "boolq", "ARC-Easy", "winogrande"),
          ("piqa", "winogrande", "social_i_qa"), ("winogrande", "ARC-Easy", "piqa", "sst2"),
          ("boolq", "social_i_qa", "sst2")]
_DATA = __import__("pathlib").Path(__import__("os").environ.get("LORAMIX_DATA_DIR") or "/none")


@pytest.mark.slow
@pytest.mark.skipif(not (_DATA / "llm_adapters_commonsense" / "piqa" / "test.json").is_file()
                    or not (_DATA / "sst2" / "sst2_train.tsv").is_file(),
                    reason="needs sst2 and the LLM-Adapters commonsense sets in $LORAMIX_DATA_DIR")
def test_default_detection_across_task_orders():
    """Several orders of six tasks, 48 training examples per task, the default model and detection options
    (social_i_qa -> sst2 -> piqa among them): one expert per task, each within 2 * window of its start."""
    from loramix.continual import HiddenStateEmbedder, load_tasks
    from loramix.models import load_base_model

    cfg = ContinualConfig(tasks="social_i_qa,sst2,piqa", train_per_task=48)
    names = sorted({t for order in ORDERS for t in order})
    tasks = {t.name: t for t in load_tasks(names, train_per_task=48, test_per_task=10, seed=cfg.seed)}
    model, tok = load_base_model(None)
    embed = HiddenStateEmbedder(model, tok, batch_size=8, max_length=cfg.max_length)
    emb = {n: embed([e.prompt for e in tasks[n].train]) for n in names}  # (48, D) each
    for order in ORDERS:
        rows, bounds = stream_of([emb[n] for n in order])
        created = run_detector(NoveltyDetector(cfg.threshold, cfg.window, shift=cfg.shift), rows)
        result = boundary_detection(created, bounds, cfg.tolerance)
        assert result["precision"] == 1.0 and result["recall"] == 1.0, (order, created)
