"""The vLLM plugin's FFN maths (loramix.vllm_plugin.mixture, plain torch) computes what MixLoraFFN computes: the
plain reference functions and the serving functions the plugin runs, on both of the serving functions' routes
(gathered experts for a few pairs, every expert at once otherwise and inside a compiled graph)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import loramix.vllm_plugin.mixture as mixture
from helpers.tiny_models import perturb_adapters, tiny_model
from loramix import MixLoraConfig, inject
from loramix.profiling import OpCounter
from loramix.vllm_plugin.mixture import (
    ServingLayout,
    adapter_ffn,
    adapter_ffn_serving,
    mixlora_ffn,
    mixlora_ffn_serving,
    route,
    serve_route,
)

CASES = {
    "topk": dict(router="topk", top_k=2),
    "topk_3": dict(router="topk", top_k=3),
    "noisy_topk": dict(router="noisy_topk", top_k=2),
    "switch": dict(router="switch"),
    "dense": dict(router="dense"),
    "top_p": dict(router="top_p", top_p=0.6),
    "adapter": dict(expert_type="adapter", router="topk", top_k=2),
    "up_down_only": dict(router="topk", top_k=2, expert_targets=["up", "down"]),
    "gate_only": dict(router="topk", top_k=2, expert_targets=["gate"]),
    "uneven_counts": dict(router="topk", top_k=2, num_experts=[4, 3]),  # layer 1 has 3 experts
}
SERVED = {"noisy_topk": "topk"}


def layer_of(case: str):
    cfg = MixLoraConfig(**(dict(num_experts=4, r=4, alpha=8, attn_r=0, dropout=0.0) | CASES[case]))
    model = inject(tiny_model("llama"), cfg)
    perturb_adapters(model, scale=0.3)
    layer = model.model.layers[1].mlp.eval()
    with torch.no_grad():
        layer.router.balance_bias.copy_(torch.tensor([0.4, -0.3, 0.1, -0.2])[:layer.num_experts])  # changes the choice
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


def serving_output(layer, cfg, x: torch.Tensor) -> torch.Tensor:
    """What the plugin's MixLoraMLP computes for x (T, H): the serving route and layout, as plain torch."""
    frozen = layer.frozen_weights()
    gate_up = x @ torch.cat([frozen["gate"], frozen["up"]]).t()  # (T, 2I) vLLM's merged gate/up
    router_w, bias = layer.router.export_state()
    weights, idx = serve_route(x, router_w, bias, SERVED.get(cfg.router, cfg.router), min(cfg.top_k,
                               layer.num_experts), cfg.top_p)
    offsets = torch.arange(2 * cfg.r)

    def down(h):
        return h @ frozen["down"].t()

    if cfg.expert_type == "adapter":
        a, b, scale = layer.adapter_state()
        frozen_out = down(mixture.silu_and_mul(gate_up))
        return adapter_ffn_serving(x, frozen_out, weights, idx, ServingLayout.from_adapters(a, b),
                                   torch.tensor([scale]), offsets)
    loras = {role: layer.expert_weights(role).factors() for role in layer.targets}
    layout = ServingLayout.from_factors(loras, layer.expert_weights(layer.targets[0]).scaling)
    return mixlora_ffn_serving(x, gate_up, down, weights, idx, layout, offsets)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("gathered", [True, False])  # the serving route's two ways to the pairs' A x
def test_serving_path_equals_mixlora_ffn(case, tokens, gathered, monkeypatch):
    """The plugin's serving functions (scaling folded into B, gate/up stacked, B rows read with embedding_bag,
    topk weights as a softmax of the chosen logits) give MixLoraFFN's output, within 1e-5."""
    if not gathered:  # what a compiled graph runs for any batch size
        monkeypatch.setattr(mixture, "PAIRWISE_MAX_PAIRS", 0)
    layer, cfg = layer_of(case)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = layer(x[None])[0]
        got = serving_output(layer, cfg, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["topk", "switch", "dense", "top_p"])
def test_serve_route_equals_route(rule):
    """serve_route chooses the same experts as the reference route, with the same weights."""
    gen = torch.Generator().manual_seed(3)
    x, w, bias = torch.randn(50, 32, generator=gen), torch.randn(6, 32, generator=gen), torch.randn(6, generator=gen)
    want_w, want_idx = route(x, w, bias, rule, 2, 0.6)
    got_w, got_idx = serve_route(x, w, bias, rule, 2, 0.6)
    assert torch.equal(got_idx, want_idx)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=1e-7)


def test_serving_decode_runs_fewer_ops():
    """One decoding token through the serving path dispatches fewer aten ops than through the reference (the
    weights prepared beforehand, as the plugin's loading does)."""
    layer, cfg = layer_of("topk")
    x = torch.randn(1, 32)
    with torch.no_grad():
        frozen = layer.frozen_weights()
        gate_up_w = torch.cat([frozen["gate"], frozen["up"]])  # (2I, H)
        router_w, bias = layer.router.export_state()
        loras = {role: layer.expert_weights(role).factors() for role in layer.targets}
        scaling = layer.expert_weights("gate").scaling
        layout, offsets = ServingLayout.from_factors(loras, scaling), torch.arange(2 * cfg.r)
        kept = {role: transposed_b(*ab) for role, ab in loras.items()}

        def down(h):
            return F.linear(h, frozen["down"])

        with OpCounter() as serving:
            weights, idx = serve_route(x, router_w, bias, "topk", 2, 0.0)
            mixlora_ffn_serving(x, F.linear(x, gate_up_w), down, weights, idx, layout, offsets)
        with OpCounter() as reference:
            gate, up = F.linear(x, gate_up_w).split(gate_up_w.shape[0] // 2, dim=-1)
            weights, idx = route(x, router_w, bias, "topk", 2, 0.0)
            mixlora_ffn(x, gate, up, down, weights, idx, kept, scaling)
    assert serving.kernels < reference.kernels, (serving.counts, reference.counts)
