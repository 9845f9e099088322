"""loramix.grouped: the (token, slot) pairs of a routing, and the per-pair expert products on the grouped
(``F.grouped_mm``) path and on the fallback, against the plain loop over experts, values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import SiLUActivation

import loramix.fused as fused
import loramix.grouped as grouped
from helpers.moe_layers import count_fused_calls
from loramix.grouped import (
    expert_matmul,
    expert_matmul_reference,
    grouped_mm_supported,
    routing_pairs,
    token_inputs_matmul,
)
from loramix.routers import Routing

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _routing(indices: list[list[int]], mask: list[list[bool]], weights: list[list[float]], experts: int = 4):
    idx, m = torch.tensor(indices), torch.tensor(mask)
    probs = torch.zeros(idx.shape[0], experts)
    return Routing(probs=probs, logits=probs, indices=idx, weights=torch.tensor(weights) * m, mask=m)


def test_routing_pairs_keep_every_slot_and_sort_by_expert() -> None:
    """N = T*K pairs whatever the mask; unused slots get weight 0, a token with no used slot weight 1 on its
    first slot (it carries the frozen FFN); sorted, the group ends count each expert's pairs."""
    routing = _routing([[2, 0], [1, 2], [0, 1], [3, 1]], [[True, True], [True, False], [True, True], [False, False]],
                       [[0.6, 0.4], [1.0, 0.5], [0.7, 0.3], [0.9, 0.1]])
    flat = routing_pairs(routing, 4, grouped=False, with_slots=True)
    assert flat.offsets is None
    assert flat.token.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and flat.expert.tolist() == [2, 0, 1, 2, 0, 1, 3, 1]
    assert flat.active.tolist() == [True, True, True, False, True, True, False, False]
    assert flat.weight.tolist() == pytest.approx([0.6, 0.4, 1.0, 0.0, 0.7, 0.3, 1.0, 0.0])
    pairs = routing_pairs(routing, 4, grouped=True, with_slots=True)
    assert pairs.expert.tolist() == [0, 0, 1, 1, 1, 2, 2, 3]
    assert pairs.offsets.dtype == torch.int32 and pairs.offsets.tolist() == [2, 5, 7, 8]
    assert pairs.token.tolist() == [0, 2, 1, 2, 3, 0, 1, 3]  # stable: a token's slots keep their order
    assert pairs.weight.tolist() == pytest.approx([0.4, 0.7, 1.0, 0.3, 0.0, 0.6, 0.0, 1.0])
    # slots: where each token's pairs are, in slot order
    assert flat.slots.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert pairs.slots.tolist() == [[5, 0], [2, 6], [1, 3], [7, 4]]
    assert pairs.expert[pairs.slots].tolist() == routing.indices.tolist()
    assert routing_pairs(routing, 4, grouped=True).slots is None and routing_pairs(routing, 4, False).slots is None


def _case(dtype: torch.dtype, inp: int, out: int, counts: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))  # (N,) sorted by expert
    x = torch.randn(len(expert), inp, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(len(counts), out, inp, generator=g).to(dtype).requires_grad_(True)
    probe = torch.randn(len(expert), out, generator=g).to(dtype)
    return x, w, expert, probe


def _pairs(expert: torch.Tensor, num_experts: int, sort: bool) -> grouped.Pairs:
    ends = torch.searchsorted(expert, torch.arange(num_experts), right=True, out_int32=True) if sort else None
    zeros = torch.zeros_like(expert)
    return grouped.Pairs(token=zeros, expert=expert, weight=zeros.float(), active=zeros.bool(), offsets=ends)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(("inp", "out"), [(12, 3), (3, 12)])  # LoRA A (narrow output) and B (narrow input)
@pytest.mark.parametrize("counts", [[3, 0, 4, 1], [0, 0, 5, 0]])
@pytest.mark.parametrize("sort", [True, False])
def test_expert_matmul_equals_the_loop_over_experts(dtype, inp: int, out: int, counts: list[int], sort: bool) -> None:
    """Grouped (sorted, where the kernel runs for the dtype) and fallback (unsorted rows) products equal the
    per-expert loop, and so do the gradients of x and of the expert weights; empty experts included."""
    if sort and not grouped_mm_supported(dtype, torch.device("cpu")):
        pytest.skip(f"no grouped kernel for {dtype} on CPU")
    x, w, expert, probe = _case(dtype, inp, out, counts)
    shuffled = torch.randperm(len(expert), generator=torch.Generator().manual_seed(1))
    perm = torch.arange(len(expert)) if sort else shuffled  # the fallback takes rows in any order
    xs, es, ps = x[perm], expert[perm], probe[perm]
    got = expert_matmul(xs, w, _pairs(es, len(counts), sort))
    want = expert_matmul_reference(xs, w, es)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * 4)
    got_grads = torch.autograd.grad((got.float() * ps.float()).sum(), [x, w], retain_graph=True)
    want_grads = torch.autograd.grad((want.float() * ps.float()).sum(), [x, w])
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 8)


