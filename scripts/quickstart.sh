#!/usr/bin/env bash
# The main job: a short MixLoRA training of the packaged SmolLM2-135M-Instruct on the counsel-chat sample
# shipped in data/counsel_chat/, then the base model's and the adapted model's answer to one prompt.
# Needs only this repository after scripts/setup.sh; each run replaces runs/quickstart/.
# PROMPT="..." bash scripts/quickstart.sh asks something else.
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT=${PROMPT:-"I have been feeling anxious before every exam. What can I do?"}
# Greedy decoding with a mild repetition penalty: without one, a 135M model repeats its sentences.
DECODING=(--temperature 0 --repetition-penalty 1.1 --max-new-tokens 160)

loramix train --config configs/counsel_chat_quick.yaml --output-dir runs/quickstart --overwrite

echo
echo "Prompt: $PROMPT"
echo
echo "=== Base model (SmolLM2-135M-Instruct); greedy decoding, repetition penalty 1.1"
loramix generate --prompt "$PROMPT" "${DECODING[@]}"
echo
echo "=== Base model + the MixLoRA adapter (runs/quickstart/adapter); same decoding"
loramix generate --adapter runs/quickstart/adapter --prompt "$PROMPT" "${DECODING[@]}"
