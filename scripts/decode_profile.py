"""Decode ms/token of the base model vs MixLoRA (8 experts, top-2, attention LoRA merged), one thread, then a
torch.profiler table of 8 MixLoRA decode steps (the decode profile named in the session-2 closing note).

    python scripts/decode_profile.py
"""

from __future__ import annotations

import time

import torch
from torch.profiler import profile

from loramix import MixLoraConfig, inject
from loramix.merge import merge_attention
from loramix.models import load_base_model

torch.set_num_threads(1)
base, tok = load_base_model(None, device="cpu", dtype="float32")
base.eval()
ids = torch.randint(0, 1000, (1, 16))


def gen(m: torch.nn.Module, n: int = 24) -> float:
    """ms per new token of a greedy generate of exactly ``n`` tokens."""
    with torch.no_grad():
        start = time.perf_counter()
        m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, pad_token_id=0)
        return (time.perf_counter() - start) / n * 1e3


gen(base)
tb = min(gen(base) for _ in range(3))
model = inject(base, MixLoraConfig(num_experts=8, top_k=2, r=16, alpha=32, attn_r=16, attn_alpha=32))
merge_attention(model)
model.eval()
gen(model)
tm = min(gen(model) for _ in range(3))
print(f"base {tb:.1f} ms/token, mixlora(attn merged) {tm:.1f} ms/token, ratio {tb / tm:.2f}")
with profile() as prof:
    gen(model, 8)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