@pytest.mark.parametrize("use_grouped", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_token_inputs_matmul_gathers_each_pairs_token_and_expert(use_grouped: bool, masked: bool, monkeypatch) -> None:
    """The A side of gate/up: x per token (T, in) under a per-token dropout keep-mask, one product per (token,
    expert) pair, on both paths, values and gradients."""
    monkeypatch.setattr(grouped, "USE_GROUPED_MM", use_grouped)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g, requires_grad=True)
    a = torch.randn(3, 4, 8, generator=g, requires_grad=True)
    mask = (torch.rand(5, 8, generator=g) > 0.3).to(torch.uint8) if masked else None
    routing = _routing([[0, 2], [1, 0], [2, 2], [1, 1], [0, 1]], [[True] * 2] * 5, [[0.5, 0.5]] * 5, experts=3)
    pairs = routing_pairs(routing, 3, grouped=grouped_mm_supported(torch.float32, x.device))
    assert (pairs.offsets is not None) == use_grouped
    got = token_inputs_matmul(x, a, pairs, mask)
    kept = x * mask if masked else x
    want = torch.stack([kept[t] @ a[e].t() for t, e in zip(pairs.token.tolist(), pairs.expert.tolist(), strict=True)])
    torch.testing.assert_close(got, want)
    probe = torch.randn(want.shape, generator=g)
    got_grads = torch.autograd.grad((got * probe).sum(), [x, a], retain_graph=True)
    for p, q in zip(got_grads, torch.autograd.grad((want * probe).sum(), [x, a]), strict=True):
        torch.testing.assert_close(p, q)


def test_grouped_kernel_is_chosen_only_where_it_runs(monkeypatch) -> None:
    """CPU eager: float32/bf16/fp16 grouped, float64 fallback; switched off, always the fallback."""
    cpu = torch.device("cpu")
    assert [grouped_mm_supported(d, cpu) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)] == [
        True, True, True, False]
    monkeypatch.setattr(grouped, "USE_GROUPED_MM", False)
    assert not grouped_mm_supported(torch.bfloat16, cpu)


@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize(("out", "inp"), [(4, 8), (8, 4)])
def test_expert_weight_grad_sums_each_experts_pairs(sort: bool, out: int, inp: int) -> None:
    counts = [3, 0, 5, 2]
    expert = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    g = torch.Generator().manual_seed(0)
    grad, x = torch.randn(len(expert), out, generator=g), torch.randn(len(expert), inp, generator=g)
    got = grouped.expert_weight_grad(grad, x, _pairs(expert, 4, sort), 4)
    want = torch.stack([grad[expert == e].t() @ x[expert == e] for e in range(4)])
    torch.testing.assert_close(got, want)


def _mix_reference(up, gate, weight, active, token, expert, num_tokens, act, mask, scale, a, b):
    """MixPairs' maths in plain autograd ops, one pair at a time for the down LoRA."""
    h = act(gate) * up if gate is not None else act(up)
    mixed = torch.zeros(num_tokens, h.shape[1], dtype=h.dtype).index_add(0, token, h * weight)
    if a is None:
        return mixed, None
    hk = h * mask if mask is not None else h
    wd = weight * active[:, None].to(weight.dtype)
    delta = torch.stack([(hk[i] @ a[expert[i]].t()) * wd[i] * scale @ b[expert[i]].t() for i in range(len(token))])
    return mixed, torch.zeros(num_tokens, b.shape[1], dtype=h.dtype).index_add(0, token, delta)


