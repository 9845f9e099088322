"""vLLM on loramix ``format='vllm'`` exports: greedy tokens and per-position log-probs of given prompts.

Run with the Python of a virtualenv that has vLLM; the plugin is found through the ``vllm.general_plugins``
entry point (an installed loramix, or the test's temporary dist-info on PYTHONPATH)::

    python vllm_mixlora.py <job.json>

``job.json``: a list of ``{"model": dir, "prompts": [[ids]], "max_tokens": n, "dtype": "float32"}``, run one
after another in this process; ``"eager": false`` runs vLLM's default compiled mode (default: eager). Prints one
JSON line: per job and prompt, the generated token ids and, for every prompt position after the first, the
log-prob vLLM gives the prompt's own next token.
"""

from __future__ import annotations

import gc
import json
import os
import sys


def run(job: dict) -> list[dict]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), skip_tokenizer_init=True,
              enforce_eager=job.get("eager", True), max_model_len=job.get("max_model_len", 256), seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], detokenize=False, ignore_eos=True,
                            prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], params)
    result = []
    for p, o in zip(job["prompts"], outputs, strict=True):
        lps = [None if d is None else d[t].logprob for t, d in zip(p, o.prompt_logprobs, strict=True)]
        result.append({"tokens": list(o.outputs[0].token_ids), "prompt_logprobs": lps[1:]})
    del llm
    gc.collect()
    return result


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    print("VLLM_RESULT " + json.dumps([run(job) for job in jobs]))
