"""Auxiliary-loss-free balancing: a selection-only per-expert bias that moves towards even load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.tiny_models import random_batch, tiny_model
from loramix import MixLoraConfig, inject, load_adapter, save_adapter
from loramix.injection import get_state
from loramix.losses import tokens_per_expert

E = 4


def skewed_model(rate: float, router: str = "topk", seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose routers all prefer expert 0 by a wide margin (the collapse seen at init on real
    models, where a direction shared by all hidden states dominates the random router)."""
    model = inject(
        tiny_model("llama", seed=seed),
        MixLoraConfig(num_experts=E, top_k=2, r=4, attn_r=0, dropout=0.0, router=router, balance_bias_rate=rate),
    )
    inputs = {}
    layers = list(get_state(model).moe_layers.values())
    hooks = [m.register_forward_pre_hook(lambda m, a: inputs.__setitem__(m, a[0].reshape(-1, a[0].shape[-1])))
             for m in layers]
    ids, mask = random_batch(batch=4, seq=16)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        for h in hooks:
            h.remove()
        for layer in layers:
            x = inputs[layer]  # (T, H) the router's input
            w = layer.mixlora_router.weight
            w.normal_(std=0.02)
            w[0] += 2.0 * x.mean(dim=0) / x.mean(dim=0).norm() ** 2  # the shared direction favours expert 0
    return model


def shares(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(L, E) fraction of each layer's assignments per expert, from an eval forward."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    model.train(was_training)
    rows = []
    for layer in get_state(model).moe_layers.values():
        r = layer.last_routing
        counts = tokens_per_expert(r.indices, r.mask, layer.num_experts).float()
        rows.append(counts / counts.sum())
    return torch.stack(rows)


def train_forwards(model: torch.nn.Module, n: int, ids: torch.Tensor, mask: torch.Tensor) -> None:
    model.train()
    with torch.no_grad():
        for _ in range(n):
            model(input_ids=ids, attention_mask=mask, labels=ids)


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch"])
def test_bias_restores_balance_of_a_collapsed_router(router: str) -> None:
    """Training forwards with a bias rate spread a collapsed routing; without one nothing changes."""
    ids, mask = random_batch(batch=4, seq=16)
    fixed, moving = skewed_model(0.0, router), skewed_model(0.05, router)
    before = shares(moving, ids, mask)
    assert before[:, 0].min() > 0.35  # collapsed onto expert 0 (uniform share is 0.25)
    train_forwards(fixed, 30, ids, mask)
    train_forwards(moving, 60, ids, mask)
    assert torch.equal(shares(fixed, ids, mask), before)
    after = shares(moving, ids, mask)
    assert after[:, 0].max() < 0.35 and after.min() > 0.1, after
    for layer in get_state(moving).moe_layers.values():
        assert layer.mixlora_router.balance_bias[0] < 0  # the favourite is pushed down


def test_bias_picks_experts_but_never_changes_mixing_weights() -> None:
    """The kept weights are the softmax of the unbiased logits over the chosen experts, renormalised."""
    model = skewed_model(0.0)
    layer = next(iter(get_state(model).moe_layers.values()))
    router = layer.mixlora_router
    x = torch.randn(10, router.weight.shape[1])
    with torch.no_grad():
        router.balance_bias.copy_(torch.tensor([0.0, 0.0, 50.0, 50.0]))
    routing = router(x)
    assert (routing.indices.sort(dim=-1).values == torch.tensor([2, 3])).all()
    probs = (x @ router.weight.T).softmax(dim=-1)  # (T, E) without the bias
    kept = probs[:, 2:]
    torch.testing.assert_close(routing.weights.sort(dim=-1).values, (kept / kept.sum(-1, keepdim=True)).sort(-1).values)
    torch.testing.assert_close(routing.probs, probs)


def test_eval_forwards_and_generation_leave_the_bias_alone() -> None:
    ids, mask = random_batch(batch=2, seq=8)
    model = skewed_model(0.05)
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask, labels=ids)
    for layer in get_state(model).moe_layers.values():
        assert not layer.mixlora_router.balance_bias.any() and not layer.mixlora_router.balance_pending.any()


def test_update_waits_for_the_next_training_forward() -> None:
    """Counts of a forward are applied at the start of the next one, so activation checkpointing, which re-runs
    the layers in backward, picks the same experts as the forward it replays."""
    ids, mask = random_batch(batch=2, seq=8)
    model = skewed_model(0.05)
    train_forwards(model, 1, ids, mask)
    router = next(iter(get_state(model).moe_layers.values())).mixlora_router
    assert not router.balance_bias.any() and router.balance_pending.sum() == 2 * int(mask.sum())
    train_forwards(model, 1, ids, mask)
    assert router.balance_bias.any()


def test_gradient_checkpointing_gives_the_same_gradients_with_a_moving_bias() -> None:
    ids, mask = random_batch(batch=2, seq=8)
    grads = []
    for checkpointing in (False, True):
        model = skewed_model(0.05)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for _ in range(3):  # the bias moves before each forward
            model.zero_grad()
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_bias_is_saved_and_old_adapters_without_it_still_load(tmp_path) -> None:
    ids, mask = random_batch(batch=2, seq=8)
    model = skewed_model(0.05)
    train_forwards(model, 5, ids, mask)
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(tiny_model("llama"), tmp_path / "a")
    for (_, a), (_, b) in zip(get_state(model).moe_layers.items(), get_state(loaded).moe_layers.items(), strict=True):
        assert a.mixlora_router.balance_bias.any()
        assert torch.equal(a.mixlora_router.balance_bias, b.mixlora_router.balance_bias)
        assert torch.equal(a.mixlora_router.balance_pending, b.mixlora_router.balance_pending)
    # an adapter written before the buffers existed: same file without them (checksum rewritten)
    import json

    from loramix.checkpoint import sha256_file

    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "balance_" not in k}, tmp_path / "a" / "adapter_model.safetensors")
    meta_path = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = sha256_file(tmp_path / "a" / "adapter_model.safetensors")
    meta_path.write_text(json.dumps(meta))
    old = load_adapter(tiny_model("llama"), tmp_path / "a")
    for layer in get_state(old).moe_layers.values():
        assert not layer.mixlora_router.balance_bias.any()


def test_rate_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="balance_bias_rate"):
        MixLoraConfig(balance_bias_rate=-0.1)
