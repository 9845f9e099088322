"""Cost of the compiled decoding step per token: the 30 MixLoRA layers' compiled calls (one token, hot caches)
through the tensor function ``decode_step`` against the compiled method ``route_pairwise`` (the session-5 path,
whose guards walk the module tree), and the 30 frozen base FFNs alone. Session-6 figures in docs/benchmarks.md::

    python scripts/decode_step_cost.py
"""

import statistics
import time

import torch

from loramix.bench import fresh_copy, frozen_base, make_loramix
from loramix.compiled import moe_layers
from loramix.layer import MixLoraFFN

torch.set_num_threads(1)
torch.manual_seed(0)
mix, _ = make_loramix(fresh_copy(frozen_base()), router="topk")
mix.eval()
layers = moe_layers(mix)
for layer in layers:
    for p in layer.parameters():
        if p.dim() == 3:
            p.data.normal_(0, 0.02)
    layer.compile_decode(True)
method = torch.compile(MixLoraFFN.route_pairwise)
x = torch.randn(1, 576)
m = torch.ones(1, dtype=torch.bool)


def per_token_ms(call, n: int = 30) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            for layer in layers:
                call(layer)
    return (time.perf_counter() - t0) / n * 1e3


paths = {
    "decode_step": lambda layer: layer._decode(x, m),
    "method": lambda layer: method(layer, x, m),
    "base FFN": lambda layer: layer.base(x),
}
with torch.no_grad():
    eager = layers[5].route_pairwise(x, m)[0]
    print("max |diff| from eager: decode_step %.2e, method %.2e" % (
        (layers[5]._decode(x, m)[0] - eager).abs().max(), (method(layers[5], x, m)[0] - eager).abs().max()))
for call in paths.values():
    per_token_ms(call, 3)
times: dict[str, list[float]] = {name: [] for name in paths}
for _ in range(7):
    for name, call in paths.items():
        times[name].append(per_token_ms(call))
med = {name: statistics.median(t) for name, t in times.items()}
print("ms per token over 30 layers (median of 7):", {k: round(v, 2) for k, v in med.items()})
print("over the base FFNs: decode_step +%.2f ms, method +%.2f ms" % (
    med["decode_step"] - med["base FFN"], med["method"] - med["base FFN"]))
