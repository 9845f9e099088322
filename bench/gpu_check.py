"""GPU check, part 2, on a randomly initialised model of Llama-3.2-1B's shape (no weights to copy):

1. host syncs: the aten ops of a bf16 training step and of a decoding step that make the host wait, MixLoRA's
   against the frozen base model's own (loramix must add none);
2. the training bench (step time, peak memory and decoding as ratios to PEFT LoRA and the base, measured in the
   same run) in bfloat16 weights, eager;
3. the same step, bf16, eager and under ``torch.compile``, MixLoRA against PEFT LoRA (4 of the 16 layers, to keep
   compile time inside the check's budget);
4. a 4-bit training smoke run when bitsandbytes is importable.

Run by ``bench/gpu_check.sh`` (``python -m bench.gpu_check`` from the repository root); prints the tables and
writes ``<out>/gpu_bench.json``. ``--dry-run`` runs every part on the CPU with a small model of the same family
and one or two steps: it checks the script, its figures mean nothing.
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


SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)  # --dry-run


def bench(dtype: torch.dtype, device: str, steps: int, shape: dict) -> dict:
    result = run_benchmark(random_llama(dtype, device, **shape), device=device, routers=["topk"],
                           include_official=False, compile_decode=False, steps=steps, warmup=1 if shape else 3,
                           batch_size=4, seq_len=128)
    print(format_table(result), flush=True)
    return result


def _adapted(kind: str, dtype: torch.dtype, device: str, shape: dict) -> torch.nn.Module:
    model = random_llama(dtype, device, **shape).train()
    if kind == "peft_lora":
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    return loramix.inject(model, loramix.MixLoraConfig(num_experts=8, top_k=2, r=16, attn_r=16))


def _train_step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()


def sync_check(device: str, shape: dict) -> dict:
    """Host syncs in one training step (bf16 autocast) and one decoding step: MixLoRA's and the base model's."""
    from loramix.profiling import OpCounter

    small = shape or dict(SMALL, hidden_size=256, intermediate_size=512)  # enough to show every op kind
    ids = torch.randint(0, small["vocab_size"], (4, 64), device=device)
    mask = torch.ones_like(ids)
    mask[-1, :7] = 0  # left padding
    report = {}
    for kind in ("base", "mixlora"):
        model = random_llama(torch.float32, device, **small).train()
        if kind == "mixlora":
            model = loramix.inject(model, loramix.MixLoraConfig(num_experts=8, top_k=2, r=16, attn_r=16))
        else:
            model.requires_grad_(False).get_input_embeddings().weight.requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16):
            _train_step(model, ids, mask)  # warm-up
            with OpCounter() as train_ops:
                _train_step(model, ids, mask)
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            step_mask = torch.cat([mask, mask.new_ones(4, 1)], dim=1)
            with OpCounter() as decode_ops:
                model(input_ids=ids[:, -1:], attention_mask=step_mask, past_key_values=out.past_key_values)
        report[kind] = {"train_syncs": train_ops.syncs, "train_aten_ops": train_ops.total,
                        "decode_syncs": decode_ops.syncs, "decode_aten_ops": decode_ops.total}
    report["decode_cuda_graph"] = decode_graph_check(model, device)
    report["ok"] = all(report["mixlora"][k] == report["base"][k] for k in ("train_syncs", "decode_syncs"))
    report["ok"] = report["ok"] and report["decode_cuda_graph"] in ("equal", "skipped: not on CUDA")
    print(f"host syncs on {device}: {json.dumps(report)}", flush=True)
    return report


def decode_graph_check(model: torch.nn.Module, device: str) -> str:
    """Capture one MixLoRA layer's one-token step in a CUDA graph (fixed shapes, no sync) and replay it."""
    if device != "cuda":
        return "skipped: not on CUDA"
    layer = next(iter(loramix.injection.get_state(model).moe_layers.values())).eval()
    layer.token_mask = None
    x = torch.randn(1, 1, model.config.hidden_size, device=device)
    with torch.no_grad():
        want = layer(x).clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                layer(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                got = layer(x)
        except Exception as e:  # noqa: BLE001 - reported, not raised: the rest of the check still runs
            return f"failed: {type(e).__name__}: {e}"
        graph.replay()
        torch.cuda.synchronize()
    return "equal" if torch.allclose(got, want, rtol=1e-5, atol=1e-6) else "differs"


def compiled_step(device: str, shape: dict, steps: int) -> dict:
    """bf16 training step time and peak memory, eager and ``torch.compile``d, MixLoRA against PEFT LoRA."""
    ids = torch.randint(0, (shape or LLAMA_32_1B)["vocab_size"], (4, 128), device=device)
    mask = torch.ones_like(ids)
    rows: dict[str, dict] = {}
    for kind in ("peft_lora", "mixlora"):
        for compiled in (False, True):
            torch._dynamo.reset()
            model = _adapted(kind, torch.bfloat16, device, shape or {"num_hidden_layers": 4})  # 4 layers: compile time
            step_model = torch.compile(model) if compiled else model
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            _train_step(step_model, ids, mask)  # compiles when compiled
            first = time.perf_counter() - start
            times = []
            for _ in range(steps):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                _train_step(step_model, ids, mask)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
            rows[f"{kind}{'_compiled' if compiled else ''}"] = {
                "step_ms": 1000 * sorted(times)[len(times) // 2], "first_step_s": first, "peak_mib": peak}
            del model, step_model
    for mode in ("", "_compiled"):
        lora, mix = rows[f"peft_lora{mode}"], rows[f"mixlora{mode}"]
        rows[f"ratio{mode or '_eager'}"] = {
            "step": mix["step_ms"] / lora["step_ms"],
            "memory": mix["peak_mib"] / lora["peak_mib"] if lora["peak_mib"] else None}
    print(f"bf16 step, eager and compiled, on {device}: {json.dumps(rows)}", flush=True)
    return rows


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_bench.json")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per variant")
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU with a small model")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    shape = SMALL if args.dry_run else {}
    steps = 1 if args.dry_run else args.steps
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dry_run": args.dry_run,
                    "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    report["syncs"] = sync_check(device, shape)
    for name, dtype in (("bfloat16", torch.bfloat16),):
        result = bench(dtype, device, steps, shape)
        report[f"bench_{name}"] = {"ratios": result["ratios"], "variants": result["variants"],
                                   "memory_metric": result["memory_metric"]}
    report["compiled"] = compiled_step(device, shape, steps)
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
    return 0 if quantized_ok and report["syncs"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
