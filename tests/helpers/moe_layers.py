"""MixLoraFFN fixtures shared by the layer, grouped, fused and precision tests: a float64 layer on a tiny model's
FFN, one forward + backward of it on either path, and a record of the fused passes that ran."""

from __future__ import annotations

import copy
import functools

import torch

import loramix.fused as fused
from loramix import MixLoraConfig
from loramix.ffn_spec import check_targets, detect_ffn
from loramix.moe_layer import MixLoraFFN

from .tiny_models import decoder_mlps, perturb_adapters, randomize_biases, tiny_model


@functools.cache
def base_mlp(arch: str) -> torch.nn.Module:
    """Layer 0's FFN of a tiny float64 model with random biases (built once per family)."""
    model = randomize_biases(tiny_model(arch).double())  # GPT-2's zero-init biases would hide bias bugs
    return decoder_mlps(model)[0]


def make_layer(
    arch: str, router: str = "topk", expert_type: str = "mixlora", num_experts: int = 4,
    targets: list[str] | None = None, **cfg: object,
) -> MixLoraFFN:
    """A MixLoraFFN (float64, train mode, dropout 0) on a copy of layer 0's FFN, with random adapters."""
    mlp = copy.deepcopy(base_mlp(arch))
    if hasattr(mlp, "dropout"):  # GPT-2's own output dropout would differ between two calls
        mlp.dropout.p = 0.0
    mlp.requires_grad_(False)
    config = MixLoraConfig(
        num_experts=num_experts, top_k=2, router=router, expert_type=expert_type, dropout=0.0,
        expert_targets=targets, router_jitter=0.05, **cfg,
    )
    spec = detect_ffn(mlp)
    layer = MixLoraFFN(mlp, spec, check_targets(spec, targets, mlp), num_experts, config).double()
    perturb_adapters(layer, scale=0.3)
    return layer.train()


def run_layer(layer: MixLoraFFN, x: torch.Tensor, reference: bool, token_mask: torch.Tensor | None = None):
    """Forward + backward of a fixed random projection of the output; returns (out, routing, grads)."""
    layer.use_reference = reference
    layer.token_mask = token_mask
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)  # noisy router and jitter draw the same noise on both paths
    out = layer(x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype).to(out.device)
    params = dict((n, p) for n, p in layer.named_parameters() if p.requires_grad)
    grads = torch.autograd.grad((out * probe).sum(), [x, *params.values()], allow_unused=True)
    named = {"input": grads[0]}
    for (n, p), g in zip(params.items(), grads[1:], strict=True):
        named[n] = torch.zeros_like(p) if g is None else g
    return out.detach(), layer.last_routing, named


def count_fused_calls(monkeypatch) -> list[str]:  # noqa: ANN001
    """The names of the fused passes run from now on (through :func:`loramix.fused.run`), in order."""
    calls: list[str] = []
    run = fused.run

    def counting(fn, *args):  # noqa: ANN001, ANN202
        calls.append(fn.__name__)
        return run(fn, *args)

    monkeypatch.setattr(fused, "run", counting)
    return calls
