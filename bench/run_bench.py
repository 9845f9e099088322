"""Thin command line around ``loramix.benchmark.harness.run_benchmark``: prints the table, optionally writes JSON.

Example, from the repository root (the default SmolLM2-135M-Instruct on CPU, batch 4 x 128)::

    python -m bench.run_bench --batch-size 4 --seq-len 128 --steps 5 --warmup 2 --threads 1 --json bench.json

Add ``--export-decode`` for the decoding speed of the exported checkpoint (``loramix export``) with
transformers and vLLM beside loramix's own, as ratios to the base model of the same run::

    python -m bench.run_bench --routers topk --no-official --steps 5 --warmup 2 --threads 1 --export-decode \
        --vllm-python /path/to/vllm-venv/bin/python --json bench_export.json

``--vllm-mode compiled`` (or ``both``) times vLLM in its default compiled mode instead of (or beside) eager.

Add ``--profile`` to also print a torch.profiler breakdown of one MixLoRA training step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from loramix.allocator import ENV_SWITCH
from loramix.benchmark.harness import format_table, profile_training_step, run_benchmark
from loramix.config import ROUTERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model spec for load_base_model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--routers", nargs="+", default=["topk"], choices=ROUTERS)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of every adapter variant")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument(
        "--sequential",
        action="store_true",
        help="build, time and free one variant at a time (least memory) instead of interleaving them",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a busy shared CPU)")
    p.add_argument("--no-official", action="store_true", help="skip the official mixlora package")
    p.add_argument(
        "--oom-first",
        action="store_true",
        help="Linux: make this process the out-of-memory killer's first choice (shared machines)",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the merged+compiled decoding figure (loramix.compiled.compile_decoding)",
    )
    p.add_argument(
        "--export-decode",
        action="store_true",
        help="also export each MixLoRA variant (loramix export) and time its decoding with transformers and, "
        "when vLLM is found, with vLLM (rows exported_<router>, vllm_base, vllm_exported_<router>, and "
        "vllm_native_<router> for the --format vllm export served with loramix's plugin)",
    )
    p.add_argument(
        "--vllm-python",
        default=None,
        help="python of a virtualenv with vLLM for --export-decode (default: $LORAMIX_VLLM_PYTHON, else this "
        "python when it imports vllm)",
    )
    p.add_argument(
        "--vllm-mode",
        choices=["eager", "compiled", "both"],
        default="eager",
        help="vLLM's mode for the --export-decode vLLM rows: eager (enforce_eager; rows vllm_*), compiled (vLLM's "
        "default, each model compiled as it loads; rows vllm_compiled_*), or both (one vLLM process each)",
    )
    p.add_argument(
        "--no-tune-malloc",
        action="store_true",
        help="leave glibc malloc at its defaults (same as LORAMIX_TUNE_MALLOC=0; see loramix.allocator)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the full result here")
    p.add_argument("--profile", action="store_true", help="also profile one MixLoRA (topk) training step")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.no_tune_malloc:
        os.environ[ENV_SWITCH] = "0"
    if args.oom_first:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    result = run_benchmark(
        args.model,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
        routers=tuple(args.routers),
        include_official=not args.no_official,
        device=args.device,
        dtype=args.dtype,
        decode_tokens=args.decode_tokens,
        num_experts=args.num_experts,
        top_k=args.top_k,
        r=args.r,
        dropout=args.dropout,
        threads=args.threads,
        interleave=not args.sequential,
        compile_decode=not args.no_compile,
        export_decode=args.export_decode,
        vllm_python=args.vllm_python,
        vllm_modes=("eager", "compiled") if args.vllm_mode == "both" else (args.vllm_mode,),
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(format_table(result))
    print(
        f"\nmemory: {result['memory_metric']} (on top of {result['base_weights_mb']:.0f} MiB of shared frozen "
        f"weights); machine: {json.dumps(result['machine'])}"
    )
    for name, t in result["targets"].items():
        print(
            f"{name}: step {t['step_vs_lora']:.2f}x LoRA (target <= {t['step_target']}: "
            f"{'met' if t['step_target_met'] else 'MISSED'}), decode {t['decode_vs_base']:.2f}x base "
            f"(target >= {t['decode_target']}: {'met' if t['decode_target_met'] else 'MISSED'})"
            + (
                f"; merged+compiled decode {t['decode_compiled_vs_base']:.2f}x base "
                f"({'met' if t['decode_compiled_target_met'] else 'MISSED'})"
                if t.get("decode_compiled_vs_base") is not None
                else ""
            )
            + (
                f"; step {t['step_vs_official']:.2f}x official (target <= {t['official_target']}: "
                f"{'met' if t['official_target_met'] else 'MISSED'}; the frozen floor alone is "
                f"{t['floor_vs_official']:.2f}x)"
                if t.get("step_vs_official") is not None
                else ""
            )
            + (
                f"; adds {t['overhead_vs_lora_overhead']:.2f}x what PEFT LoRA adds to the floor"
                if t.get("overhead_vs_lora_overhead") is not None
                else ""
            )
        )
    for name, ratio in result["ratios"].items():
        if (name.startswith(("exported_", "vllm_exported_", "vllm_native_", "vllm_compiled_exported_",
                             "vllm_compiled_native_")) and ratio["decode_vs_base"] is not None):
            engine = ("vLLM compiled, vs vllm_compiled_base" if name.startswith("vllm_compiled_") else
                      "vLLM eager, vs vllm_base" if name.startswith("vllm_") else "transformers, vs base")
            print(f"{name}: decode {ratio['decode_vs_base']:.2f}x base ({engine})")
    for name, reason in result["skipped"].items():
        if name.startswith(("exported_", "native_", "vllm")):
            print(f"{name}: skipped: {reason}")
    for name, e in result.get("exported", {}).items():
        if e.get("exported_bytes"):
            print(f"{name}: {e['architecture']}, {e['exported_bytes'] / 2**20:.1f} MB "
                  f"({e['exported_bytes'] / e['base_bytes']:.2f}x the base's weights)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if args.profile:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        prof = profile_training_step(args.model, batch_size=args.batch_size, seq_len=args.seq_len, device=args.device)
        print("\nper training step (ms, CPU time incl. children):")
        for k, v in sorted(prof["modules"].items()):
            print(f"  {k:24s} {v:9.1f}")
        print(prof["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
