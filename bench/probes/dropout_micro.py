"""CPU cost of a dropout mask on a 1024 x 1536 activation, one thread: ``F.dropout`` against masks cut from
int16 lanes of int64 draws, as ``loramix.dropout`` does (the micro-benchmark of docs/benchmarks.md).

    python -m bench.probes.dropout_micro
"""

from __future__ import annotations

import time

import torch

from loramix.dropout import fast_dropout

torch.set_num_threads(1)
x = torch.randn(1024, 1536)
n = x.numel()
thr = int(0.05 * 65536) - 32768


def ms(f, reps: int = 20) -> float:
    f()
    start = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - start) / reps * 1e3


def bits_only() -> torch.Tensor:
    return torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)


def fast() -> torch.Tensor:
    bits = bits_only().view(torch.int16)[:n].view(x.shape)
    return x * ((bits >= thr).to(x.dtype) * (1 / 0.95))


def fast_where() -> torch.Tensor:
    bits = bits_only().view(torch.int16)[:n].view(x.shape)
    return torch.where(bits >= thr, x * (1 / 0.95), 0.0)


for _ in range(2):
    print("dropout", ms(lambda: torch.nn.functional.dropout(x, 0.05, True)),
          "loramix fast_dropout", ms(lambda: fast_dropout(x, 0.05)), "fast", ms(fast),
          "fast_where", ms(fast_where), "bits", ms(bits_only), "mul", ms(lambda: x * x))
m = fast()
print("keep rate", (m != 0).float().mean().item(), "mean ratio", (m.sum() / x.sum()).item())
