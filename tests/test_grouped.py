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
