"""Benchmarks of loramix against PEFT LoRA and the official ``mixlora`` package; not part of the installed
library, which never imports this folder. Run from the repository root:

    python -m bench.run_bench --help     # the training/decoding benchmark (also ``loramix bench``)
    bash bench/gpu_check.sh              # the CUDA check: precision and trainer tests, then the bench
"""
