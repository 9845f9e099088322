"""GroupedLoRA (hand-written backward) equals the plain autograd version, values and gradients."""

from __future__ import annotations

import pytest
import torch

from loramix.grouped import grouped_lora, grouped_lora_reference


def _inputs(counts: list[int], outs: list[int], with_base: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, num_tokens, experts, r, width = sum(counts), 7, len(counts), 3, 5

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    x = rand(n, width)
    a = [rand(experts, r, width) for _ in outs]
    b = [rand(experts, o, r) for o in outs]
    token = torch.randint(0, num_tokens, (n,), generator=g)
    bases = [rand(num_tokens, o) for o in outs] if with_base else None
    return x, a, b, token, bases


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("outs", [[6], [6, 4]])
@pytest.mark.parametrize("counts", [[3, 0, 4, 1], [0, 0, 5, 0]])
def test_grouped_lora_matches_autograd_reference(counts: list[int], outs: list[int], with_base: bool) -> None:
    """Empty experts, one or two projections sharing the input, with and without gathered frozen rows."""
    x, a, b, token, bases = _inputs(counts, outs, with_base)
    leaves = [x, *a, *b, *(bases or [])]
    probes = [torch.randn(sum(counts), o, dtype=torch.float64) for o in outs]

    def run(fn):
        got = fn(x, a, b, counts, 0.7, token if with_base else None, bases)
        loss = sum((o * p).sum() for o, p in zip(got, probes, strict=True))
        return got, torch.autograd.grad(loss, leaves)

    got, grads = run(grouped_lora)
    want, want_grads = run(grouped_lora_reference)
    for o, w in zip(got, want, strict=True):
        torch.testing.assert_close(o, w)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


def test_grouped_lora_gradcheck_and_unused_output() -> None:
    x, a, b, token, bases = _inputs([2, 1, 0], [4, 3], with_base=True, seed=1)
    assert torch.autograd.gradcheck(
        lambda x, a0, a1, b0, b1, base0, base1: grouped_lora(x, [a0, a1], [b0, b1], [2, 1, 0], 0.5, token,
                                                             [base0, base1]),
        (x, *a, *b, *bases),
    )
    up, _ = grouped_lora(x, a, b, [2, 1, 0], 0.5, token, bases)  # the second output never reaches the loss
    grads = torch.autograd.grad(up.sum(), [x, a[1], b[1], bases[1]], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert all(g is None or g.abs().sum() == 0 for g in grads[1:])


def test_grouped_lora_frozen_inputs_get_no_gradient_work() -> None:
    """Frozen bases (no grad) and a frozen input: only the LoRA weights get gradients."""
    x, a, b, token, bases = _inputs([2, 2], [4], with_base=True)
    x, base = x.detach(), bases[0].detach()
    (out,) = grouped_lora(x, a, b, [2, 2], 1.0, token, [base])
    ga, gb = torch.autograd.grad(out.square().sum(), [a[0], b[0]])
    assert ga.shape == a[0].shape and gb.shape == b[0].shape and gb.abs().sum() > 0
    with pytest.raises(ValueError, match="token index"):
        grouped_lora(x, a, b, [2, 2], 1.0, None, [base])


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("down", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_mix_pairs_matches_autograd_and_gradcheck(gated: bool, down: bool, masked: bool) -> None:
    """MixPairs (pre-activations kept, activations recomputed in backward) against the same maths in autograd ops,
    values and gradients, with an empty expert among them; and torch.autograd.gradcheck."""
    from loramix.grouped import mix_pairs

    g = torch.Generator().manual_seed(0)
    counts, num_tokens, width, hidden, r = [3, 0, 4], 5, 6, 4, 2
    n = sum(counts)
    token = torch.tensor([0, 2, 4, 1, 2, 3, 4])
    act = torch.nn.SiLU() if gated else torch.nn.GELU()

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)

    up, gate, weight = leaf(n, width), (leaf(n, width) if gated else None), leaf(n, 1)
    a, b = (leaf(3, r, width), leaf(3, hidden, r)) if down else (None, None)
    mask = (torch.rand(n, width, generator=g) > 0.3).to(torch.uint8) if masked else None
    scale = 1.7
    inputs = [t for t in (up, gate, weight, a, b) if t is not None]

    def reference():
        h = act(gate) * up if gated else act(up)
        mixed = torch.zeros(num_tokens, width, dtype=h.dtype).index_add(0, token, h * weight)
        if not down:
            return mixed, None
        hk = h * mask if masked else h
        delta = torch.cat([hk[s] @ a[e].t() @ b[e].t() for e, s in enumerate(_slices(counts))]) * scale
        return mixed, torch.zeros(num_tokens, hidden, dtype=h.dtype).index_add(0, token, delta * weight)

    def fast():
        return mix_pairs(up, gate, weight, token, counts, num_tokens, act, mask, scale, a, b)

    probe = [torch.randn(num_tokens, width, generator=g, dtype=torch.float64),
             torch.randn(num_tokens, hidden, generator=g, dtype=torch.float64)]
    results = []
    for fn in (fast, reference):
        mixed, down_out = fn()
        loss = (mixed * probe[0]).sum() + ((down_out * probe[1]).sum() if down_out is not None else 0)
        results.append((mixed, down_out, torch.autograd.grad(loss, inputs)))
    (m_f, d_f, g_f), (m_r, d_r, g_r) = results
    torch.testing.assert_close(m_f, m_r)
    assert (d_f is None) == (not down)
    if down:
        torch.testing.assert_close(d_f, d_r)
    for got, want in zip(g_f, g_r, strict=True):
        torch.testing.assert_close(got, want)

    def from_inputs(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        it = iter(ts)
        u, gt, w = next(it), (next(it) if gated else None), next(it)
        aa, bb = (next(it), next(it)) if down else (None, None)
        return tuple(o for o in mix_pairs(u, gt, w, token, counts, num_tokens, act, mask, scale, aa, bb)
                     if o is not None)

    assert torch.autograd.gradcheck(from_inputs, tuple(inputs))


def _slices(counts: list[int]) -> list[slice]:
    starts = [sum(counts[:e]) for e in range(len(counts))]
    return [slice(s, s + n) for s, n in zip(starts, counts, strict=True)]
