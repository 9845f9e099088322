"""Routing of freshly initialised routers (no training) on 16 counsel-chat rows: per-layer expert shares,
router entropy and logit spread (the step-0 figures of docs/training.md).

    LORAMIX_DATA_DIR=/path/to/data python -m bench.probes.init_routing
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from loramix.config import MixLoraConfig
from loramix.injection import get_state, inject, routing_stats
from loramix.models import load_base_model

torch.manual_seed(0)
model, tok = load_base_model(None, device="cpu", dtype="float32")
inject(model, MixLoraConfig(num_experts=8, top_k=2, r=16, alpha=32, attn_r=16, attn_alpha=32))
path = Path(os.environ["LORAMIX_DATA_DIR"]) / "counsel_chat/counsel_chat_context_response.jsonl"
with open(path) as f:
    rows = [json.loads(line) for line in f][:16]
texts = [r["Context"] + "\n" + r["Response"] for r in rows]
enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=256)
model.eval()
with torch.no_grad():
    model(**enc)
for s in routing_stats(model):
    share = s["tokens_per_expert"].float()
    share = share / share.sum()
    print(s["layer"], " ".join(f"{x:.3f}" for x in share.tolist()), f"ent={s['entropy']:.3f}")
layers = list(get_state(model).moe_layers.values())
for i in (0, 15, 29):
    logits = layers[i].last_routing.logits
    print(i, "logit std across experts", logits.std(-1).mean().item(), "mean logits", logits.mean(0).tolist())
