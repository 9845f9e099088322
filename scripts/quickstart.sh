#!/usr/bin/env bash
# The main job: a short MixLoRA training of the default model on counsel-chat, then generation from it.
# Needs LORAMIX_DATA_DIR (a directory with counsel_chat/counsel_chat_context_response.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LORAMIX_DATA_DIR:?set LORAMIX_DATA_DIR to the data directory (e.g. ../shared/data)}"
loramix train --config configs/counsel_chat_quick.yaml --output-dir runs/quickstart
loramix generate --adapter runs/quickstart/adapter --temperature 0 --max-new-tokens 80 \
  --prompt "I have been feeling anxious before every exam. What can I do?"
