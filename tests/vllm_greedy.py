"""Greedy tokens from vLLM for given prompt token ids; run with the Python of a venv that has vLLM.

    python vllm_greedy.py <model dir> '<json list of token-id lists>' <max new tokens>

Prints one JSON line: the generated token ids of each prompt. vLLM starts worker processes, so this
module does its work only under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import json
import os
import sys


def greedy(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", skip_tokenizer_init=True, enforce_eager=True, max_model_len=128,
              seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return [list(o.outputs[0].token_ids) for o in outputs]


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tokens = greedy(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
    print("VLLM_TOKENS " + json.dumps(tokens))
