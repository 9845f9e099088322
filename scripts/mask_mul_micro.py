"""Cost of the dropout mask multiply on a (1024, 1536) float32 tensor, one thread: the mask as bool, as its uint8
view and as float32 (40 interleaved repeats, median ms). Session-6 figures in docs/benchmarks.md (run 10)::

    python scripts/mask_mul_micro.py
"""

import statistics
import time

import torch

from loramix.dropout import keep_mask

torch.set_num_threads(1)
x = torch.randn(1024, 1536)
mask = keep_mask(x.shape, 0.05)
as_uint8, as_float = mask.view(torch.uint8), mask.float()
calls = {"x * bool": lambda: x * mask, "x * uint8": lambda: x * as_uint8, "x * float": lambda: x * as_float}
times: dict[str, list[float]] = {k: [] for k in calls}
for _ in range(40):
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        times[name].append(time.perf_counter() - start)
print({k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()})