@pytest.mark.parametrize("act", [torch.nn.SiLU(), SiLUActivation(), torch.nn.GELU(approximate="tanh")],
                         ids=["silu", "hf_silu", "gelu"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("use_grouped", [True, False])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("down", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_mix_pairs_matches_autograd(
    gated: bool, down: bool, masked: bool, use_grouped: bool, fuse: bool, act, monkeypatch
) -> None:
    """MixPairs (pre-activations kept, activations recomputed in backward, grouped or fallback products) against
    the same maths in autograd ops, values and every gradient; an unused slot gets no down delta. With SiLU
    (torch's or transformers') the elementwise passes are fused on CPU or run as eager ops with SiLU's own
    backward kernel; other activations go through autograd."""
    monkeypatch.setattr(grouped, "USE_GROUPED_MM", use_grouped)
    monkeypatch.setattr(fused, "FUSE", fuse)
    calls = count_fused_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    num_tokens, k, width, hidden, r, experts = 5, 2, 8, 4, 4, 3

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_(True)

    indices = torch.randint(0, experts, (num_tokens, k), generator=g)
    mask_slots = torch.ones(num_tokens, k, dtype=torch.bool)
    mask_slots[1, 1] = False  # an unused slot
    mask_slots[3] = False  # a token no expert took
    weights = torch.rand(num_tokens, k, generator=g).tolist()
    routing = _routing(indices.tolist(), mask_slots.tolist(), weights, experts)
    pairs = routing_pairs(routing, experts, grouped=grouped_mm_supported(torch.float32, torch.device("cpu")))
    n = num_tokens * k
    up, gate = rand(n, width), rand(n, width) if gated else None
    weight = pairs.weight[:, None].clone().requires_grad_(True)
    a, b = (rand(experts, r, width), rand(experts, hidden, r)) if down else (None, None)
    mask = (torch.rand(n, width, generator=g) > 0.3).to(torch.uint8) if masked else None
    inputs = [t for t in (up, gate, weight, a, b) if t is not None]
    got = grouped.mix_pairs(up, gate, weight, pairs, num_tokens, act, mask, 0.7, a, b)
    want = _mix_reference(up, gate, weight, pairs.active, pairs.token, pairs.expert, num_tokens, act, mask, 0.7, a, b)
    probes = [torch.randn(t.shape, generator=g) for t in want if t is not None]
    for x, y in zip(got, want, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    loss = lambda outs: sum((o * p).sum() for o, p in zip([o for o in outs if o is not None], probes, strict=True))  # noqa: E731
    got_grads = torch.autograd.grad(loss(got), inputs)
    want_grads = torch.autograd.grad(loss(want), inputs)
    for x, y in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    silu = not isinstance(act, torch.nn.GELU)
    assert calls == (["pairs_forward", "pairs_backward"] if fuse and silu else [])


@pytest.mark.parametrize("with_delta", [True, False])
def test_gather_rows_values_and_gradients(with_delta: bool) -> None:
    """gather_rows equals index_select (+ delta), and its backward sums each pair's gradient into its token's row
    (tokens taken twice, once and never)."""
    g = torch.Generator().manual_seed(0)
    frozen = torch.randn(4, 6, generator=g).requires_grad_(True)
    token = torch.tensor([2, 0, 2, 1, 0, 2])  # token 3 never taken
    delta = torch.randn(6, 6, generator=g).requires_grad_(True) if with_delta else None
    _assert_gather_rows_is_index_select(frozen, token, delta, None, g)


def _assert_gather_rows_is_index_select(frozen, token, delta, slots, g) -> None:  # noqa: ANN001
    """gather_rows against ``index_select (+ delta)`` in autograd ops: values and the gradients of both inputs."""
    got = grouped.gather_rows(frozen, token, delta, slots)
    want = frozen.index_select(0, token) + (delta if delta is not None else 0)
    torch.testing.assert_close(got, want)
    probe = torch.randn(want.shape, generator=g)
    inputs = [frozen] + ([delta] if delta is not None else [])
    for x, y in zip(torch.autograd.grad((got * probe).sum(), inputs), torch.autograd.grad((want * probe).sum(), inputs),
                    strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("with_delta", [True, False])
def test_gather_rows_with_slots_sums_each_tokens_pairs(with_delta: bool, fuse: bool, monkeypatch) -> None:
    """With the pairs' slots (each token's K pairs, sorted by expert) the backward sums a token's pairs in one
    fused pass on CPU, or adds them in place: both equal autograd's index_select."""
    monkeypatch.setattr(fused, "FUSE", fuse)
    calls = count_fused_calls(monkeypatch)
    g = torch.Generator().manual_seed(0)
    routing = _routing(torch.randint(0, 4, (5, 2), generator=g).tolist(), [[True, True]] * 5, [[0.5, 0.5]] * 5)
    pairs = routing_pairs(routing, 4, grouped=True, with_slots=True)
    frozen = torch.randn(5, 6, generator=g).requires_grad_(True)
    delta = torch.randn(10, 6, generator=g).requires_grad_(True) if with_delta else None
    _assert_gather_rows_is_index_select(frozen, pairs.token, delta, pairs.slots, g)
    expected = (["gather_add"] if with_delta else []) + ["token_sums"]
    assert calls == (expected if fuse else [])
