#!/usr/bin/env bash
# GPU check for a CUDA machine (under 8 minutes on one GPU: each part has its own time limit, 470 s in all). Runs, in the repository root:
#   1. the precision matrix (fp32/bf16/fp16 weights x none/bf16/fp16 autocast, every router and expert type), the
#      trainer tests (HF Trainer bf16 and fp16, Accelerate bf16, fp16 + GradScaler) and the host-sync tests on CUDA;
#   2. the 4-bit tests if bitsandbytes is importable;
#   3. python -m bench.gpu_check on a randomly initialised model of Llama-3.2-1B's shape: host syncs of a training
#      and a decoding step against the base model's (must be equal: loramix adds none), the training bench (step
#      and peak memory as ratios to PEFT LoRA, bf16), the bf16 step eager and compiled against PEFT
#      LoRA, and a 4-bit smoke run;
#   4. python -m bench.gpu_quality: LoRA against MixLoRA at matched trainable parameters on the packaged
#      SmolLM2-135M, 80 s of bf16 training each on the four commonsense training sets (--seconds 150 when run
#      on its own), the four test sets scored in full with 95 % intervals -> $OUT/quality.json. Needs bench/.carry/ (bash bench/gpu_carry.sh
#      DATA_DIR makes it: the GGUF in two halves that travel in two calls, and the data); skipped without it.
# Needs torch, transformers, peft, safetensors and accelerate, plus pytest. Without internet, fetch pytest here
#   pip download --no-deps -d bench/.wheels pytest==9.2.0 iniconfig==2.3.1 pluggy==1.7.0 pygments==2.21.0
# and copy bench/.wheels along; the script installs them when pytest is missing. trl, datasets and bitsandbytes
# are optional: their tests are skipped, with the reason, when they are absent (the quality run needs datasets).
# DRY_RUN=1 runs every part on this CPU with tiny settings (a few tests, a small model, seconds of training), to
# check the script before a GPU minute is spent on it: tests/test_gpu_check.py runs it (slow suite).
# Results go to $OUT (default runs/gpu_check): tests.log, quantize.log, bench.log, gpu_bench.json, quality.log,
# quality.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
DRY_RUN=${DRY_RUN:-0}
CARRY=${CARRY:-bench/.carry}  # the GGUF halves and data/ made by bench/gpu_carry.sh
mkdir -p "$OUT"
python -c "import pytest" 2>/dev/null || pip install -q --no-index --no-deps bench/.wheels/*.whl
export PYTHONPATH="$PWD/src:$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" LORAMIX_TEST_THREADS=4
if [ "$DRY_RUN" = 1 ]; then
  export LORAMIX_TEST_DEVICE=cpu
  SELECT=(-k "topk and bf16 or test_balance_bias_update_has_no_host_sync")
  QSELECT=(-k "test_gradients_through_4bit_layers")  # a selection that matches nothing would exit 5
  FLAGS=(--dry-run)
  SLOW=10  # time limits x10: a shared CPU, and compiling on it takes minutes
  echo "dry run on the CPU" | tee "$OUT/gpu.txt"
else
  export LORAMIX_TEST_DEVICE=cuda
  SELECT=()
  QSELECT=()
  FLAGS=()
  SLOW=1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi
status=0
timeout $((60 * SLOW)) python -m pytest -q -p no:cacheprovider -o addopts="" "${SELECT[@]}" tests/test_precision.py \
  tests/test_trainers.py tests/test_launches.py 2>&1 | tail -25 | tee "$OUT/tests.log" || status=1
grep -q " failed\|error" "$OUT/tests.log" && status=1
if python -c "import bitsandbytes" 2>/dev/null; then
  timeout $((20 * SLOW)) python -m pytest -q -p no:cacheprovider -o addopts="" "${QSELECT[@]}" tests/test_quantize.py 2>&1 \
    | tail -15 | tee "$OUT/quantize.log" || status=1
else
  echo "bitsandbytes not importable: 4-bit tests skipped" | tee "$OUT/quantize.log"
fi
timeout $((150 * SLOW)) python -m bench.gpu_check --out "$OUT" "${FLAGS[@]}" 2>&1 | grep -v Warning | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
if [ -d "$CARRY/data" ]; then
  timeout $((240 * SLOW)) python -m bench.gpu_quality --carry "$CARRY" --out "$OUT" "${FLAGS[@]}" 2>&1 \
    | grep -v Warning | tail -20 | tee "$OUT/quality.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
else
  echo "no $CARRY/data (bash bench/gpu_carry.sh DATA_DIR): quality run skipped" | tee "$OUT/quality.log"
fi
echo "gpu_check status $status"
exit $status
