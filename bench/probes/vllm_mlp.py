"""The vLLM plugin's FFN for one decoding step, in plain torch with SmolLM2-135M's shapes (hidden 576, intermediate
1536; 8 experts, top-2, rank 16 on gate/up/down): aten ops per layer (loramix.profiling.OpCounter) and the time
per layer over 30 layers of distinct random weights (so that the weights come from memory, as in a model), one
thread, the three FFNs interleaved round by round::

    python -m bench.probes.vllm_mlp                 # 1 token per step
    python -m bench.probes.vllm_mlp --tokens 4 --rounds 60

* ``base``: vLLM's Llama FFN: merged gate/up projection, silu * up, down projection;
* ``reference``: the plugin's plain reference maths (``route`` + ``mixlora_ffn``);
* ``serving``: what the plugin runs (``serve_route`` + ``mixlora_ffn_serving`` on a ``ServingLayout``).

The op counts depend only on the code; the times depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from loramix.profiling import OpCounter
from loramix.vllm_plugin.mixture import (
    ServingLayout,
    mixlora_ffn,
    mixlora_ffn_serving,
    route,
    serve_route,
    silu_and_mul,
)

HIDDEN, INTER, EXPERTS, TOP_K, RANK, SCALING = 576, 1536, 8, 2, 16, 2.0


def layer(gen: torch.Generator) -> dict:
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    fans = {"gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}
    loras = {role: (rnd(EXPERTS, RANK, fan_in), rnd(EXPERTS, fan_out, RANK))  # A (E, r, in), B (E, out, r)
             for role, (fan_in, fan_out) in fans.items()}
    return {"gate_up": rnd(2 * INTER, HIDDEN), "down": rnd(HIDDEN, INTER), "router": rnd(EXPERTS, HIDDEN),
            "bias": rnd(EXPERTS) * 5,
            "kept": {role: (a, b.transpose(1, 2).contiguous()) for role, (a, b) in loras.items()},  # B (E, r, out)
            "layout": ServingLayout.from_factors(loras, SCALING), "offsets": torch.arange(2 * RANK)}


def base(x: torch.Tensor, p: dict) -> torch.Tensor:
    return F.linear(silu_and_mul(F.linear(x, p["gate_up"])), p["down"])


def reference(x: torch.Tensor, p: dict) -> torch.Tensor:
    gate, up = F.linear(x, p["gate_up"]).split(INTER, dim=-1)  # (T, I) each
    weights, idx = route(x, p["router"], p["bias"], "topk", TOP_K, 0.0)
    return mixlora_ffn(x, gate, up, lambda h: F.linear(h, p["down"]), weights, idx, p["kept"], SCALING)


def serving(x: torch.Tensor, p: dict) -> torch.Tensor:
    gate_up = F.linear(x, p["gate_up"])  # (T, 2I)
    weights, idx = serve_route(x, p["router"], p["bias"], "topk", TOP_K, 0.0)
    return mixlora_ffn_serving(x, gate_up, lambda h: F.linear(h, p["down"]), weights, idx, p["layout"],
                               p["offsets"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1, help="tokens per step (1: decoding one sequence)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    layers = [layer(gen) for _ in range(args.layers)]
    x = torch.randn(args.tokens, HIDDEN, generator=gen)
    ffns = {"base": base, "reference": reference, "serving": serving}
    with torch.no_grad():
        diff = max(float((serving(x, p) - reference(x, p)).abs().max()) for p in layers)
        counts = {}
        for name, ffn in ffns.items():
            with OpCounter() as ops:
                ffn(x, layers[0])
            counts[name] = ops
        times: dict[str, list[float]] = {name: [] for name in ffns}
        names = list(ffns)
        for name in names:  # warm-up
            for p in layers:
                ffns[name](x, p)
        for i in range(args.rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                start = time.perf_counter()
                for p in layers:
                    ffns[name](x, p)
                times[name].append((time.perf_counter() - start) / len(layers) * 1e6)
    print(f"{args.tokens} token(s), {args.layers} layers, {args.rounds} interleaved rounds, 1 thread; "
          f"serving vs reference max |diff| {diff:.1e}")
    print(f"{'ffn':<10} {'aten ops':>8} {'kernels':>8} {'us/layer min':>13} {'median':>8}")
    for name in names:
        print(f"{name:<10} {counts[name].total:>8} {counts[name].kernels:>8} {min(times[name]):>13.0f} "
              f"{statistics.median(times[name]):>8.0f}")


if __name__ == "__main__":
    main()
