"""Per-item agreement between loramix's multiple-choice scorer and lm-evaluation-harness.

Reads ``<task>.loramix.json`` (export_mc.py) and lm-eval's ``samples_loramix_<task>_*.jsonl``
(``--log_samples``) and prints a markdown table: items where both pick the same answer (raw and
length-normalised), each scorer's accuracy, and the largest log-likelihood difference. Needs only the
standard library, so it runs in either venv.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def lm_eval_samples(results_dir: Path, name: str) -> dict[int, dict]:
    files = sorted(results_dir.rglob(f"samples_{name}_*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no samples_{name}_*.jsonl under {results_dir} (run lm-eval with --log_samples)")
    rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    return {int(r["doc"]["id"]): r for r in rows}


def compare(ours: dict, theirs: dict[int, dict]) -> dict:
    same = same_norm = acc_o = acc_t = accn_o = accn_t = 0
    max_diff = 0.0
    for i, p in enumerate(ours["predictions"]):
        row = theirs[i]
        lls = [float(r[0]) for r in row["filtered_resps"]]
        choices = row["doc"]["choices"]
        pred_t = max(range(len(lls)), key=lls.__getitem__)
        norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
        pred_tn = max(range(len(norm)), key=norm.__getitem__)
        gold = int(row["doc"]["gold"])
        assert gold == p["gold"], f"item {i}: gold differs"
        same += pred_t == p["pred"]
        same_norm += pred_tn == p["pred_norm"]
        acc_o += p["pred"] == gold
        acc_t += pred_t == gold
        accn_o += p["pred_norm"] == gold
        accn_t += pred_tn == gold
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(lls, p["loglikelihoods"], strict=True)))
    n = len(ours["predictions"])
    return {
        "n": n,
        "agree": same / n,
        "agree_norm": same_norm / n,
        "acc_loramix": acc_o / n,
        "acc_lm_eval": acc_t / n,
        "acc_norm_loramix": accn_o / n,
        "acc_norm_lm_eval": accn_t / n,
        "max_abs_loglik_diff": max_diff,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export-dir", type=Path, required=True)
    p.add_argument("--lm-eval-dir", type=Path, required=True)
    p.add_argument("--tasks", nargs="+", default=["ARC-Easy", "boolq"])
    args = p.parse_args()
    print(
        "| task | n | same pick (acc) | same pick (acc_norm) | acc loramix | acc lm-eval | "
        "acc_norm loramix | acc_norm lm-eval | max abs loglik diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for task in args.tasks:
        ours = json.loads((args.export_dir / f"{task}.loramix.json").read_text())
        c = compare(ours, lm_eval_samples(args.lm_eval_dir, ours["lm_eval_task"]))
        print(
            f"| {task} | {c['n']} | {100 * c['agree']:.1f}% | {100 * c['agree_norm']:.1f}% | "
            f"{100 * c['acc_loramix']:.1f}% | {100 * c['acc_lm_eval']:.1f}% | "
            f"{100 * c['acc_norm_loramix']:.1f}% | {100 * c['acc_norm_lm_eval']:.1f}% | "
            f"{c['max_abs_loglik_diff']:.2e} |"
        )


if __name__ == "__main__":
    main()
