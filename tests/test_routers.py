"""Each routing rule on hand-made logits, with the expected experts and weights worked out by hand.

The routers are built with ``hidden_size == num_experts`` and an identity weight, so the logits are exactly
the input rows and every expected value below follows from the probabilities written in the test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers.tiny_models import ROUTER_NAMES, decoder_mlps, perturb_adapters, random_batch, tiny_model
from loramix import MixLoraConfig, config, inject, routers
from loramix.ffn_spec import check_targets, detect_ffn
from loramix.injection import get_state
from loramix.moe_layer import MixLoraFFN
from loramix.routers import build_router


def make_router(rule: str, num_experts: int = 4, **cfg: object) -> torch.nn.Module:
    """A router whose logits equal its input (identity weight), no jitter, no balance bias, train mode."""
    config = MixLoraConfig(num_experts=num_experts, router=rule, router_jitter=0.0, balance_bias_rate=0.0, **cfg)
    router = build_router(num_experts, num_experts, config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(num_experts))
    return router.train()


def logits_for(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is ``probs`` (each row sums to one)."""
    return torch.tensor(probs, dtype=torch.float32).log()


def chosen(routing) -> list[dict[int, float]]:
    """Per token: {expert: weight} over the valid slots (slot order does not matter)."""
    out = []
    for idx, w, m in zip(routing.indices.tolist(), routing.weights.tolist(), routing.mask.tolist(), strict=True):
        out.append({i: wi for i, wi, mi in zip(idx, w, m, strict=True) if mi})
    return out


def assert_choice(got: dict[int, float], want: dict[int, float]) -> None:
    assert set(got) == set(want), (got, want)
    for e, w in want.items():
        assert got[e] == pytest.approx(w, rel=1e-5, abs=1e-6), (e, got, want)


# --- top-k -------------------------------------------------------------------------------------------
def test_topk_keeps_the_k_most_probable_experts_and_renormalises() -> None:
    router = make_router("topk", top_k=2)
    probs = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.05, 0.05, 0.4]]
    r = router(logits_for(probs))
    # token 0: experts 3 (0.4) and 2 (0.3) -> 0.4/0.7 and 0.3/0.7; token 1: 0 (0.5) and 3 (0.4) -> 5/9 and 4/9
    want = [{3: 4 / 7, 2: 3 / 7}, {0: 5 / 9, 3: 4 / 9}]
    for got, w in zip(chosen(r), want, strict=True):
        assert_choice(got, w)
    torch.testing.assert_close(r.probs, torch.tensor(probs))  # the full softmax is kept for the aux loss
    assert r.indices.shape == (2, 2) and router.slots == 2


def test_topk_with_k_one_gives_weight_one() -> None:
    r = make_router("topk", top_k=1)(logits_for([[0.1, 0.6, 0.2, 0.1]]))
    assert chosen(r) == [{1: 1.0}]


