"""Where a compiled one-token MixLoRA step spends its time: torch.profiler over 20 tokens x 30 layers of the
compiled ``route_pairwise`` method and of the 30 base FFNs (self CPU time per op). Session-6 figures in
docs/benchmarks.md (run 10)::

    python scripts/decode_compiled_profile.py
"""

import torch
from decode_probe_setup import topk_decode_layers  # scripts/ is on sys.path when a script runs
from torch.profiler import profile

from loramix.layer import MixLoraFFN

layers, x, m = topk_decode_layers()
method = torch.compile(MixLoraFFN.route_pairwise)
calls = {"compiled method": lambda layer: method(layer, x, m), "base FFN": lambda layer: layer.base(x)}
with torch.no_grad():
    for call in calls.values():
        for _ in range(5):
            for layer in layers:
                call(layer)
    for name, call in calls.items():
        with profile() as prof:
            for _ in range(20):
                for layer in layers:
                    call(layer)
        print(f"{name}: self CPU time per call (600 calls)")
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
            print(f"  {e.key[:60]:60s} {e.self_cpu_time_total / 600:8.1f} us  ({e.count} calls)")
