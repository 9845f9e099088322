#!/usr/bin/env bash
# GPU check for a CUDA machine (under 8 minutes on one GPU). Runs, in the repository root:
#   1. the precision matrix (fp32/bf16/fp16 weights x none/bf16/fp16 autocast, every router and expert type) and
#      the trainer tests (HF Trainer bf16 and fp16, Accelerate bf16, fp16 + GradScaler) on CUDA;
#   2. the 4-bit tests if bitsandbytes is importable;
#   3. the training bench (step time and peak memory as ratios to PEFT LoRA, measured in the same run) on a
#      randomly initialised model of Llama-3.2-1B's shape, and a 4-bit smoke run on CUDA
#      (python -m bench.gpu_check).
# Needs torch, transformers, peft, safetensors and accelerate, plus pytest. Without internet, fetch pytest here
#   pip download --no-deps -d bench/.wheels pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 pygments==2.21.0
# and copy bench/.wheels along; the script installs them when pytest is missing. trl, datasets and bitsandbytes
# are optional: their tests are skipped, with the reason, when they are absent.
# Results go to $OUT (default runs/gpu_check): tests.log, quantize.log, bench.log, gpu_bench.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
python -c "import pytest" 2>/dev/null || pip install -q --no-index --no-deps bench/.wheels/*.whl
export PYTHONPATH="$PWD/src:$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" LORAMIX_TEST_DEVICE=cuda LORAMIX_TEST_THREADS=4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
timeout 200 python -m pytest -q -p no:cacheprovider -o addopts="" tests/test_precision.py tests/test_trainers.py \
  2>&1 | tail -25 | tee "$OUT/tests.log" || status=1
grep -q " failed\|error" "$OUT/tests.log" && status=1
if python -c "import bitsandbytes" 2>/dev/null; then
  timeout 100 python -m pytest -q -p no:cacheprovider -o addopts="" tests/test_quantize.py 2>&1 | tail -15 \
    | tee "$OUT/quantize.log" || status=1
else
  echo "bitsandbytes not importable: 4-bit tests skipped" | tee "$OUT/quantize.log"
fi
timeout 240 python -m bench.gpu_check --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/bench.log" || status=1
echo "gpu_check status $status"
exit $status