def test_topk_ties_pick_distinct_experts_with_the_tied_weight() -> None:
    router = make_router("topk", top_k=2)
    logits = torch.tensor([[1.0, 1.0, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    got = chosen(router(logits))
    assert_choice(got[0], {0: 0.5, 1: 0.5})  # the tie is the whole selection: equal weights
    # tie at the k-th place: expert 0 and one of the tied experts 1, 2; weights e^2/(e^2+e) and e/(e^2+e)
    e = math.e
    assert 0 in got[1] and len(got[1]) == 2 and set(got[1]) - {0} <= {1, 2}
    tied = (set(got[1]) - {0}).pop()
    assert_choice(got[1], {0: e / (e + 1), tied: 1 / (e + 1)})
    assert len(got[2]) == 2 and all(w == pytest.approx(0.5) for w in got[2].values())  # two distinct experts


# --- top-p -------------------------------------------------------------------------------------------
def test_top_p_keeps_the_fewest_experts_reaching_p_including_the_crossing_one() -> None:
    router = make_router("top_p", top_p=0.75)
    probs = [
        [0.5, 0.3, 0.15, 0.05],  # 0.5 < 0.75, 0.5 + 0.3 = 0.8 >= 0.75: experts 0 and 1 (1 crosses p)
        [0.05, 0.15, 0.3, 0.5],  # the same, experts in reverse order: 3 and 2
        [0.3, 0.25, 0.25, 0.2],  # 0.3, 0.55, 0.8: three experts, the crossing one is the second 0.25
    ]
    want = [{0: 0.5 / 0.8, 1: 0.3 / 0.8}, {3: 0.5 / 0.8, 2: 0.3 / 0.8}, {0: 0.3 / 0.8, 1: 0.25 / 0.8, 2: 0.25 / 0.8}]
    r = router(logits_for(probs))
    for got, w in zip(chosen(r), want, strict=True):
        assert_choice(got, w)
    assert r.indices.shape == (3, 4)  # E slots, the unused ones masked out with weight 0
    assert (r.weights[~r.mask] == 0).all()


def test_top_p_uses_at_least_one_and_at_most_all_experts() -> None:
    # one expert alone reaches p: just that one, weight 1
    r = make_router("top_p", top_p=0.75)(logits_for([[0.05, 0.9, 0.03, 0.02]]))
    assert chosen(r) == [{1: 1.0}]
    # p smaller than every probability: still exactly one expert (the most probable)
    r = make_router("top_p", top_p=0.01)(logits_for([[0.1, 0.2, 0.3, 0.4]]))
    assert_choice(chosen(r)[0], {3: 1.0})
    # p = 1: every expert, weights = the probabilities (0.1 + 0.2 + 0.3 = 0.6 < 1 before the last one)
    r = make_router("top_p", top_p=1.0)(logits_for([[0.1, 0.2, 0.3, 0.4]]))
    assert_choice(chosen(r)[0], {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4})


# --- switch ------------------------------------------------------------------------------------------
def test_switch_picks_the_top_expert_with_weight_one() -> None:
    r = make_router("switch", capacity_factor=4.0)(logits_for([[0.1, 0.6, 0.2, 0.1], [0.4, 0.1, 0.2, 0.3]]))
    assert chosen(r) == [{1: 1.0}, {0: 1.0}]  # value exactly 1 (the probability only carries the gradient)
    assert r.indices.shape == (2, 1)


def test_switch_capacity_counts_real_tokens_only() -> None:
    """Two rows of four tokens, the first with two padding tokens: 6 real tokens, 2 experts, factor 1.0.

    Capacity = ceil(1.0 * 6 / 2) = 3; counting the 8 positions would give 4 and keep every real token.
    Expert 0 is preferred by real tokens 0, 1, 5, 6 (in order) and by both padding tokens: it keeps
    0, 1 and 5 and drops 6. Expert 1 takes tokens 4 and 7. Padding reaches no expert and uses no slot.
    """
    router = make_router("switch", num_experts=2, capacity_factor=1.0)
    to_0, to_1 = [2.0, 0.0], [0.0, 2.0]
    logits = torch.tensor([to_0, to_0, to_0, to_0, to_1, to_0, to_0, to_1])
    token_mask = torch.tensor([1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.bool)  # row 0 right-padded
    r = router(logits, token_mask)
    assert r.mask[:, 0].tolist() == [True, True, False, False, True, True, False, True]
    assert r.indices[:, 0].tolist() == [0, 0, 0, 0, 1, 0, 0, 1]
    assert r.weights[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    # with no padding the same 8 tokens give capacity 4: expert 0's six tokens keep their first four
    full = router(logits)
    assert full.mask[:, 0].tolist() == [True, True, True, True, True, False, False, True]


def test_switch_capacity_is_at_least_one() -> None:
    router = make_router("switch", num_experts=2, capacity_factor=0.1)  # ceil(0.1 * 3 / 2) = 1
    r = router(torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]))
    assert r.mask[:, 0].tolist() == [True, False, True]


def _switch_layer(capacity_factor: float) -> MixLoraFFN:
    """A float64 switch MixLoraFFN on a copy of a tiny Llama FFN, random experts, router sending all to 0."""
    mlp = copy.deepcopy(decoder_mlps(tiny_model("llama").double())[0]).requires_grad_(False)
    config = MixLoraConfig(num_experts=2, router="switch", capacity_factor=capacity_factor, dropout=0.0,
                           balance_bias_rate=0.0)
    spec = detect_ffn(mlp)
    layer = MixLoraFFN(mlp, spec, check_targets(spec, None, mlp), 2, config).double()
    perturb_adapters(layer, scale=0.3)
    with torch.no_grad():
        layer.mixlora_router.weight.zero_()
        layer.mixlora_router.weight[0, 0] = 1.0
    return layer


@pytest.mark.parametrize("path", ["fast", "reference", "pairwise"])
def test_switch_dropped_tokens_get_the_frozen_ffn(path: str) -> None:
    """Every token prefers expert 0; capacity ceil(0.5 * 6 / 2) = 2 keeps the first two real tokens, and the
    four dropped ones (and the padding) get exactly the frozen FFN's output."""
    layer = _switch_layer(capacity_factor=0.5)
    x = torch.randn(1, 8, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[..., 0] = x[..., 0].abs() + 1.0  # logit of expert 0 > 0 = logit of expert 1
    layer.token_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])  # left padding: 6 real tokens
    layer.use_reference = path == "reference"
    if path == "pairwise":
        layer.eval()
        layer.pairwise_max_pairs = 10**6
    else:
        layer.train()
    with torch.no_grad():
        out = layer(x)[0]
        frozen = layer.base(x)[0]
    kept = layer.last_routing.mask[:, 0]
    assert kept.tolist() == [False, False, True, True, False, False, False, False]
    torch.testing.assert_close(out[~kept], frozen[~kept], rtol=1e-12, atol=1e-12)
    assert (out[kept] - frozen[kept]).abs().amax(dim=-1).min() > 1e-3  # the kept tokens went through expert 0


# --- dense -------------------------------------------------------------------------------------------
def test_dense_mixes_every_expert_with_the_softmax_weights() -> None:
    router = make_router("dense")
    probs = [[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]
    r = router(logits_for(probs), torch.tensor([True, False]))
    assert_choice(chosen(r)[0], {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4})
    assert chosen(r)[1] == {}  # a padding token reaches no expert
    assert r.indices.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


@pytest.mark.parametrize("rule", ROUTER_NAMES)
def test_padding_reaches_no_expert(rule: str) -> None:
    router = make_router(rule, capacity_factor=4.0).eval()
    r = router(logits_for([[0.1, 0.2, 0.3, 0.4]] * 3), torch.tensor([True, False, True]))
    assert r.mask[0].any() and r.mask[2].any()
    assert not r.mask[1].any() and (r.weights[1] == 0).all()


# --- noisy top-k -------------------------------------------------------------------------------------
def test_noisy_topk_adds_noise_only_in_training() -> None:
    """Eval: logits are exactly x W^T, every call. Train: each logit gets N(0, softplus(x W_noise^T)^2) noise;
    with x = 1 and W_noise = diag(0, 0, 2, -30) the stds are ln 2, ln 2, ln(1 + e^2) = 2.1269 and ~0."""
    router = make_router("noisy_topk", top_k=2)
    with torch.no_grad():
        router.noise.weight.copy_(torch.diag(torch.tensor([0.0, 0.0, 2.0, -30.0])))
    x = torch.ones(20_000, 4)
    router.eval()
    clean = router(x)
    assert torch.equal(clean.logits, x) and torch.equal(router(x).indices, clean.indices)
    router.train()
    torch.manual_seed(0)
    noise = router(x).logits - x  # (T, E)
    want_std = torch.tensor([math.log(2), math.log(2), math.log1p(math.e**2), 0.0])
    torch.testing.assert_close(noise.std(dim=0), want_std, rtol=0.03, atol=1e-6)  # sample std: ~0.5 % error
    assert noise.mean(dim=0).abs().max() < 0.05  # zero-mean noise (4 standard errors of the largest std)


# --- balance bias ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["topk", "noisy_topk"])
def test_balance_bias_changes_selection_not_weights(rule: str) -> None:
    """Probabilities 0.4, 0.3, 0.2, 0.1 pick experts 0 and 1; a bias of +10 on expert 3 makes it win a slot,
    but the weights stay those of the unbiased probabilities: 0.4/0.5 and 0.1/0.5."""
    router = make_router(rule, top_k=2).eval()
    logits = logits_for([[0.4, 0.3, 0.2, 0.1]])
    assert_choice(chosen(router(logits))[0], {0: 0.4 / 0.7, 1: 0.3 / 0.7})
    with torch.no_grad():
        router.balance_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    r = router(logits)
    assert_choice(chosen(r)[0], {0: 0.8, 3: 0.2})
    torch.testing.assert_close(r.probs, torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    torch.testing.assert_close(r.logits, logits)  # the aux losses never see the bias either


def test_balance_bias_changes_switch_selection_not_its_gradient() -> None:
    """Switch picks the biased expert 3; its weight is 1 and carries the gradient of the unbiased p_3."""
    router = make_router("switch", capacity_factor=4.0)
    with torch.no_grad():
        router.balance_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    logits = logits_for([[0.4, 0.3, 0.2, 0.1]]).requires_grad_(True)
    r = router.select(logits, torch.ones(1, dtype=torch.bool))
    assert r.indices.tolist() == [[3]] and r.weights.tolist() == [[1.0]]
    (grad,) = torch.autograd.grad(r.weights.sum(), logits)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    torch.testing.assert_close(grad[0], p[3] * (torch.eye(4)[3] - p))  # d p_3 / d logits = p_3 (e_3 - p)


@pytest.mark.parametrize("rule", ["dense", "top_p"])
def test_balance_bias_has_no_effect_on_dense_and_top_p(rule: str) -> None:
    router = make_router(rule, top_p=0.75)
    logits = logits_for([[0.5, 0.3, 0.15, 0.05]])
    before = router(logits)
    with torch.no_grad():
        router.balance_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    after = router(logits)
    assert torch.equal(after.indices, before.indices) and torch.equal(after.mask, before.mask)
    assert torch.equal(after.weights, before.weights)


# --- gradient paths ----------------------------------------------------------------------------------
def test_switch_weight_carries_the_router_probability_gradient() -> None:
    """Straight-through: value 1, gradient d p_top / d logits = p_top (e_top - p), hand-derived."""
    router = make_router("switch", capacity_factor=4.0)
    probs = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.4, 0.1, 0.2, 0.3]])
    logits = probs.log().requires_grad_(True)
    r = router.select(logits, torch.ones(2, dtype=torch.bool))
    assert r.weights.tolist() == [[1.0], [1.0]]
    (grad,) = torch.autograd.grad(r.weights.sum(), logits)
    want = torch.stack([probs[0, 1] * (torch.eye(4)[1] - probs[0]), probs[1, 0] * (torch.eye(4)[0] - probs[1])])
    torch.testing.assert_close(grad, want)


def _lm_only_model(router: str) -> torch.nn.Module:
    """Tiny Llama with every aux coefficient 0 and no balance bias: only the LM loss can train the router."""
    config = MixLoraConfig(num_experts=4, top_k=2, r=4, attn_r=0, dropout=0.0, router=router, balance_coef=0.0,
                           z_loss_coef=0.0, entropy_coef=0.0, balance_bias_rate=0.0, capacity_factor=2.0)
    model = inject(tiny_model("llama"), config).train()
    perturb_adapters(model)
    return model


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_router_learns_from_the_lm_loss_alone(router: str) -> None:
    model = _lm_only_model(router)
    ids, mask = random_batch(batch=2, seq=12)
    torch.manual_seed(0)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert out.aux_loss == 0  # the loss is the LM loss alone
    out.loss.backward()
    layers = list(get_state(model).moe_layers.values())
    assert len(layers) == 2
    for layer in layers:
        grad = layer.mixlora_router.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"{router}: router got no gradient from the LM loss"
        if router == "noisy_topk":  # the learned noise scale gets one too
            noise_grad = layer.mixlora_router.noise.weight.grad
            assert noise_grad is not None and noise_grad.abs().sum() > 0


# --- the registry ------------------------------------------------------------------------------------
def test_every_router_class_is_registered_and_documented() -> None:
    """One registry (loramix.config.ROUTERS): every Router class in routers.py has a name in it, and the
    ``router`` field's help (the CLI's --router and docs/configuration.md) lists exactly its names."""
    from loramix.cli.reference import configuration_markdown

    classes = {c for c in vars(routers).values() if isinstance(c, type) and issubclass(c, routers.Router)}
    assert set(routers.ROUTERS.values()) == classes - {routers.Router}
    row = next(line for line in configuration_markdown().splitlines() if line.startswith("| `router` |"))
    listed = row.split("One of", 1)[1].split(".")[0]
    assert [n.strip() for n in listed.split(",")] == list(config.ROUTERS)
