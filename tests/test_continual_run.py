"""run_continual end to end on tiny random llama / gpt2 models and a synthetic 3-task stream, plus the
real task loaders (skipped unless $LORAMIX_DATA_DIR holds the files they read)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers.tiny_lm import byte_lm
from loramix.cli.commands import continual_command
from loramix.continual import build_stream, load_tasks, summarize
from loramix.continual.run import format_report

SETTINGS = dict(
    tasks="synthetic", train_per_task=40, test_per_task=8, threshold=0.8, window=4, batch_size=8,
    steps_per_batch=2, learning_rate=1e-2, dropout=0.0, min_examples=16, patience=1, min_delta=0.5,
    eval_every=2, val_size=4, val_every=4, eval_batch_size=8, restore_best=True,
)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"cl-{request.param}")
    model, tok = byte_lm(request.param)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    summary = continual_command(model=str(root / "model"), output_dir=str(root / "out"), **SETTINGS)  # the CLI's
    return summary, root / "out"


def test_outputs_written(run):
    summary, out = run
    for name in ("accuracy_matrix.json", "progress.json", "accuracy_matrix.png", "accuracy_matrix_sequential.png",
                 "decisions.jsonl", "events.jsonl", "summary.json", "continual_model/experts.json",
                 "continual_model/experts.safetensors", "continual_model/skills.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "summary.json").read_text())["experts"] == summary["experts"]
    report = format_report(summary)
    assert "| continual |" in report and "| sequential |" in report and "multitask" in report
    assert f"detection precision {summary['detection']['precision']:.3f}" in report


def test_decision_log_covers_every_example(run):
    summary, out = run
    records = [json.loads(line) for line in (out / "decisions.jsonl").read_text().splitlines()]
    arrivals = [r for r in records if r["decision"] in ("known", "novel", "new_skill")]
    assert [r["index"] for r in arrivals] == list(range(summary["stream_length"]))
    for r in records:
        assert {"index", "best_similarity", "matched_skill", "decision", "true_task"} <= set(r)
    created = [r["index"] for r in records if r["decision"] == "new_skill"]
    assert created == summary["expert_created_at"]
    assert records[0]["best_similarity"] is None and records[0]["decision"] == "novel"  # empty library


def test_novelty_detection_and_skill_purity(run):
    summary, _ = run
    assert summary["experts"] == 3
    det = summary["detection"]
    assert det["precision"] == 1.0 and det["recall"] == 1.0 and det["spurious"] == []
    # each skill got the examples of exactly one task, and each task one skill
    owners = [list(v) for v in summary["skill_tasks"].values()]
    assert all(len(o) == 1 for o in owners) and sorted(o[0] for o in owners) == summary["tasks"]
    assert summary["similarity"]["own_above_threshold"] == 1.0


def test_accuracy_matrix_and_metrics(run):
    summary, out = run
    data = json.loads((out / "accuracy_matrix.json").read_text())
    R, base = data["continual"]["R"], data["base"]
    assert len(R) == 3 and all(len(row) == 3 for row in R)
    assert all(0.0 <= v <= 1.0 for row in R for v in row)
    expected = summarize(R, base)
    for key in ("acc", "bwt", "fwt", "forgetting"):
        assert data["continual"][key] == pytest.approx(expected[key])
        assert summary["continual"][key] == pytest.approx(expected[key])
    seq = data["sequential"]
    assert seq["acc"] == pytest.approx(summarize(seq["R"], base)["acc"])
    assert len(data["multitask"]["scores"]) == 3
    progress = json.loads((out / "progress.json").read_text())  # rewritten after every evaluation
    assert progress["complete"] is True and progress["base"] == base and progress["continual"] == R
    assert progress["sequential"] == seq["R"] and progress["multitask"] == data["multitask"]["scores"]


def test_maturity_switch_happened_in_every_task(run):
    summary, out = run
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("new_expert") == 3 and kinds.count("mature") == 3
    # dense while each new expert matures, sparse at the end of its task
    modes = [e["mode"] for e in events if e["event"] in ("new_expert", "mature")]
    assert modes == ["dense", "sparse"] * 3
    stages = json.loads((out / "accuracy_matrix.json").read_text())["continual"]["stages"]
    assert [s["mode"] for s in stages] == ["sparse"] * 3 and [s["experts"] for s in stages] == [1, 2, 3]


def test_frozen_experts_with_sparse_routing_do_not_forget_unlike_sequential_lora(run):
    summary, _ = run
    cont, seq = summary["continual"], summary["sequential"]
    # old experts are frozen and their test prompts route (top-1) to them: scores cannot move
    assert cont["forgetting"] == 0.0 and cont["bwt"] == 0.0
    assert seq["forgetting"] > 0.0  # one shared LoRA is overwritten by later tasks
    assert cont["acc"] > seq["acc"]


REAL_TASK_FILES = ["sst2/sst2_train.tsv", "sst2/sst2_test.tsv"] + [
    f"llm_adapters_commonsense/{task}/{split}.json" for task in ("boolq", "ARC-Easy", "openbookqa")
    for split in ("train", "test")
]
_missing_task_files = [f for f in REAL_TASK_FILES
                       if not (Path(os.environ.get("LORAMIX_DATA_DIR") or "/nonexistent") / f).is_file()]


@pytest.mark.skipif(bool(_missing_task_files), reason=f"needs in $LORAMIX_DATA_DIR: {', '.join(_missing_task_files)}")
def test_real_task_loaders():
    from helpers.tiny_lm import byte_tokenizer

    tasks = load_tasks("sst2,boolq,ARC-Easy,openbookqa", train_per_task=6, test_per_task=4, seed=0)
    assert [t.name for t in tasks] == ["sst2", "boolq", "ARC-Easy", "openbookqa"]
    expected_choices = {"sst2": 2, "boolq": 2, "ARC-Easy": None, "openbookqa": 4}
    for t in tasks:
        assert len(t.train) == 6 and len(t.test) == 4
        for ex in t.train + t.test:
            assert 0 <= ex.gold < len(ex.choices) and ex.task == t.name
            if expected_choices[t.name]:
                assert len(ex.choices) == expected_choices[t.name]
    assert tasks[0].train[0].choices == ["negative", "positive"]
    stream = build_stream(byte_tokenizer(), tasks, max_length=512)
    assert stream.boundaries == [0, 6, 12, 18] and len(stream.examples) == 24
    tok = byte_tokenizer()
    for ex in stream.examples:
        target = tok.decode(ex.target_ids)
        assert target.startswith(" ") and tok.decode(ex.context_ids).endswith("the correct answer is")
    again = load_tasks(["sst2"], train_per_task=6, test_per_task=4, seed=0)[0]
    assert [e.prompt for e in again.train] == [e.prompt for e in tasks[0].train]  # seeded subsets
    with pytest.raises(FileNotFoundError, match="unknown task"):
        load_tasks("no_such_task")


def test_task_with_only_a_test_file_is_split_into_disjoint_train_and_test(tmp_path):
    """piqa / winogrande / social_i_qa ship only test.json: train and test must be disjoint subsets."""
    d = tmp_path / "llm_adapters_commonsense" / "fakeqa"
    d.mkdir(parents=True)
    records = [{"instruction": f"Question {i}?\n\nOption1: a Option2: b Answer format: option1/option2",
                "input": "", "output": "", "answer": f"option{1 + i % 2}"} for i in range(30)]
    (d / "test.json").write_text(json.dumps(records))
    task = load_tasks("fakeqa", tmp_path, train_per_task=20, test_per_task=8, seed=1)[0]
    assert task.split_from_test and len(task.test) == 8 and len(task.train) == 20
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.test}
    assert task.train[0].choices == ["option1", "option2"]
    # asking for too much: the test half is capped at half the file, train takes at most the rest
    big = load_tasks("fakeqa", tmp_path, train_per_task=100, test_per_task=100, seed=1)[0]
    assert len(big.test) == 15 and len(big.train) == 15
    assert not {e.prompt for e in big.train} & {e.prompt for e in big.test}
    again = load_tasks("fakeqa", tmp_path, train_per_task=20, test_per_task=8, seed=1)[0]
    assert [e.prompt for e in again.test] == [e.prompt for e in task.test]  # seeded
    with pytest.raises(FileNotFoundError, match="unknown task"):
        load_tasks("no_such_task", tmp_path)


def test_a_stopped_run_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    import loramix.continual.run as run_module

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # a run stopped after the continual phase, before the baselines

    monkeypatch.setattr(run_module, "run_baselines", stopped)
    model, tok = byte_lm("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    with pytest.raises(KeyboardInterrupt):
        run_module.run_continual(model=str(tmp_path / "model"), output_dir=str(tmp_path / "out"), **SETTINGS)
    progress = json.loads((tmp_path / "out" / "progress.json").read_text())
    assert progress["complete"] is False and len(progress["base"]) == 3
    assert len(progress["continual"]) == 3 and all(len(row) == 3 for row in progress["continual"])
    assert progress["sequential"] == [] and progress["multitask"] is None
    assert not (tmp_path / "out" / "summary.json").exists()


def test_the_learner_defaults_to_the_training_options_of_loramix_continual():
    import dataclasses
    import inspect

    from loramix.continual.config import ContinualConfig
    from loramix.continual.learner import ContinualLearner

    cfg = {f.name: f.default for f in dataclasses.fields(ContinualConfig)}
    params = inspect.signature(ContinualLearner.__init__).parameters
    shared = ["guard", "l2_coef", "learning_rate", "weight_decay", "max_grad_norm", "batch_size",
              "steps_per_batch", "val_size", "val_every", "eval_every", "quarantine"]
    assert {n: params[n].default for n in shared} == {n: cfg[n] for n in shared}
