"""Dynamo guard cost of compiled decoding: 30 MixLoRA layers' compiled decode calls (one token, hot caches) with
guards evaluated and with torch.compiler.set_stance(skip_guard_eval_unsafe=True), against the 30 base FFNs. Session-5
figures in docs/benchmarks.md (run 8)::

    python scripts/decode_guard_cost.py
"""

import statistics
import time

import torch
from decode_probe_setup import topk_decode_layers  # scripts/ is on sys.path when a script runs

layers, x, m = topk_decode_layers()
for layer in layers:
    layer.compile_decode(True)

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
