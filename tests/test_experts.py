"""loramix.experts: the frozen-FFN surface every mixture builds on, and the expert weights."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers.moe_layers import base_mlp, make_layer
from loramix.continual.experts import GrowableFFN
from loramix.experts import ExpertLoRA, FrozenFFN
from loramix.ffn_spec import detect_ffn, linear_shape
from loramix.moe_layer import MixLoraFFN

ARCHS = ["llama", "gpt2", "gemma"]


def _frozen(arch: str) -> FrozenFFN:
    mlp = copy.deepcopy(base_mlp(arch)).eval()  # eval: GPT-2's output dropout off
    return FrozenFFN(mlp, detect_ffn(mlp))


@pytest.mark.parametrize("arch", ARCHS)
def test_frozen_pieces_rebuild_the_models_own_ffn(arch):
    """projections -> activation -> down -> finish is exactly the model's FFN (gated or not, with biases)."""
    ffn = _frozen(arch)
    x = torch.randn(7, 32, dtype=torch.float64)
    up, gate = ffn.frozen_projections(x, torch.float64)  # (7, I) each
    assert (gate is not None) == ffn.spec.gated
    out = ffn.finish(ffn.project_down(ffn.activation(up, gate), torch.ones(7, dtype=torch.float64), torch.float64))
    torch.testing.assert_close(out, ffn.base(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(ffn.frozen_forward(x), ffn.base(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_project_down_counts_the_bias_once_per_unit_of_routing_weight(arch):
    """down(sum_e w_e h_e) with coverage sum_e w_e equals the mixture of FFN outputs sum_e w_e down(h_e)."""
    ffn = _frozen(arch)
    torch.manual_seed(0)
    intermediate, _ = linear_shape(ffn.proj("down"))
    h = torch.randn(3, 5, intermediate, dtype=torch.float64)  # (E, T, I)
    w = torch.rand(3, 5, dtype=torch.float64)  # (E, T) weights that do not sum to 1
    mixed = (w[..., None] * h).sum(0)  # (T, I)
    expected = sum(w[e][:, None] * ffn.proj("down")(h[e]) for e in range(3))  # (T, H)
    torch.testing.assert_close(ffn.project_down(mixed, w.sum(0), torch.float64), expected, rtol=1e-12, atol=1e-12)
    if arch == "gpt2":  # GPT-2's down projection has a bias: without the correction the two differ
        assert not torch.allclose(ffn.proj("down")(mixed), expected)


def test_every_ffn_wrapper_is_a_frozen_ffn_keeping_the_base_under_the_same_keys():
    """MixLoraFFN and continual's GrowableFFN share FrozenFFN; the frozen weights stay under ``base.``."""
    layer = make_layer("llama")
    mlp = copy.deepcopy(base_mlp("llama"))
    grow = GrowableFFN(mlp, detect_ffn(mlp), ["gate", "up", "down"], r=4, alpha=8.0, dropout=0.0)
    for module in (layer, grow):
        assert isinstance(module, FrozenFFN)
        base_keys = {k for k in module.state_dict() if k.startswith("base.")}
        assert base_keys == {f"base.{k}" for k in mlp.state_dict()}
    assert isinstance(layer, MixLoraFFN)


def test_expert_lora_starts_at_zero_and_matches_its_formula():
    lora = ExpertLoRA(num_experts=2, in_features=6, out_features=5, r=3, scaling=2.0).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.count_nonzero(lora.expert(x, 1)) == 0  # B = 0 at init
    torch.nn.init.normal_(lora.lora_B)
    torch.testing.assert_close(lora.expert(x, 1), 2.0 * x @ lora.lora_A[1].t() @ lora.lora_B[1].t())
