"""CPU training step of the default model, eager and under ``torch.compile`` (inductor), PEFT LoRA against MixLoRA
top-2 (8 experts, r 16, attention LoRA r 16), one AdamW step of batch 4 x 128, interleaved rounds::

    python -m bench.probes.compile_step --rounds 6 --skip 2

The first step of each compiled variant compiles it (minutes on a 2-core CPU) and is reported apart. Prints each
variant's median step over the rounds after ``--skip`` and its ratio to eager PEFT LoRA.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.harness import fresh_copy, frozen_base, make_loramix, make_peft_lora
from loramix.allocator import tune_malloc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--skip", type=int, default=2, help="rounds left out of the medians (warm-up)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = frozen_base()
    built = {"lora": make_peft_lora(fresh_copy(base)), "mixlora": make_loramix(fresh_copy(base), router="topk")}
    variants, opts = {}, {}
    for name, (model, params) in built.items():
        model.train()
        variants[name], variants[f"{name}_compiled"] = model, torch.compile(model)
        opts[name] = opts[f"{name}_compiled"] = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len))

    def step(name: str) -> float:
        start = time.perf_counter()
        variants[name](input_ids=ids, labels=ids).loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for name in variants:
        if name.endswith("_compiled"):
            print(f"{name}: first step (compiles) {step(name):.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(args.rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(step(name))
        print(f"round {i}: " + ", ".join(f"{n} {times[n][-1] * 1000:.0f} ms" for n in names), flush=True)
    medians = {n: statistics.median(t[args.skip:]) for n, t in times.items()}
    print("| variant | train step ms | / eager PEFT LoRA |")
    print("|---|---:|---:|")
    for n, m in medians.items():
        print(f"| {n} | {m * 1000:.0f} | {m / medians['lora']:.2f}x |")


if __name__ == "__main__":
    main()
