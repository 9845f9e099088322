"""bench/gpu_check.sh and its parts run on this CPU with DRY_RUN=1 (tiny settings), so that the first minute on a
GPU machine is not spent finding a typo. Slow: the check compiles, loads the packaged model and trains it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_quality import TRAIN_SETS, carried_model, wilson_interval

ROOT = Path(__file__).resolve().parents[1]


def _commonsense_fixture(root: Path) -> None:
    """Four tasks in the LLM-Adapters commonsense format: 16 training and 8 test items each."""
    for task in TRAIN_SETS:
        folder = root / "llm_adapters_commonsense" / task
        folder.mkdir(parents=True)
        for split, n in (("train", 16), ("test", 8)):
            rows = []
            for i in range(n):
                if task == "boolq":
                    answer, fmt = ("true" if i % 2 else "false"), "true/false"
                    question = f"Please answer the following question with true or false, question: is {i} odd?"
                else:
                    answer, fmt = f"answer{i % 4 + 1}", "answer1/answer2/answer3/answer4"
                    question = f"Please choose the correct answer to the question: which is {i % 4 + 1}? " + " ".join(
                        f"Answer{k}: {k}." for k in range(1, 5))
                rows.append({"instruction": f"{question}\n\nAnswer format: {fmt}", "input": "",
                             "output": f"the correct answer is {answer}", "answer": answer})
            (folder / f"{split}.json").write_text(json.dumps(rows))


def test_wilson_interval() -> None:
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(10, 10)[1] == 1.0


def test_carried_halves_join_into_the_packaged_gguf(tmp_path) -> None:
    from loramix.models import default_model_path

    gguf = default_model_path()
    data = gguf.read_bytes()
    (tmp_path / "smollm2.gguf.part-00").write_bytes(data[: len(data) // 2])
    (tmp_path / "smollm2.gguf.part-01").write_bytes(data[len(data) // 2 :])
    joined = Path(carried_model(tmp_path))
    assert hashlib.sha256(joined.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert carried_model(tmp_path / "empty") is None


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path) -> None:
    """Every part of the script (tests, bench with syncs and compiled steps, quality run from carried GGUF halves)
    on the CPU; it writes gpu_bench.json and quality.json with the fields the GPU run reports."""
    carry = tmp_path / "carry"
    _commonsense_fixture(carry / "data")
    from loramix.models import default_model_path

    data = default_model_path().read_bytes()
    (carry / "smollm2.gguf.part-00").write_bytes(data[: len(data) // 2])
    (carry / "smollm2.gguf.part-01").write_bytes(data[len(data) // 2 :])
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "CARRY": str(carry), "PATH": f"{Path(sys.executable).parent}"
           f":{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=3000)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "gpu_check status 0" in proc.stdout
    bench = json.loads((out / "gpu_bench.json").read_text())
    assert bench["dry_run"] and bench["syncs"]["ok"]
    assert {"ratio_eager", "ratio_compiled", "mixlora_compiled", "peft_lora_compiled"} <= set(bench["compiled"])
    quality = json.loads((out / "quality.json").read_text())
    assert set(quality["methods"]) == {"base", "lora", "mixlora"}
    assert quality["model"].endswith("smollm2.gguf")  # the carried halves, joined
    for name in ("lora", "mixlora"):
        method = quality["methods"][name]
        assert method["steps"] >= 1 and set(method["tasks"]) == set(TRAIN_SETS)
        for task in method["tasks"].values():
            assert task["n"] == 8 and task["ci95"][0] <= task["acc"] <= task["ci95"][1]
    assert quality["param_matching"]["lora_params"] > 0
