"""Compiled decoding of 30 MixLoRA layers (one token, token mask given), default options vs cpp_wrapper, against
the 30 base FFNs; also one layer hot. Session-5 figures in docs/benchmarks.md (run 8)::

    python scripts/decode_cpp_wrapper.py
"""

import statistics
import time

import torch
from decode_probe_setup import topk_decode_layers  # scripts/ is on sys.path when a script runs

layers, x, m = topk_decode_layers()

def t(f, n=30):
    with torch.no_grad():
        for _ in range(5):
            f()
        rs = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(n):
                f()
            rs.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(rs)


bffns = [layer.base for layer in layers]


def all_base():
    for f in bffns:
        f(x)


def all_mix():
    for layer in layers:
        layer._decode(x, m)


one = layers[0]
for opts in ({}, {"cpp_wrapper": True}):
    for layer in layers:
        layer.compile_decode(True, options=opts) if opts else layer.compile_decode(True)
    t0 = time.perf_counter()
    all_mix()
    print("compile s", round(time.perf_counter() - t0, 1))
    print(
        opts,
        "base x30",
        round(t(all_base), 2),
        "mix x30",
        round(t(all_mix), 2),
        "one hot",
        round(t(lambda: one._decode(x, m), 300), 3),
    )
