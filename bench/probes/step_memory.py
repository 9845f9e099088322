"""Peak RSS growth of two training steps of one variant in a fresh process (default model, batch 4 x 128, one
thread): what the variant adds with no other variant's memory in the allocator::

    python -m bench.probes.step_memory mixlora
    python -m bench.probes.step_memory peft_lora
"""

from __future__ import annotations

import argparse
import resource

import torch

from bench.harness import fresh_copy, frozen_base, make_loramix, make_peft_lora
from loramix.allocator import tune_malloc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=["mixlora", "peft_lora"])
    p.add_argument("--router", default="topk")
    args = p.parse_args()
    tune_malloc()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = frozen_base()
    if args.variant == "mixlora":
        model, params = make_loramix(fresh_copy(base), router=args.router)
    else:
        model, params = make_peft_lora(fresh_copy(base))
    model.train()
    ids = torch.randint(0, base.config.vocab_size, (4, 128))
    opt = torch.optim.AdamW(params, lr=1e-4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"{args.variant}: peak RSS grew {grown:,.0f} MiB over two training steps")


if __name__ == "__main__":
    main()
