"""The vLLM plugin's FFN maths (loramix.vllm_plugin.mixture, plain torch) computes what MixLoraFFN computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.tiny_models import perturb_adapters, tiny_model
from loramix import MixLoraConfig, inject
from loramix.vllm_plugin.mixture import adapter_ffn, mixlora_ffn, route

CASES = {
    "topk": dict(router="topk", top_k=2),
    "topk_3": dict(router="topk", top_k=3),
    "noisy_topk": dict(router="noisy_topk", top_k=2),
    "switch": dict(router="switch"),
    "dense": dict(router="dense"),
    "top_p": dict(router="top_p", top_p=0.6),
    "adapter": dict(expert_type="adapter", router="topk", top_k=2),
    "up_down_only": dict(router="topk", top_k=2, expert_targets=["up", "down"]),
}
SERVED = {"noisy_topk": "topk"}


def layer_of(case: str):
    cfg = MixLoraConfig(num_experts=4, r=4, alpha=8, attn_r=0, dropout=0.0, **CASES[case])
    model = inject(tiny_model("llama"), cfg)
    perturb_adapters(model, scale=0.3)
    layer = model.model.layers[1].mlp.eval()
    with torch.no_grad():
        layer.router.balance_bias.copy_(torch.tensor([0.4, -0.3, 0.1, -0.2]))  # changes the choice
        if cfg.router == "switch":
            layer.router.capacity_factor = float("inf")  # served without capacity (see loramix.export.vllm)
    return layer, cfg


def transposed_b(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return a, b.transpose(1, 2)  # B as the plugin holds it: (E, r, out)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tokens", [3, 40])  # both paths of loramix and of the plugin (PAIRWISE_MAX_PAIRS)
def test_plugin_ffn_equals_mixlora_ffn(case, tokens):
    layer, cfg = layer_of(case)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = layer(x[None])[0]
        frozen = layer.frozen_weights()
        gate, up = x @ frozen["gate"].t(), x @ frozen["up"].t()
        router_w, bias = layer.router.export_state()
        rule = SERVED.get(cfg.router, cfg.router)
        weights, idx = route(x, router_w, bias, rule, cfg.top_k, cfg.top_p)
        loramix_routing = layer.router(x)
        if rule != "top_p":  # top_p's ids are every expert, sorted; compare the chosen sets by their weights
            assert torch.equal(idx.sort(-1).values, loramix_routing.indices.sort(-1).values)

        def down(h):
            return h @ frozen["down"].t()

        if cfg.expert_type == "adapter":
            a, b, scale = layer.adapter_state()
            got = adapter_ffn(x, down(F.silu(gate) * up), weights, idx, a, b.transpose(1, 2), torch.tensor([scale]))
        else:
            loras = {role: transposed_b(*layer.expert_weights(role).factors()) for role in layer.targets}
            got = mixlora_ffn(x, gate, up, down, weights, idx, loras, layer.expert_weights(layer.targets[0]).scaling)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_balance_bias_changes_the_choice():
    """The bias these tests set is live: without it some token picks other experts."""
    layer, cfg = layer_of("topk")
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(1))
    w, bias = layer.router.export_state()
    _, with_bias = route(x, w, bias, "topk", 2, 0.0)
    _, without = route(x, w, torch.zeros_like(bias), "topk", 2, 0.0)
    assert not torch.equal(with_bias.sort(-1).values, without.sort(-1).values)


def test_unknown_rule_named():
    with pytest.raises(ValueError, match="mixlora.router='soft'"):
        route(torch.zeros(1, 4), torch.zeros(2, 4), torch.zeros(2), "soft", 1, 0.5)
