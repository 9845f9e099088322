#!/usr/bin/env bash
# Prepares bench/.carry/ (git-ignored) for bench/gpu_check.sh on a GPU machine that has no internet and takes at
# most 64 MiB of files per call:
#   bench/.carry/smollm2.gguf.part-00, -01   the packaged SmolLM2-135M GGUF (98 MB) in two 49 MB halves
#   bench/.carry/data/llm_adapters_commonsense/{boolq,ARC-Easy,ARC-Challenge,openbookqa}/  (about 9 MB)
# Usage: bash bench/gpu_carry.sh DATA_DIR   (DATA_DIR holds llm_adapters_commonsense/; LORAMIX_DATA_DIR by default)
# The halves travel in two calls to the same warm machine: the first carries part-00 (its command can be `true`),
# the second carries part-01, data/ and runs the check; an ignored file carried by an earlier call stays there, and
# bench/gpu_quality.py joins the parts.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-${LORAMIX_DATA_DIR:?pass the data directory}}
mkdir -p bench/.carry/data/llm_adapters_commonsense
GGUF=$(python -c "from loramix.models import default_model_path; print(default_model_path())")
split -n 2 -d -a 2 "$GGUF" bench/.carry/smollm2.gguf.part-
for t in boolq ARC-Easy ARC-Challenge openbookqa; do
  cp -r "$DATA/llm_adapters_commonsense/$t" bench/.carry/data/llm_adapters_commonsense/
done
du -sh bench/.carry/*
