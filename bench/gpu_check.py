"""GPU check, part 2: the training bench on a randomly initialised model of Llama-3.2-1B's shape (no weights to
copy), in float32 and bfloat16 weights, and a 4-bit training smoke run when bitsandbytes is importable.

Run by ``bench/gpu_check.sh`` (``python -m bench.gpu_check`` from the repository root); prints the bench tables
and writes ``<out>/gpu_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import loramix
from loramix.benchmark.harness import format_table, run_benchmark

# Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B), minus the weights
LLAMA_32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    tie_word_embeddings=True, hidden_act="silu", bos_token_id=128000, eos_token_id=128001,
)


def random_llama(dtype: torch.dtype, device: str, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_32_1B, **overrides}))
    return model.to(dtype).eval()


def bench(dtype: torch.dtype, device: str, steps: int) -> dict:
    result = run_benchmark(random_llama(dtype, device), device=device, routers=["topk"], include_official=False,
                           compile_decode=False, steps=steps, warmup=3, batch_size=4, seq_len=128)
    print(format_table(result), flush=True)
    return result


def quantized_smoke(device: str) -> dict:
    """Load a small random Llama 4-bit on ``device``, inject, 5 AdamW steps: the loss must fall."""
    from transformers import AutoModelForCausalLM

    from loramix.models import bitsandbytes_config

    with tempfile.TemporaryDirectory() as d:
        small = random_llama(torch.float32, "cpu", hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, vocab_size=1024)
        small.save_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(
            d, quantization_config=bitsandbytes_config("4bit", torch.bfloat16), device_map=device, dtype=torch.bfloat16
        )
    model = loramix.inject(model, loramix.MixLoraConfig(num_experts=4, top_k=2, r=8, attn_r=8)).train()
    kinds = sorted({type(m.proj("up")).__name__ for m in loramix.injection.get_state(model).moe_layers.values()})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 1024, (4, 64), device=device)
    losses = []
    for _ in range(5):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    ok = all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]
    print(f"4-bit smoke on {device}: FFN projections {kinds}, losses {[round(x, 4) for x in losses]}, ok={ok}")
    return {"ffn_projection_types": kinds, "losses": losses, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_bench.json")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        result = bench(dtype, device, args.steps)
        report[f"bench_{name}"] = {"ratios": result["ratios"], "variants": result["variants"],
                                   "memory_metric": result["memory_metric"]}
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        report["quantized"] = f"skipped: bitsandbytes not importable ({e})"
    else:
        report["quantized"] = quantized_smoke(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=2, default=str))
    quantized_ok = not isinstance(report["quantized"], dict) or report["quantized"]["ok"]
    return 0 if quantized_ok else 1


if __name__ == "__main__":
    sys.exit(main())
