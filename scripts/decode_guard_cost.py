"""Dynamo guard cost of compiled decoding: 30 MixLoRA layers' compiled decode calls (one token, hot caches) with
guards evaluated and with torch.compiler.set_stance(skip_guard_eval_unsafe=True), against the 30 base FFNs. Session-5
figures in docs/benchmarks.md (run 8)::

    python scripts/decode_guard_cost.py
"""

import statistics
import time

import torch

from loramix.bench import _load_base, fresh_copy, make_loramix
from loramix.compiled import moe_layers

torch.set_num_threads(1)
torch.manual_seed(0)
base = _load_base(None, torch.device("cpu"), "float32").eval()
base.requires_grad_(False)
mix, _ = make_loramix(fresh_copy(base), router="topk")
mix.eval()
layers = moe_layers(mix)
for layer in layers:
    for p in layer.parameters():
        if p.dim() == 3:
            p.data.normal_(0, 0.02)
    layer.compile_decode(True)
x = torch.randn(1, 576)
m = torch.ones(1, dtype=torch.bool)


def run(n=30):
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            for layer in layers:
                layer._decode(x, m)
    return (time.perf_counter() - t0) / n * 1e3


def runb(n=30):
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            for layer in layers:
                layer.base(x)
    return (time.perf_counter() - t0) / n * 1e3


run(3)
a, b, c = [], [], []
for _ in range(7):
    a.append(run())
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        b.append(run())
    c.append(runb())
print(
    "guards",
    round(statistics.median(a), 2),
    "skip",
    round(statistics.median(b), 2),
    "base",
    round(statistics.median(c), 2),
)
