"""vLLM on a loramix ``format='vllm'`` export: greedy tokens and per-position log-probs of given prompts.

Run with the Python of a virtualenv that has vLLM; the plugin is found through the ``vllm.general_plugins``
entry point (installed loramix, or the test's temporary dist-info on PYTHONPATH)::

    python vllm_mixlora.py <model dir> '<json list of token-id lists>' <max new tokens> <dtype>

Prints one JSON line: for each prompt, the generated token ids and, for every prompt position after the
first, the log-prob vLLM gives the prompt's own next token (``prompt_logprobs``).
"""

from __future__ import annotations

import json
import os
import sys


def run(model_dir: str, prompts: list[list[int]], max_tokens: int, dtype: str) -> list[dict]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype=dtype, skip_tokenizer_init=True, enforce_eager=True, max_model_len=256,
              seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, detokenize=False, ignore_eos=True,
                            prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    result = []
    for p, o in zip(prompts, outputs, strict=True):
        lps = [None if d is None else d[t].logprob for t, d in zip(p, o.prompt_logprobs, strict=True)]
        result.append({"tokens": list(o.outputs[0].token_ids), "prompt_logprobs": lps[1:]})
    return result


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out = run(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    print("VLLM_RESULT " + json.dumps(out))
