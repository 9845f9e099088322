"""Fixed cost of one call into a torch.compile'd function on this machine (x + 1 on a (1, 576) tensor), eager vs
compiled vs compiled with inductor's cpp_wrapper. Session-5 figures in docs/benchmarks.md (run 8)::

    python scripts/compiled_call_cost.py
"""

import statistics
import time

import torch

torch.set_num_threads(1)
x = torch.randn(1, 576)
f = torch.compile(lambda x: x + 1)
g = torch.compile(lambda x: x + 1, options={"cpp_wrapper": True})


def t(fn, n=2000):
    with torch.no_grad():
        for _ in range(50):
            fn(x)
        rs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                fn(x)
            rs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(rs)


print("eager us", t(lambda x: x + 1), "compiled us", t(f), "cpp_wrapper us", t(g))
