"""MixLoraFFN: the fast path (grouped GEMMs or their fallback) equals the plain reference path, values and gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import loramix.dropout
import loramix.grouped
from helpers.moe_layers import base_mlp, make_layer, run_layer
from helpers.tiny_models import (
    ARCHS,
    EXPERT_TYPES,
    ROUTER_NAMES,
)
from loramix import MixLoraConfig
from loramix.ffn_spec import check_targets, detect_ffn
from loramix.moe_layer import MixLoraFFN
from loramix.routers import Routing

HIDDEN = 32
# Values in float64; the router runs in float32 by design, so its gradients agree to float32 precision.
TOL = dict(rtol=1e-5, atol=1e-6)


def assert_paths_agree(layer: MixLoraFFN, x: torch.Tensor, token_mask: torch.Tensor | None = None):
    out_f, routing_f, g_f = run_layer(layer, x, reference=False, token_mask=token_mask)
    out_r, routing_r, g_r = run_layer(layer, x, reference=True, token_mask=token_mask)
    assert torch.equal(routing_f.indices, routing_r.indices) and torch.equal(routing_f.mask, routing_r.mask)
    torch.testing.assert_close(out_f, out_r, **TOL)
    assert set(g_f) == set(g_r)
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_r[name], **TOL, msg=lambda m, n=name: f"grad of {n}: {m}")
    # guard against a vacuous pass: the adapter changes the output and gradients reach the experts
    assert g_f["input"].abs().sum() > 0
    lora = [g for n, g in g_f.items() if "lora_A" in n or "lora_B" in n]
    assert lora and all(g.abs().sum() > 0 for g in lora)
    return out_f, routing_f


def plain_ffn(layer: MixLoraFFN, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer.base(x)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize("router", ROUTER_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_path_equals_reference(arch: str, router: str, expert_type: str) -> None:
    """Fast and reference paths give the same output and the same gradients (input and every trainable
    parameter) in train mode, for every router, both expert types and every FFN family (GPT-2: Conv1D
    with a bias on the down projection)."""
    layer = make_layer(arch, router, expert_type)
    x = torch.randn(2, 8, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out, _ = assert_paths_agree(layer, x)
    assert (out - plain_ffn(layer, x)).abs().max() > 1e-3  # the experts really changed the FFN


@pytest.mark.parametrize("use_grouped", [True, False])
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_grouped_and_fallback_fast_paths_equal_reference_in_float32(
    router: str, expert_type: str, use_grouped: bool, monkeypatch
) -> None:
    """In float32 the fast path takes ``F.grouped_mm`` (pairs sorted by expert) or, switched off, the dense
    fallback; both equal the reference, values and gradients, with padding (float64 layers always take the
    fallback, since the grouped kernel has no float64)."""
    monkeypatch.setattr(loramix.grouped, "USE_GROUPED_MM", use_grouped)
    calls = []
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = make_layer("llama", router, expert_type).float()
    x = torch.randn(2, 8, HIDDEN, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    out_f, routing_f, g_f = run_layer(layer, x, reference=False, token_mask=mask)
    assert bool(calls) == use_grouped
    out_r, routing_r, g_r = run_layer(layer, x, reference=True, token_mask=mask)
    assert torch.equal(routing_f.indices, routing_r.indices)
    torch.testing.assert_close(out_f, out_r, rtol=1e-4, atol=1e-5)
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_r[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert all(g.abs().sum() > 0 for n, g in g_f.items() if "lora_" in n)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize("router", ["topk", "top_p", "dense"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_path_equals_reference_with_padding(arch: str, router: str, expert_type: str) -> None:
    """With a padding mask both paths agree, padding tokens reach no expert and get the frozen FFN output."""
    layer = make_layer(arch, router, expert_type)
    x = torch.randn(2, 8, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    out, routing = assert_paths_agree(layer, x, token_mask=mask)
    pad = ~mask.reshape(-1).bool()
    assert not routing.mask[pad].any()
    assert routing.mask[~pad].any(dim=-1).all()
    torch.testing.assert_close(out[1, :3], plain_ffn(layer, x[1, :3]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_path_equals_reference_when_switch_drops_tokens(arch: str, expert_type: str) -> None:
    """Switch capacity drops tokens; both paths agree and dropped tokens get the frozen FFN output."""
    layer = make_layer(arch, "switch", expert_type, capacity_factor=0.25)  # capacity = ceil(.25*16/4) = 1
    x = torch.randn(2, 8, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :2] = 0  # padding on top: capacity counts real tokens only (14 -> ceil(0.875) = 1)
    out, routing = assert_paths_agree(layer, x, token_mask=mask)
    kept = routing.mask.any(dim=-1)
    real = mask.reshape(-1).bool()
    assert kept.sum() <= 4 and (real & ~kept).sum() >= 10  # at most one token per expert
    dropped = (real & ~kept).nonzero().squeeze(-1)
    flat = x.reshape(-1, HIDDEN)
    expected = plain_ffn(layer, flat[dropped])
    torch.testing.assert_close(out.reshape(-1, HIDDEN)[dropped], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("arch", "targets"),
    [("llama", ["up"]), ("llama", ["down"]), ("llama", ["gate", "up"]), ("gemma", ["gate"]),
     ("gpt2", ["up"]), ("gpt2", ["down"])],
)
def test_fast_path_equals_reference_for_target_subsets(arch: str, targets: list[str]) -> None:
    """Experts on a subset of the FFN projections: both paths agree and only those projections get LoRA."""
    layer = make_layer(arch, "topk", targets=targets)
    assert sorted(layer.mixlora_experts) == sorted(targets)
    x = torch.randn(2, 8, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert_paths_agree(layer, x)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_path_equals_reference_for_unnormalised_weights(arch: str) -> None:
    """mixlora_fast == mixlora_reference for an explicit Routing whose weights do not sum to one and
    with unused slots (checks the once-per-token frozen down projection, including GPT-2's bias)."""
    layer = make_layer(arch, "topk")
    x = torch.randn(5, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logits = torch.randn(5, 4)
    routing = Routing(
        weights=torch.tensor([[0.3, 0.5], [1.2, 0.0], [0.7, 0.1], [0.0, 0.0], [0.25, 0.25]]),
        indices=torch.tensor([[0, 3], [1, 2], [2, 2], [0, 1], [3, 1]]),
        mask=torch.tensor([[True, True], [True, False], [True, True], [False, False], [True, True]]),
        logits=logits, probs=logits.softmax(-1), token_mask=torch.ones(5, dtype=torch.bool),
    )
    fast = layer.mixlora_fast(x, routing)
    ref = layer.mixlora_reference(x, routing)
    torch.testing.assert_close(fast, ref, **TOL)
    # token 3 has no valid slot: frozen FFN
    torch.testing.assert_close(fast[3], plain_ffn(layer, x[3:4])[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_init_layer_equals_frozen_ffn(arch: str, expert_type: str) -> None:
    """Freshly built (B = 0) experts leave the FFN output unchanged on both paths."""
    mlp = copy.deepcopy(base_mlp(arch))
    mlp.eval()
    spec = detect_ffn(mlp)
    cfg = MixLoraConfig(num_experts=4, expert_type=expert_type)
    layer = MixLoraFFN(mlp, spec, check_targets(spec, None, mlp), 4, cfg).double().eval()
    x = torch.randn(2, 8, HIDDEN, dtype=torch.float64)
    expected = plain_ffn(layer, x)
    for reference in (False, True):
        layer.use_reference = reference
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, **TOL)  # top-k weights sum to 1 in float32


def test_kv_cache_step_uses_the_last_mask_positions() -> None:
    """During cached decoding (2-D mask longer than the new tokens) the mask's last positions are used."""
    layer = make_layer("llama", "topk")
    layer.eval()
    layer.token_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])  # 2 new tokens per row
    with torch.no_grad():
        layer(torch.randn(2, 2, HIDDEN, dtype=torch.float64))
    assert layer.last_routing.token_mask.tolist() == [True, True, True, False]


@pytest.mark.parametrize("router", ROUTER_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_pairwise_inference_path_equals_reference(arch: str, router: str) -> None:
    """The decoding path (eval mode, few tokens: gathered expert weights, batched matmuls) gives the
    reference output, also with padding and with switch capacity dropping tokens."""
    cfg = {"capacity_factor": 0.25} if router == "switch" else {}
    layer = make_layer(arch, router, "mixlora", **cfg).eval()
    layer.pairwise_max_pairs = 10**6
    x = torch.randn(2, 3, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    for token_mask in (None, mask):
        layer.token_mask = token_mask
        with torch.no_grad():
            layer.use_reference = True
            ref = layer(x)
            layer.use_reference = False
            layer.mixlora_fast = None  # the pairwise path must not fall back to the grouped one
            out = layer(x)
            del layer.mixlora_fast
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        assert (ref - plain_ffn(layer, x)).abs().max() > 1e-3


def test_pairwise_path_is_used_only_for_small_inference_batches() -> None:
    layer = make_layer("llama", "topk", "mixlora").eval()
    used = []
    layer.mixlora_pairwise = lambda x, r: used.append("pairwise") or torch.zeros_like(x)
    layer.mixlora_fast = lambda x, r: used.append("grouped") or torch.zeros_like(x)
    with torch.no_grad():
        layer(torch.randn(1, 1, HIDDEN, dtype=torch.float64))  # 2 pairs
        layer(torch.randn(1, 9, HIDDEN, dtype=torch.float64))  # 18 pairs > 16
        layer.train()
        layer(torch.randn(1, 1, HIDDEN, dtype=torch.float64))
    assert used == ["pairwise", "grouped", "grouped"]


def _fixed_keep_mask(per_token: bool):
    """A deterministic stand-in for ``keep_mask`` that keeps 3 of 4 elements. The mixlora fast path drops on
    the (T, H) token rows and on the (pairs, I) expert activations, the reference path on (T, H) and (T, I):
    with ``per_token`` rows of width HIDDEN get a pattern that differs per token, so a fast path that used
    another token's mask would disagree; other widths get a per-feature pattern, the same in both layouts."""

    def keep(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
        rows, width = math.prod(shape[:-1]), shape[-1]
        col = torch.arange(width)
        by_row = per_token and width == HIDDEN
        row = torch.arange(rows)[:, None] if by_row else torch.zeros(rows, 1, dtype=torch.long)
        return ((row * 7 + col * 3) % 4 != 0).reshape(shape).to(device)

    return keep


@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize("router", ["topk", "switch"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_path_equals_reference_with_dropout(arch: str, router: str, expert_type: str, monkeypatch) -> None:
    """Dropout p = 0.3 in training with the mask fixed: the fast path (mixlora: one mask per token on x,
    1/(1-p) on the rank-r products) equals the reference path (dropout of each expert's input), values and
    gradients. Adapter experts draw one mask per (token, expert) pair, so their fixed mask is per feature."""
    monkeypatch.setattr(loramix.dropout, "keep_mask", _fixed_keep_mask(per_token=expert_type == "mixlora"))
    layer = make_layer(arch, router, expert_type)
    layer.mixlora_dropout.p = 0.3
    x = torch.randn(2, 8, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with_dropout, _ = assert_paths_agree(layer, x)
    layer.mixlora_dropout.p = 0.0
    without = run_layer(layer, x, reference=False)[0]
    assert (with_dropout - without).abs().max() > 1e-3  # the dropout really acted


@pytest.mark.parametrize("router", ["topk", "switch", "dense"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recomputed_expert_activations_equal_stored_ones(arch: str, router: str) -> None:
    """Training recomputes the pairs' activations in backward from their gate/up pre-activations
    (recompute_experts); with real (random) dropout the replayed RNG draws the same masks, so values and
    gradients equal those of the stored-activation run, and the forward keeps fewer (pairs, intermediate)
    tensors for backward: the pre-activations only (two for a gated FFN, one for GPT-2)."""
    layer = make_layer(arch, router)
    layer.mixlora_dropout.p = 0.3
    # 14 tokens: no pair count (14 k) coincides with a weight's shape (32 x 64) that the forward also keeps
    x = torch.randn(2, 7, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results, stored = {}, {}
    for recompute in (False, True):
        layer.recompute_experts = recompute
        results[recompute] = run_layer(layer, x, reference=False)
        shapes: list[tuple[int, ...]] = []  # the floating-point tensors the forward keeps for backward
        keep = lambda t, s=shapes: (s.append(tuple(t.shape)) if t.is_floating_point() else None) or t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            layer(x.clone().requires_grad_(True))
        pairs = layer.last_routing.mask.numel()  # every (token, slot) pair, used or not
        width = layer.proj("up").weight.shape[0] if arch == "llama" else layer.proj("up").weight.shape[1]
        stored[recompute] = len([s for s in shapes if s == (pairs, width)])
    assert stored[True] == (2 if arch == "llama" else 1) < stored[False], stored
    (out_s, _, grads_s), (out_r, _, grads_r) = results[False], results[True]
    torch.testing.assert_close(out_r, out_s, rtol=0, atol=1e-12)
    for name in grads_s:
        torch.testing.assert_close(grads_r[name], grads_s[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(("old", "new", "names"), [
    ("loramix.layer", "loramix.moe_layer", ["MixLoraFFN", "ExpertLoRA", "AdapterExperts"]),
    ("loramix.ffn", "loramix.ffn_spec", ["FFNSpec", "detect_ffn", "check_targets", "FFNNotSupportedError"]),
    ("loramix.commands", "loramix.cli.commands", ["generate_command", "compare_command", "bench_harness"]),
    ("loramix.skills.commands", "loramix.skills.api", ["skills_add", "skills_route", "skills_list"]),
])
def test_old_module_paths_reexport_with_a_warning(old: str, new: str, names: list[str]) -> None:
    """The modules' old paths still import (for one release) the same objects, with a DeprecationWarning."""
    import importlib
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new):
        module = importlib.import_module(old)
    for name in names:
        assert getattr(module, name) is getattr(importlib.import_module(new), name)
