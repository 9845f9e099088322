"""Auxiliary router losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from loramix import MixLoraConfig
from loramix.losses import aux_loss, load_balance_loss, router_entropy, tokens_per_expert, z_loss
from loramix.routers import Routing, build_router

# 4 tokens, 2 experts, top-1 routing
PROBS = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
INDICES = torch.tensor([[0], [0], [0], [1]])
ALL_SLOTS = torch.ones(4, 1, dtype=torch.bool)
ALL_TOKENS = torch.ones(4, dtype=torch.bool)


def test_load_balance_loss_hand_computed() -> None:
    """E * sum_e f_e P_e with f = fraction of assignments, P = mean probability."""
    # f = [3/4, 1/4]; P = [(0.9+0.8+0.6+0.3)/4, (0.1+0.2+0.4+0.7)/4] = [0.65, 0.35]
    expected = 2 * (0.75 * 0.65 + 0.25 * 0.35)  # = 1.15
    got = load_balance_loss(PROBS, INDICES, ALL_SLOTS, ALL_TOKENS)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(1.15)


def test_load_balance_loss_top2_hand_computed() -> None:
    """With two slots per token f counts every valid (token, slot) assignment."""
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    indices = torch.tensor([[0, 1], [1, 2]])
    # assignments: e0 once, e1 twice, e2 once -> f = [1/4, 2/4, 1/4]; P = [0.35, 0.4, 0.25]
    expected = 3 * (0.25 * 0.35 + 0.5 * 0.4 + 0.25 * 0.25)
    slots, tokens = torch.ones(2, 2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    got = load_balance_loss(probs, indices, slots, tokens)
    assert got.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_load_balance_loss_is_one_when_balanced(num_experts: int) -> None:
    """Uniform probabilities and equal token counts give exactly 1."""
    tokens = 4 * num_experts
    probs = torch.full((tokens, num_experts), 1.0 / num_experts)
    indices = (torch.arange(tokens) % num_experts)[:, None]
    slots, real = torch.ones(tokens, 1, dtype=torch.bool), torch.ones(tokens, dtype=torch.bool)
    got = load_balance_loss(probs, indices, slots, real)
    assert got.item() == pytest.approx(1.0, abs=1e-6)


def test_load_balance_loss_grows_with_imbalance() -> None:
    """Collapsing onto one expert raises the loss above 1, towards E for full collapse."""
    e, t = 4, 16
    tm = torch.ones(t, dtype=torch.bool)
    sm = torch.ones(t, 1, dtype=torch.bool)
    half = torch.tensor([[0.55, 0.15, 0.15, 0.15]]).repeat(t, 1)
    collapsed = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(t, 1)
    to_zero = torch.zeros(t, 1, dtype=torch.long)
    mild = load_balance_loss(half, to_zero, sm, tm).item()
    strong = load_balance_loss(collapsed, to_zero, sm, tm).item()
    assert 1.0 < mild < strong < e
    assert strong == pytest.approx(e * 0.97, abs=1e-5)


def test_load_balance_loss_ignores_padding() -> None:
    """Padding tokens (token_mask False, slots masked) change neither f nor P."""
    pad_probs = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    probs = torch.cat([PROBS, pad_probs])
    indices = torch.cat([INDICES, torch.tensor([[1], [1]])])
    token_mask = torch.tensor([True] * 4 + [False] * 2)
    slots = token_mask[:, None].clone()
    got = load_balance_loss(probs, indices, slots, token_mask)
    assert got.item() == pytest.approx(1.15, abs=1e-6)


def test_padding_excluded_end_to_end_through_a_router() -> None:
    """Appending padding tokens to a routed batch leaves the balance loss, z-loss, entropy and counts
    unchanged."""
    torch.manual_seed(0)
    router = build_router(8, 4, MixLoraConfig(num_experts=4, top_k=2, router_init_scale=0.5))
    x = torch.randn(6, 8)
    pad = torch.randn(5, 8) * 10  # wild padding activations must not matter
    clean = router(x)
    padded = router(torch.cat([x, pad]), torch.tensor([True] * 6 + [False] * 5))
    assert not padded.mask[6:].any()
    for fn in (
        lambda r: load_balance_loss(r.probs, r.indices, r.mask, r.token_mask),
        lambda r: z_loss(r.logits, r.token_mask),
        lambda r: router_entropy(r.probs, r.token_mask),
    ):
        torch.testing.assert_close(fn(padded), fn(clean))
    counts = [tokens_per_expert(r.indices, r.mask, 4) for r in (padded, clean)]
    assert torch.equal(*counts)


def test_tokens_per_expert_counts_valid_slots() -> None:
    """tokens_per_expert counts only valid slots and reports every expert, used or not."""
    indices = torch.tensor([[0, 2], [2, 1], [2, 0]])
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    assert tokens_per_expert(indices, mask, 4).tolist() == [2, 0, 2, 0]


def test_z_loss_hand_computed() -> None:
    """z-loss = mean over real tokens of logsumexp(logits)^2."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]])
    token_mask = torch.tensor([True, True, False])
    # logsumexp: log 2, log 4 (the padding row is ignored)
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert z_loss(logits, token_mask).item() == pytest.approx(expected, abs=1e-6)


