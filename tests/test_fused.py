"""loramix.fused: each fused pass, compiled, equals its plain torch form in every precision and variant; when
the fused passes are used; a failed compile falls back to the eager ops; a MixLoRA layer's training step is the
same with and without them."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.activations import ACT2FN

import loramix.fused as fused
from helpers.moe_layers import count_fused_calls
from helpers.tiny_models import tiny_model
from loramix import MixLoraConfig, inject
from loramix.profiling import OpCounter

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _pairs_inputs(dtype: torch.dtype, gated: bool, masked: bool, seed: int = 0) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    num_tokens, k, width = 6, 2, 40  # width not a multiple of the vector length: the loops' tails run too
    n = num_tokens * k
    token = torch.randperm(n, generator=g) // k  # (N,) each token twice, in a sorted-by-expert order
    return {
        "up": torch.randn(n, width, generator=g).to(dtype),
        "gate": torch.randn(n, width, generator=g).to(dtype) if gated else None,
        "grad_mixed": torch.randn(num_tokens, width, generator=g).to(dtype),
        "token": token,
        "weight": torch.rand(n, 1, generator=g).to(dtype),
        "mask": (torch.rand(n, width, generator=g) > 0.3).to(torch.uint8) if masked else None,
        "grad_hk": torch.randn(n, width, generator=g).to(dtype),
    }


def _assert_same(got, want, dtype: torch.dtype) -> None:  # noqa: ANN001
    assert len(got) == len(want)
    for x, y in zip(got, want, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape
            tol = TOLERANCE[dtype]
            torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("down", [True, False])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_compiled_pair_passes_equal_their_plain_form(gated: bool, masked: bool, down: bool, dtype) -> None:
    """Forward (activation, weighting, mask) and backward (recomputed activation, every gradient), compiled
    against the same functions run eagerly; and against autograd over the plain forward."""
    t = _pairs_inputs(dtype, gated, masked)
    fwd = (t["up"], t["gate"], t["weight"], t["mask"], down)
    _assert_same(fused.run(fused.pairs_forward, *fwd), fused.pairs_forward(*fwd), dtype)
    bwd = (t["up"], t["gate"], t["grad_mixed"], t["token"], t["weight"], t["mask"], t["grad_hk"] if down else None)
    got = fused.run(fused.pairs_backward, *bwd)
    _assert_same(got, fused.pairs_backward(*bwd), dtype)
    assert fused._failure is None
    if dtype != torch.float32:
        return
    # the backward is the gradient of the forward: autograd over pairs_forward in float64
    up, gate, weight = (x.double().requires_grad_(True) if x is not None else None
                        for x in (t["up"], t["gate"], t["weight"]))
    weighted, hk = fused.pairs_forward(up, gate, weight, t["mask"], True)
    mixed = torch.zeros(t["grad_mixed"].shape, dtype=torch.float64).index_add(0, t["token"], weighted)
    loss = (mixed * t["grad_mixed"].double()).sum() + ((hk * t["grad_hk"].double()).sum() if down else 0)
    inputs = [x for x in (weight, up, gate) if x is not None]
    want = torch.autograd.grad(loss, inputs)
    grad_weight, hk_out, grad_up, grad_gate = got
    for x, y in zip([grad_weight, grad_up, grad_gate][: len(inputs)], want, strict=True):
        torch.testing.assert_close(x.double(), y, rtol=1e-4, atol=1e-5)
    assert (hk_out is None) == (not down)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_compiled_gather_and_token_sums_equal_index_ops(k: int, dtype) -> None:
    """gather_add is index_select + delta, token_sums is index_add over each token's K pairs."""
    g = torch.Generator().manual_seed(k)
    num_tokens, width = 7, 24
    n = num_tokens * k
    order = torch.randperm(n, generator=g)  # pairs in some order, as sorting by expert leaves them
    token = (torch.arange(n) // k)[order]
    slots = torch.empty_like(order).scatter_(0, order, torch.arange(n)).view(num_tokens, k)
    frozen = torch.randn(num_tokens, width, generator=g).to(dtype)
    delta = torch.randn(n, width, generator=g).to(dtype)
    tol = TOLERANCE[dtype]
    got = fused.run(fused.gather_add, frozen, token, delta)
    torch.testing.assert_close(got, frozen.index_select(0, token) + delta, rtol=tol, atol=tol)
    sums = fused.run(fused.token_sums, delta, slots)
    want = torch.zeros(num_tokens, width).index_add_(0, token, delta.float())
    torch.testing.assert_close(sums.float(), want, rtol=tol, atol=tol * 4)


def test_fusable_only_on_cpu_for_silu_outside_compile_and_dispatch_modes(monkeypatch) -> None:
    """SiLU is torch's nn.SiLU or transformers' SiLUActivation (which is not an nn.SiLU); GELU FFNs, other
    devices, FUSE off, a trace in progress and an op-counting dispatch mode all keep the eager ops."""
    x = torch.zeros(2, 2)
    assert fused.fusable(x, ACT2FN["silu"]) and fused.fusable(x, torch.nn.SiLU()) and fused.fusable(x)
    assert not fused.fusable(x, ACT2FN["gelu_pytorch_tanh"])
    assert not fused.fusable(torch.zeros(2, 2, device="meta"))
    with OpCounter():
        assert not fused.fusable(x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fused.fusable(x)
    monkeypatch.undo()
    monkeypatch.setattr(fused, "FUSE", False)
    assert not fused.fusable(x)


def test_a_failed_compile_is_logged_once_and_the_eager_ops_take_over(monkeypatch, caplog) -> None:
    """No working compiler (here: torch.compile's result raises): run() returns the plain function's result,
    warns once with the reason, and fusable() is False from then on."""
    def broken(fn, **kwargs):  # noqa: ANN001, ANN202
        def call(*args):  # noqa: ANN202
            raise RuntimeError("no C++ compiler found")
        return call

    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setattr(fused, "_failure", None)
    monkeypatch.setattr(torch, "compile", broken)
    t = _pairs_inputs(torch.float32, True, True)
    with caplog.at_level(logging.WARNING, logger="loramix.fused"):
        got = fused.run(fused.gather_add, t["grad_mixed"], t["token"], t["up"])
        again = fused.run(fused.gather_add, t["grad_mixed"], t["token"], t["up"])
    want = t["grad_mixed"].index_select(0, t["token"]) + t["up"]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "eagerly" in warnings[0]
    assert not fused.fusable(t["up"], ACT2FN["silu"])


@pytest.mark.parametrize(("weights", "autocast"), [
    (torch.float32, None), (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, None),
], ids=["float32", "bf16-autocast", "fp16-autocast", "bf16-base"])
def test_training_step_is_the_same_with_and_without_fusing(weights, autocast, monkeypatch) -> None:
    """A tiny Llama MixLoRA model's loss and every trainable gradient, top-2 with dropout, fused passes against
    the eager ops (same seed, so the same dropout masks): float32, CPU autocast, and a bf16 base (the pairs'
    tensors in bf16, the adapter weights float32)."""
    torch.manual_seed(0)
    config = MixLoraConfig(num_experts=4, top_k=2, r=4, dropout=0.1, attn_r=0, balance_bias_rate=0.0)
    model = inject(tiny_model("llama").to(weights), config)
    with torch.no_grad():  # B != 0: every expert's delta and gradient path carries signal
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))

    def step(fuse: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        monkeypatch.setattr(fused, "FUSE", fuse)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = count_fused_calls(monkeypatch)
    loss_fused, grads_fused = step(True)
    assert {"pairs_forward", "pairs_backward", "gather_add", "token_sums"} <= set(calls)
    loss_eager, grads_eager = step(False)
    tol = {None: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[autocast if weights == torch.float32 else weights]
    torch.testing.assert_close(loss_fused, loss_eager, rtol=tol, atol=tol)
    assert grads_fused.keys() == grads_eager.keys() and any("mixlora_experts" in n for n in grads_fused)
    for name, grad in grads_fused.items():
        want = grads_eager[name]
        err = (grad - want).norm() / want.norm().clamp_min(1e-12)
        assert err < tol * 4, f"{name}: relative gradient difference {err:.2e}"
