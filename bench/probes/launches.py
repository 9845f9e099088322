"""aten ops and host-sync ops of one training forward + backward, counted with loramix.profiling.OpCounter, on a
4-layer tiny Llama (hidden 64, intermediate 128, 8 experts, top-2, r 4, batch 4 x 32 with left padding): the frozen
base, PEFT LoRA r 4 on all seven projections, and MixLoRA with every router::

    python -m bench.probes.launches                 # grouped GEMMs where the kernel runs (float32 on CPU)
    python -m bench.probes.launches --no-grouped    # the dense fallback

Counts depend on the code, not on the machine: the same command prints the same table anywhere.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import loramix
import loramix.grouped
from loramix.profiling import OpCounter

ROUTERS = ["topk", "noisy_topk", "switch", "dense", "top_p"]


def build(kind: str, router: str = "topk", expert_type: str = "mixlora") -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).train()
    if kind == "base":
        return model.requires_grad_(False)
    if kind == "peft_lora":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    config = loramix.MixLoraConfig(num_experts=8, top_k=2, r=4, attn_r=4, router=router, expert_type=expert_type)
    return loramix.inject(model, config)


def count(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> OpCounter:
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with OpCounter() as ops:
        out = model(inputs_embeds=embeds, attention_mask=mask)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        if getattr(out, "aux_loss", None) is not None:
            loss = loss + out.aux_loss
        loss.backward()
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-grouped", action="store_true", help="the dense fallback instead of F.grouped_mm")
    args = parser.parse_args()
    loramix.grouped.USE_GROUPED_MM = not args.no_grouped
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (4, 32), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, :5] = 0
    rows = [("frozen base", build("base")), ("PEFT LoRA, 7 projections", build("peft_lora"))]
    rows += [(f"loramix `{r}`", build("mixlora", r)) for r in ROUTERS]
    counts = {name: count(model, ids, mask) for name, model in rows}
    lora = counts["PEFT LoRA, 7 projections"].total
    print("| | aten ops | / PEFT LoRA | ops that force a host sync |")
    print("|---|---:|---:|---|")
    for name, ops in counts.items():
        syncs = ", ".join(f"{k} {v}" for k, v in sorted(ops.syncs.items())) or "0"
        print(f"| {name} | {ops.total:,} | {ops.total / lora:.2f}x | {syncs} |")


if __name__ == "__main__":
    main()
