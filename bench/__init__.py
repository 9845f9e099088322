"""Benchmark scripts of loramix against PEFT LoRA and the official ``mixlora`` package. The harness itself ships
in the package (``loramix.benchmark.harness``); ``bench.harness`` names the same module. Run from the repository
root:

    python -m bench.run_bench --help     # the training/decoding benchmark (also ``loramix bench``)
    bash bench/gpu_check.sh              # the CUDA check: precision and trainer tests, then the bench
    python -m bench.cli_help             # seconds of `loramix --help` and of each `loramix <command> --help`
"""

import sys

from loramix.benchmark import harness

sys.modules[__name__ + ".harness"] = harness  # `from bench.harness import ...` is loramix.benchmark.harness
