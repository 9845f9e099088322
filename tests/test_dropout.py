"""FastDropout keeps nn.Dropout's distribution and gradient while drawing a cheaper mask on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers.tiny_models import tiny_model
from loramix import MixLoraConfig, inject
from loramix.dropout import FastDropout, fast_dropout, keep_mask


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_rate_matches_p_in_every_16_bit_lane(p: float) -> None:
    """Each of the four int16 lanes cut from one int64 draw keeps 1 - p of its elements (no biased lane)."""
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([400_000]), p)
    lanes = mask.view(-1, 4).float().mean(dim=0)  # element i comes from lane i % 4
    tol = 4 * (p * (1 - p) / 100_000) ** 0.5
    assert torch.allclose(lanes, torch.full_like(lanes, 1 - p), atol=tol), lanes


def test_masks_are_independent_between_calls_and_follow_the_seed() -> None:
    torch.manual_seed(1)
    a, b = keep_mask(torch.Size([10_000]), 0.5), keep_mask(torch.Size([10_000]), 0.5)
    assert 0.4 < (a == b).float().mean() < 0.6
    torch.manual_seed(1)
    assert torch.equal(keep_mask(torch.Size([10_000]), 0.5), a)


def test_values_and_gradient_are_the_masked_input_rescaled() -> None:
    torch.manual_seed(2)
    x = torch.randn(64, 48, requires_grad=True)
    y = fast_dropout(x, 0.2)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.8)
    assert 0.7 < kept.float().mean() < 0.9
    for dtype in (torch.bfloat16, torch.float64):  # the uint8 mask view never changes the result dtype
        assert fast_dropout(x.detach().to(dtype), 0.2).dtype == dtype


def test_eval_and_zero_p_are_identity_and_module_matches_nn_dropout_interface() -> None:
    x = torch.randn(8, 8)
    assert fast_dropout(x, 0.3, training=False) is x and fast_dropout(x, 0.0) is x
    module = FastDropout(0.3).eval()
    assert isinstance(module, nn.Dropout) and torch.equal(module(x), x)
    assert (fast_dropout(x, 1.0) == 0).all()


def test_injected_models_use_fast_dropout_everywhere() -> None:
    """The experts' dropout and PEFT's attention lora_dropout are all FastDropout after inject."""
    model = inject(tiny_model("llama"), MixLoraConfig(num_experts=2, r=4, attn_r=4, dropout=0.1, attn_dropout=0.1))
    kinds = {type(m) for n, m in model.named_modules() if isinstance(m, nn.Dropout) and ("lora" in n)}
    assert kinds == {FastDropout}
    assert sum(isinstance(m, FastDropout) for m in model.modules()) >= 2 * 4 + 2  # q/k/v/o per layer + experts


def test_unscaled_is_the_same_mask_without_the_rescale() -> None:
    x = torch.randn(64, 48)
    module = FastDropout(0.25).train()
    torch.manual_seed(5)
    full = module(x)
    torch.manual_seed(5)
    kept, factor = module.unscaled(x)
    assert factor == pytest.approx(1 / 0.75)
    torch.testing.assert_close(kept * factor, full)
    assert ((kept == 0) | (kept == x)).all() and (kept == 0).any()
    same, one = module.eval().unscaled(x)
    assert same is x and one == 1.0
