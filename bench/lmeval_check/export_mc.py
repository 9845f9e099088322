"""Export LLM-Adapters multiple-choice items for lm-evaluation-harness and score them with loramix.

Writes, for every task, into ``--out``:

* ``<task>.jsonl``: one item per line, ``{"id", "context", "choices", "gold"}`` -- the exact prompt text
  loramix scores (chat template + "the correct answer is") and the candidate answers;
* ``loramix_<task>.yaml``: an lm-eval ``multiple_choice`` task over that file (``doc_to_text: context``,
  ``doc_to_choice: choices``, ``doc_to_target: gold``, target delimiter " "), so both scorers see the same
  strings;
* ``<task>.loramix.json``: loramix's per-item log-likelihoods and predictions.

Run it in the project venv, then run lm-eval (separate venv) on the YAMLs and compare with
``agreement.py``; see docs/evaluation.md for the exact commands.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from loramix.evaluation import build_mc_items, load_records, score_multiple_choice, task_path
from loramix.generation import load_for_inference


def lm_eval_task_name(task: str) -> str:
    return "loramix_" + re.sub(r"[^a-z0-9]+", "_", task.lower()).strip("_")


def task_yaml(name: str, data_file: Path) -> str:
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file.resolve()}
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
metadata:
  version: 1.0
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model spec (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", default=None, help="data root (default: $LORAMIX_DATA_DIR)")
    p.add_argument("--tasks", nargs="+", default=["ARC-Easy", "boolq"])
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, tok = load_for_inference(args.model, device="cpu", dtype="float32")
    print(f"model directory (pass it to lm-eval as pretrained=...): {model.config._name_or_path}")
    for task in args.tasks:
        records = load_records(task_path(task, args.data_dir), args.limit)
        items = build_mc_items(tok, records)
        data_file = args.out / f"{task}.jsonl"
        with data_file.open("w") as f:
            for i, it in enumerate(items):
                f.write(
                    json.dumps({"id": i, "context": it["context"], "choices": it["choices"], "gold": it["gold"]}) + "\n"
                )
        name = lm_eval_task_name(task)
        (args.out / f"{name}.yaml").write_text(task_yaml(name, data_file))
        start = time.perf_counter()
        res = score_multiple_choice(model, tok, items, batch_size=args.batch_size)
        res["seconds"] = round(time.perf_counter() - start, 1)
        res["task"], res["lm_eval_task"] = task, name
        (args.out / f"{task}.loramix.json").write_text(json.dumps(res))
        print(f"{task}: n={res['n']} acc={res['acc']:.4f} acc_norm={res['acc_norm']:.4f} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
