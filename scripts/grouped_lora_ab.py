"""Same-process A/B of one MixLoRA FFN layer's training forward + backward (SmolLM2 width 576 -> 1536, batch
4 x 128, 8 experts, top-2, r 16, dropout 0.05, one thread): the current package against an older checkout's,
with PEFT LoRA (r 16 on gate/up/down) as the yardstick, interleaved, median of 15 rounds. Session 6 (the
GroupedLoRA autograd function against the autograd-built grouped path of 9817178)::

    git worktree add /tmp/wt_old 9817178
    python scripts/grouped_lora_ab.py /tmp/wt_old/src
"""

from __future__ import annotations

import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import loramix


def load_old(src: str):  # noqa: ANN201
    """The package under ``src``/loramix, imported as ``loramix_old``."""
    tmp = Path(tempfile.mkdtemp())
    shutil.copytree(Path(src) / "loramix", tmp / "loramix_old")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("loramix_old")


def main() -> None:
    old = load_old(sys.argv[1])
    torch.set_num_threads(1)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=1000)
    ffns = {}
    torch.manual_seed(0)
    lora = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                          target_modules=["gate_proj", "up_proj", "down_proj"]))
    ffns["peft_lora"] = lora.base_model.model.model.layers[0].mlp
    for name, pkg in (("mixlora_old", old), ("mixlora_new", loramix)):
        torch.manual_seed(0)
        model = pkg.inject(LlamaForCausalLM(cfg), pkg.MixLoraConfig(num_experts=8, top_k=2, r=16, alpha=32))
        ffns[name] = model.model.layers[0].mlp
    for mlp in ffns.values():
        mlp.train()
        for n, p in mlp.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.02)
    x = torch.randn(4, 128, 576, requires_grad=True)
    for mlp in ffns.values():
        for _ in range(3):
            mlp(x).sum().backward()
    times: dict[str, list[float]] = {k: [] for k in ffns}
    for _ in range(15):
        for name, mlp in ffns.items():
            start = time.perf_counter()
            mlp(x).sum().backward()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["peft_lora"])
    for name, v in times.items():
        print(f"{name}: {1000 * statistics.median(v):.1f} ms ({statistics.median(v) / base:.2f}x PEFT LoRA)")
    ratios = [n / o for n, o in zip(times["mixlora_new"], times["mixlora_old"], strict=True)]
    print(f"new / old per round: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