def test_entropy_hand_computed() -> None:
    """Router entropy = mean over real tokens of -sum p log p (nats); one-hot rows contribute 0."""
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    token_mask = torch.tensor([True, True, True, False])
    h3 = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    expected = (math.log(2.0) + 0.0 + h3) / 3
    assert router_entropy(probs, token_mask).item() == pytest.approx(expected, abs=1e-6)


def test_losses_have_router_gradients() -> None:
    """Balance and z-loss give the router weight a gradient (they are trained, not just reported)."""
    torch.manual_seed(0)
    router = build_router(8, 4, MixLoraConfig(num_experts=4, top_k=1, router_init_scale=0.5))
    r = router(torch.randn(16, 8))
    for loss in (load_balance_loss(r.probs, r.indices, r.mask, r.token_mask), z_loss(r.logits, r.token_mask)):
        (g,) = torch.autograd.grad(loss, router.weight, retain_graph=True)
        assert g.abs().sum() > 0


def _routing(probs: torch.Tensor, indices: torch.Tensor) -> Routing:
    mask = torch.ones_like(indices, dtype=torch.bool)
    return Routing(weights=torch.ones(indices.shape), indices=indices, mask=mask, logits=probs.log(), probs=probs,
                   token_mask=torch.ones(probs.shape[0], dtype=torch.bool))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_aux_loss_assembles_weighted_layer_losses_and_pads_the_counts(reduction: str) -> None:
    """Two layers (2 and 3 experts): aux is the coefficient-weighted sum (or mean) over layers of each loss;
    the tokens-per-expert table is (L, E_max), zero-padded; zero coefficients drop their term."""
    first = _routing(PROBS, INDICES)
    probs3 = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2], [0.4, 0.4, 0.2]])
    second = _routing(probs3, torch.tensor([[0], [2], [1], [0]]))
    cfg = MixLoraConfig(balance_coef=0.1, z_loss_coef=0.01, entropy_coef=0.05, aux_layer_reduction=reduction)
    aux, stats = aux_loss([(first, 2), (second, 3)], cfg)
    combine = torch.sum if reduction == "sum" else torch.mean
    terms = {
        0.1: [load_balance_loss(r.probs, r.indices, r.mask, r.token_mask) for r in (first, second)],
        0.01: [z_loss(r.logits, r.token_mask) for r in (first, second)],
        0.05: [router_entropy(r.probs, r.token_mask) for r in (first, second)],
    }
    expected = sum(coef * combine(torch.stack(values)) for coef, values in terms.items())
    torch.testing.assert_close(aux, expected)
    assert stats["tokens_per_expert"].tolist() == [[3, 1, 0], [2, 1, 1]]
    no_z = MixLoraConfig(balance_coef=0.1, z_loss_coef=0.0, entropy_coef=0.05, aux_layer_reduction=reduction)
    torch.testing.assert_close(aux_loss([(first, 2), (second, 3)], no_z)[0], expected - 0.01 * combine(
        torch.stack(terms[0.01])))
    with pytest.raises(ValueError, match="at least one MoE layer"):
        aux_loss([], cfg)
