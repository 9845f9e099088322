"""lm-evaluation-harness on a loramix adapter: a local harness task gives loramix eval's scores, item for item."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.tiny_lm import save_tiny_lm
from helpers.tiny_models import perturb_adapters
from loramix import MixLoraConfig, inject, save_adapter
from loramix.evaluation import build_mc_items, load_records, task_path
from loramix.generation import load_for_inference
from loramix.models import load_base_model

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'loramix[lmeval]')")

from loramix.cli.commands import eval_command  # noqa: E402
from loramix.harness import harness_scores, lm_eval_model, run_harness  # noqa: E402

QUESTIONS = ["is the sky blue", "do cats bark", "is water wet", "can fish fly", "is ice cold", "do birds swim",
             "is fire hot", "is snow green", "do trees walk", "is salt salty"]


def task_yaml(name: str, data_file: Path, cache: Path) -> str:
    """An lm-eval multiple-choice task over a JSONL of {context, choices, gold}: both scorers see the same text."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model, a MixLoRA adapter with non-zero experts, LLM-Adapters-style BoolQ and ARC items, and the
    same items as a local harness task (the scoring context loramix builds, one JSONL line per item)."""
    root = tmp_path_factory.mktemp("harness")
    model_dir = save_tiny_lm(root / "model", max_position_embeddings=512)
    base, _ = load_base_model(model_dir, device="cpu")
    adapted = inject(base, MixLoraConfig(num_experts=4, top_k=2, r=4, attn_r=4))
    perturb_adapters(adapted)
    save_adapter(adapted, root / "adapter")
    data = root / "data" / "llm_adapters_commonsense"
    (data / "boolq").mkdir(parents=True)
    (data / "boolq" / "test.json").write_text(json.dumps([
        {"instruction": f"Please answer: {q}?\n\nAnswer format: true/false", "input": "",
         "output": f"the correct answer is {a}", "answer": a}
        for q, a in zip(QUESTIONS, ["true", "false"] * 5, strict=True)]))
    (data / "ARC-Easy").mkdir(parents=True)
    (data / "ARC-Easy" / "test.json").write_text(json.dumps([
        {"instruction": f"Question: {q}?\n\nAnswer1: yes\nAnswer2: no\nAnswer3: maybe\nAnswer4: never\n\n"
                        "Answer format: answer1/answer2/answer3/answer4", "input": "",
         "output": f"the correct answer is answer{1 + i % 4}", "answer": f"answer{1 + i % 4}"}
        for i, q in enumerate(QUESTIONS)]))
    _, tok = load_for_inference(model_dir, device="cpu")
    tasks = root / "tasks"
    tasks.mkdir()
    for task in ("boolq", "ARC-Easy"):
        items = build_mc_items(tok, load_records(task_path(task, root / "data")))
        rows = tasks / f"{task}.jsonl"
        rows.write_text("".join(json.dumps({"context": it["context"], "choices": it["choices"], "gold": it["gold"]})
                                + "\n" for it in items))
        name = "local_" + task.lower().replace("-", "_")
        (tasks / f"{name}.yaml").write_text(task_yaml(name, rows, root / "hf_cache"))
    return {"root": root, "model": model_dir, "adapter": root / "adapter", "data": root / "data", "tasks": tasks}


def _harness_logliks(result: dict, task: str) -> list[list[float]]:
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def test_a_local_harness_task_on_an_adapter_equals_loramix_eval_item_for_item(env, tmp_path):
    ours = eval_command(["boolq", "ARC-Easy"], model=env["model"], adapter=str(env["adapter"]),
                        data_dir=str(env["data"]), device="cpu", json_path=str(tmp_path / "ours.json"))
    from loramix.evaluation import evaluate

    model, tok = load_for_inference(env["model"], env["adapter"], device="cpu")
    per_item = evaluate(model, tok, ["boolq", "ARC-Easy"], data_dir=env["data"], keep_predictions=True,
                        progress=False)["tasks"]
    lm = lm_eval_model(env["adapter"], model=env["model"], device="cpu", batch_size=3)
    theirs = run_harness(lm, ["local_boolq", "local_arc_easy"], include_path=env["tasks"], log_samples=True)
    scores = harness_scores(theirs)
    for task, local in (("boolq", "local_boolq"), ("ARC-Easy", "local_arc_easy")):
        ll_ours = [p["loglikelihoods"] for p in per_item[task]["predictions"]]
        ll_theirs = _harness_logliks(theirs, local)
        assert len(ll_theirs) == len(ll_ours) == len(QUESTIONS)
        for a, b in zip(ll_ours, ll_theirs, strict=True):
            assert b == pytest.approx(a, abs=1e-4)
        assert scores[local]["acc"] == pytest.approx(ours["tasks"][task]["acc"])
        assert scores[local]["acc_norm"] == pytest.approx(ours["tasks"][task]["acc_norm"])
    # the harness really scored the adapter: the base alone gives other log-likelihoods
    bare = run_harness(lm_eval_model(model=env["model"], device="cpu"), ["local_arc_easy"],
                       include_path=env["tasks"], log_samples=True)
    assert max(abs(x - y) for a, b in zip(_harness_logliks(bare, "local_arc_easy"),
                                          _harness_logliks(theirs, "local_arc_easy"), strict=True)
               for x, y in zip(a, b, strict=True)) > 1e-3


def test_eval_command_runs_harness_tasks_beside_loramix_tasks(env, tmp_path):
    out = eval_command(["ARC-Easy"], model=env["model"], adapter=str(env["adapter"]), data_dir=str(env["data"]),
                       device="cpu", limit=6, harness_tasks=["local_arc_easy"], harness_include=str(env["tasks"]),
                       json_path=str(tmp_path / "r.json"))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["harness"]["tasks"]["local_arc_easy"]["acc"] == pytest.approx(out["tasks"]["ARC-Easy"]["acc"])
    assert saved["harness"]["n"]["local_arc_easy"]["effective"] == 6 == out["tasks"]["ARC-Easy"]["n"]
    only = eval_command(model=env["model"], harness_tasks=["local_boolq"], harness_include=str(env["tasks"]),
                        device="cpu", limit=2)
    assert only["tasks"] == {} and set(only["harness"]["tasks"]) == {"local_boolq"}


def test_unknown_harness_task_fails_before_the_model_loads(env, tmp_path):
    with pytest.raises(ValueError, match=r"harness_tasks: \['no_such_task'\]"):
        eval_command(model=str(tmp_path / "missing-model"), harness_tasks=["no_such_task"],
                     harness_include=str(env["tasks"]))
    with pytest.raises(FileNotFoundError, match="harness_include"):
        eval_command(model=str(tmp_path / "missing-model"), harness_tasks=["x"],
                     harness_include=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--tasks"):
        eval_command(model=str(tmp_path / "missing-model"))


def test_cli_flags_reach_the_harness(env, capsys):
    from loramix.cli import main

    rc = main(["eval", "--model", env["model"], "--adapter", str(env["adapter"]), "--device", "cpu", "--limit", "3",
               "--harness-tasks", "[local_boolq]", "--harness-include", str(env["tasks"])])
    assert rc == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| local_boolq |")]
    assert [r.split("|")[2].strip() for r in rows] == ["acc", "acc_norm"] and all("| 3 |" in r for r in rows)
    assert main(["eval", "--model", env["model"], "--harness-tasks", "[nope]",
                 "--harness-include", str(env["tasks"])]) == 2
    assert "--harness-tasks: ['nope']" in capsys.readouterr().err
