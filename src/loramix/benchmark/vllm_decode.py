"""Decode speed of HF checkpoints in vLLM's offline ``LLM``; run by ``loramix.benchmark.harness`` with a vLLM
interpreter (which needs no loramix):

    python vllm_decode.py '{"models": {name: dir}, "prompt": [ids], "decode_tokens": N, "steps": S,
                                  "warmup": W, "max_model_len": L, "eager": true,
                                  "model_impl": {name: "vllm" | "transformers"}}'

Every model is loaded (float32, no tokenizer; ``"eager": false`` runs vLLM's default compiled mode, which compiles
each model once while it loads; ``model_impl`` picks vLLM's own model class or its Transformers backend per
model, default vLLM's choice) and warmed up, then ``steps`` rounds time one greedy
``generate`` of exactly ``decode_tokens`` new tokens per model, the models interleaved with the order rotated
each round. Prints one line: ``LORAMIX_VLLM_DECODE {name: {"decode_s_all": [...], "decode_new_tokens": n}}``.
vLLM starts worker processes, so the work happens only under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import json
import sys
import time

MARK = "LORAMIX_VLLM_DECODE "


def run(job: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    impl = job.get("model_impl", {})
    llms = {name: LLM(model=path, dtype="float32", skip_tokenizer_init=True, enforce_eager=job.get("eager", True),
                      max_model_len=job["max_model_len"], seed=0, model_impl=impl.get(name, "auto"))
            for name, path in job["models"].items()}
    params = SamplingParams(temperature=0.0, max_tokens=job["decode_tokens"], min_tokens=job["decode_tokens"],
                            ignore_eos=True, detokenize=False)
    prompt = [{"prompt_token_ids": job["prompt"]}]
    out = {name: {"decode_s_all": [], "decode_new_tokens": 0, "vllm_version": vllm.__version__} for name in llms}
    for llm in llms.values():
        for _ in range(job["warmup"]):
            llm.generate(prompt, params, use_tqdm=False)
    names = list(llms)
    for i in range(job["steps"]):
        for name in names[i % len(names):] + names[: i % len(names)]:
            start = time.perf_counter()
            res = llms[name].generate(prompt, params, use_tqdm=False)
            out[name]["decode_s_all"].append(time.perf_counter() - start)
            out[name]["decode_new_tokens"] = len(res[0].outputs[0].token_ids)
    return out


if __name__ == "__main__":
    print(MARK + json.dumps(run(json.loads(sys.argv[1]))), flush=True)
