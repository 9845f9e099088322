"""vLLM's own Llama class against its Transformers backend (``model_impl="transformers"``), decoding the default
model (SmolLM2-135M-Instruct, float32) in one vLLM process per mode, the two interleaved round by round, as the
bench's vLLM rows are timed (``loramix.benchmark.vllm_decode``)::

    python -m bench.probes.vllm_backends --vllm-python /path/to/vllm-venv/bin/python [--modes eager compiled]

It answers whether the Transformers backend could serve a MixLoRA model as fast as a subclass of vLLM's own model:
what the backend costs on the frozen base alone bounds what it would cost with loramix's layers in it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from loramix.benchmark.harness import bench_prompt, find_vllm_python, run_vllm_decode, vllm_env
from loramix.models import load_base_model

IMPLS = {"vllm_own": "vllm", "transformers_backend": "transformers"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("::")[0])
    parser.add_argument("--vllm-python", default=None, help="interpreter with vLLM (or LORAMIX_VLLM_PYTHON)")
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    python, why = find_vllm_python(args.vllm_python)
    if python is None:
        raise SystemExit(f"no vLLM interpreter: {why}")
    model, _ = load_base_model(None, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        model.save_pretrained(base_dir)
        env = vllm_env(Path(tmp), args.threads)
        prompt = bench_prompt(model.config.vocab_size, 4, 128, args.prompt_len, 0)
        for mode in args.modes:
            job = {"models": {name: str(base_dir) for name in IMPLS}, "model_impl": IMPLS, "steps": args.steps,
                   "warmup": args.warmup, "decode_tokens": args.decode_tokens, "prompt": prompt,
                   "max_model_len": args.prompt_len + args.decode_tokens + 16, "eager": mode == "eager"}
            result, why = run_vllm_decode(python, job, env)
            if result is None:
                print(f"{mode}: {why}")
                continue
            speed = {name: r["decode_new_tokens"] / statistics.median(r["decode_s_all"]) for name, r in result.items()}
            for name, tok_s in speed.items():
                print(f"{mode:9s} {name:22s} {tok_s:6.1f} tok/s  {tok_s / speed['vllm_own']:.2f}x vLLM's own class")


if __name__ == "__main__":
    main()
