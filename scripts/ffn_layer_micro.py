"""One FFN layer's forward + backward at SmolLM2 width (576 -> 1536), batch 4 x 128, one thread:
PEFT LoRA (r 16) vs MixLoRA (8 experts, top-2, r 16), random weights, median of 10 interleaved calls.

Run it with and without the allocator tuning to see the page-fault cost (``loramix.allocator``)::

    python scripts/ffn_layer_micro.py
    LORAMIX_TUNE_MALLOC=0 python scripts/ffn_layer_micro.py
"""

from __future__ import annotations

import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from loramix import MixLoraConfig, inject, tune_malloc


def main() -> None:
    print("malloc tuned:", tune_malloc())
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=1000)
    lora = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    mix = inject(LlamaForCausalLM(cfg), MixLoraConfig(num_experts=8, top_k=2, r=16, alpha=32, router="topk"))
    ffns = {"lora": lora.base_model.model.model.layers[0].mlp.train(), "mixlora": mix.model.layers[0].mlp.train()}
    x = torch.randn(4, 128, 576, requires_grad=True)

    def step(mlp: torch.nn.Module) -> None:
        mlp(x).sum().backward()

    for mlp in ffns.values():
        for _ in range(3):
            step(mlp)
    times: dict[str, list[float]] = {k: [] for k in ffns}
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        for name, mlp in ffns.items():
            start = time.perf_counter()
            step(mlp)
            times[name].append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    lo = statistics.median(times["lora"])
    for name, v in times.items():
        print(f"{name}: {1000 * statistics.median(v):.1f} ms ({statistics.median(v) / lo:.2f}x LoRA)")
    print(f"minor page faults during the 20 timed calls: {faults}")


if __name__ == "__main__":
    main()
