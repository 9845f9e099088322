"""Training-step A/B on the default model: PEFT LoRA vs MixLoRA routers, interleaved rounds, page faults.

Prints every round's step time and minor page faults per variant, then medians and ratios to LoRA over
the rounds after ``--skip`` (steady state)::

    python -m bench.probes.train_step_ab topk switch --rounds 4            # malloc tuned (the default)
    LORAMIX_TUNE_MALLOC=0 python -m bench.probes.train_step_ab topk --rounds 6
    python -m bench.probes.train_step_ab topk --no-recompute               # adds topk_stored: no recomputation

``--no-recompute`` adds a top-2 variant with ``recompute_experts = False`` on its MoE layers (the pairs'
activations stored for backward instead of recomputed), timed in the same rounds. ``--no-fuse`` adds
``topk_eager``: top-2 with ``loramix.fused.FUSE = False`` during its steps (the elementwise work as eager ops)::

    python -m bench.probes.train_step_ab topk --no-fuse --rounds 6
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from loramix import fused
from loramix.allocator import tune_malloc
from loramix.benchmark.harness import fresh_copy, frozen_base, make_loramix, make_peft_lora
from loramix.injection import get_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("routers", nargs="*", default=["topk"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--skip", type=int, default=2, help="rounds left out of the medians (warm-up)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--no-recompute", action="store_true",
                   help="also time a top-2 variant that stores the pairs' activations (recompute_experts = False)")
    p.add_argument("--no-fuse", action="store_true",
                   help="also time top-2 with loramix.fused.FUSE = False (eager elementwise ops)")
    args = p.parse_args()
    print("malloc tuned:", tune_malloc())
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = frozen_base()
    variants = {"lora": make_peft_lora(fresh_copy(base))}
    for router in args.routers:
        variants[router] = make_loramix(fresh_copy(base), router=router)
    if args.no_recompute:
        variants["topk_stored"] = make_loramix(fresh_copy(base), router="topk")
        for layer in get_state(variants["topk_stored"][0]).moe_layers.values():
            layer.recompute_experts = False
    if args.no_fuse:
        variants["topk_eager"] = make_loramix(fresh_copy(base), router="topk")
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len))
    opts = {k: torch.optim.AdamW(params, lr=1e-4) for k, (_, params) in variants.items()}

    def step(name: str) -> tuple[float, int]:
        model = variants[name][0].train()
        fused.FUSE = name != "topk_eager"
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    for name in variants:  # first step: optimizer state
        step(name)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.rounds):
        faults = {}
        for name in variants:
            t, faults[name] = step(name)
            times[name].append(t)
        cells = ", ".join(f"{k} {v[-1]:.2f} s ({faults[k]} faults)" for k, v in times.items())
        print(f"round {i}: {cells}", flush=True)
    lora = statistics.median(times["lora"][args.skip :])
    for name, v in times.items():
        med = statistics.median(v[args.skip :])
        print(f"{name}: median {med:.3f} s over rounds {args.skip}-{args.rounds - 1}, {med / lora:.3f}x LoRA")
    for name in [n for n in variants if n != "lora"]:
        ratios = [t / lo for t, lo in zip(times[name][args.skip :], times["lora"][args.skip :], strict=True)]
        print(f"{name} / LoRA per round: median {statistics.median(ratios):.3f}, "
              f"{' '.join(f'{r:.2f}' for r in ratios)}")
    for other in ("topk_stored", "topk_eager"):
        if other not in variants or "topk" not in variants:
            continue
        ratios = [n / o for n, o in zip(times["topk"][args.skip :], times[other][args.skip :], strict=True)]
        cells = " ".join(f"{r:.2f}" for r in ratios)
        print(f"topk / {other} per round: median {statistics.median(ratios):.3f}, {cells}")


if __name__ == "__main__":
    main()
