"""Every precision a user trains in: fp32 / bf16 / fp16 weights, each with no autocast, bf16 autocast and fp16
autocast, for every router and both expert types.

Per cell: the fast path (and the pairwise decoding path) equals the reference path within a tolerance set from
the compute dtype's machine epsilon, in outputs and gradients; gradients are finite; a few optimiser steps lower
the loss; save then load reproduces the logits; trainable weights stay float32 and routers route in float32.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import pytest
import torch

import loramix
from helpers.moe_layers import make_layer, run_layer
from helpers.tiny_models import EXPERT_TYPES, ROUTER_NAMES, random_batch, tiny_model
from loramix import MixLoraConfig
from loramix.precision import compute_dtype

DEVICE = os.environ.get("LORAMIX_TEST_DEVICE", "cpu")  # bench/gpu_check.sh runs this file with "cuda"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCASTS = [None, "bf16", "fp16"]
CELLS = list(itertools.product(DTYPES, AUTOCASTS))
# Normwise tolerances in units of the compute dtype's epsilon, relative to the largest reference value. An
# output element is a short chain of matmuls (fast and reference round at different points: a few eps); a
# parameter gradient also sums over the batch's tokens, so its rounding grows with that sum.
OUT_EPS, GRAD_EPS = 8, 64


def autocast(name: str | None) -> contextlib.AbstractContextManager:
    if name is None:
        return contextlib.nullcontext()
    return torch.autocast(DEVICE, dtype=DTYPES[name])


def assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, eps_units: float, dtype: torch.dtype,
                          what: str) -> None:
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp(min=1e-30)
    err = (actual - expected).abs().max()
    limit = eps_units * torch.finfo(dtype).eps * scale
    assert err <= limit, f"{what}: max error {err:.3g} > {limit:.3g} ({eps_units} eps of {dtype} x {scale:.3g})"


def precision_layer(weights: str, router: str, expert_type: str):
    """A MixLoraFFN whose frozen FFN is in ``weights`` and whose adapters are float32 (as inject keeps them)."""
    layer = make_layer("llama", router=router, expert_type=expert_type).float().to(DEVICE)
    layer.base.to(DTYPES[weights])
    return layer


@pytest.mark.parametrize("router", ROUTER_NAMES)
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize(("weights", "cast"), CELLS)
def test_fast_path_matches_reference_in_every_precision(weights, cast, router, expert_type) -> None:
    layer = precision_layer(weights, router, expert_type)
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE, DTYPES[weights])
    dtype = DTYPES[cast] if cast else DTYPES[weights]
    with autocast(cast):
        out_f, routing_f, grads_f = run_layer(layer, x, reference=False)
        out_r, routing_r, grads_r = run_layer(layer, x, reference=True)
    assert out_f.dtype == dtype and out_r.dtype == dtype
    assert routing_f.logits.dtype == torch.float32 and routing_f.weights.dtype == torch.float32
    assert torch.equal(routing_f.indices, routing_r.indices)
    assert_close_normwise(out_f, out_r, OUT_EPS, dtype, "output")
    for name in grads_r:
        assert torch.isfinite(grads_f[name]).all(), f"non-finite gradient of {name}"
        assert_close_normwise(grads_f[name], grads_r[name], GRAD_EPS, dtype, f"gradient of {name}")
    assert grads_f["input"].abs().sum() > 0
    assert grads_f["mixlora_router.weight"].abs().sum() > 0 or router == "switch" and expert_type == "adapter"


@pytest.mark.parametrize("router", ROUTER_NAMES)
@pytest.mark.parametrize(("weights", "cast"), CELLS)
def test_decoding_paths_match_reference_in_every_precision(weights, cast, router) -> None:
    """Eval mode: the pairwise path (a few tokens) and the fast path (many) against the reference path."""
    layer = precision_layer(weights, router, "mixlora").eval()
    dtype = DTYPES[cast] if cast else DTYPES[weights]
    for tokens in (1, 12):  # 1 token x k slots <= pairwise_max_pairs: pairwise path; 24 tokens: fast path
        x = torch.randn(2, tokens, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE, DTYPES[weights])
        with torch.no_grad(), autocast(cast):
            assert layer.uses_pairwise(2 * tokens) == (tokens == 1)
            layer.use_reference = False
            fast = layer(x)
            layer.use_reference = True
            ref = layer(x)
        assert fast.dtype == dtype
        assert_close_normwise(fast, ref, OUT_EPS, dtype, f"eval output, {tokens} token(s) per row")


def _train_cell(weights: str, cast: str | None, router: str, expert_type: str, steps: int = 5):
    model = tiny_model("llama").to(DEVICE, DTYPES[weights])
    cfg = MixLoraConfig(num_experts=4, top_k=2, r=4, alpha=8, attn_r=4, attn_alpha=8, router=router,
                        expert_type=expert_type, dropout=0.0, attn_dropout=0.0)
    model = loramix.inject(model, cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids, mask = (t.to(DEVICE) for t in random_batch(batch=2, seq=12))
    losses = []
    for _ in range(steps):
        with autocast(cast):
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        for p in params:
            assert p.grad is None or torch.isfinite(p.grad).all()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return model, cfg, losses


@pytest.mark.parametrize("router", ROUTER_NAMES)
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize(("weights", "cast"), CELLS)
def test_training_in_every_precision_lowers_the_loss_and_round_trips(
    weights, cast, router, expert_type, tmp_path
) -> None:
    model, cfg, losses = _train_cell(weights, cast, router, expert_type)
    assert all(map(torch.isfinite, map(torch.tensor, losses))), losses
    assert losses[-1] < losses[0], losses
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n and "mixlora" not in n for n in trainable)  # the attention LoRA is covered too
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    loramix.save_adapter(model, tmp_path / "adapter")
    ids, mask = (t.to(DEVICE) for t in random_batch(batch=2, seq=12, seed=9))
    model.eval()
    reloaded = loramix.load_adapter(tiny_model("llama").to(DEVICE, DTYPES[weights]), tmp_path / "adapter").eval()
    with torch.no_grad(), autocast(cast):
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = reloaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("weights", ["bf16", "fp16"])
def test_adapter_dtype_model_keeps_the_base_dtype_but_routers_stay_float32(weights) -> None:
    model = tiny_model("llama").to(DTYPES[weights])
    model = loramix.inject(model, MixLoraConfig(num_experts=2, top_k=1, r=2, attn_r=2, adapter_dtype="model"))
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    routers = {n: d for n, d in trainable.items() if "mixlora_router" in n}
    others = {n: d for n, d in trainable.items() if "mixlora_router" not in n}
    assert routers and set(routers.values()) == {torch.float32}
    assert others and set(others.values()) == {DTYPES[weights]}
    default = loramix.inject(tiny_model("llama").to(DTYPES[weights]), MixLoraConfig(num_experts=2, top_k=1, r=2))
    assert {p.dtype for p in default.parameters() if p.requires_grad} == {torch.float32}


def test_adapter_dtype_is_validated() -> None:
    with pytest.raises(ValueError, match="adapter_dtype"):
        MixLoraConfig(adapter_dtype="bfloat16")


def test_compute_dtype_follows_autocast() -> None:
    x = torch.zeros(2, dtype=torch.float32)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        assert compute_dtype(x.half()) == torch.float16


SMOKE = """
import torch, loramix
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=203, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
m = loramix.inject(LlamaForCausalLM(cfg), loramix.MixLoraConfig(num_experts=4, top_k=2, r=4)).train()
ids = torch.randint(0, 203, (2, 16))
with torch.autocast("cpu", dtype=torch.bfloat16):
    out = m(input_ids=ids, labels=ids)
out.loss.backward()
print("ok")
"""


def test_mixed_precision_smoke_runs_cleanly_in_a_fresh_process() -> None:
    """fp32 weights under CPU bf16 autocast, as a user's script: it trains and prints nothing else (bitsandbytes'
    missing-kernels notice, logged when peft imports it, is dropped by loramix.quantized)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SMOKE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
    assert "kernels-community" not in out.stderr, out.stderr
