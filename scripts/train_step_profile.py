"""Steady-state training step, PEFT LoRA vs MixLoRA top-2 under torch.profiler (after 6 warm-up steps),
per-op self-CPU differences. Session-4 profile in docs/benchmarks.md::

    python scripts/train_step_profile.py
"""


import torch

from loramix.allocator import tune_malloc
from loramix.bench import fresh_copy, frozen_base, make_loramix, make_peft_lora

tune_malloc()
torch.set_num_threads(1)
torch.manual_seed(0)
base = frozen_base()
v = {"lora": make_peft_lora(fresh_copy(base)), "topk": make_loramix(fresh_copy(base), router="topk")}
ids = torch.randint(0, base.config.vocab_size, (4, 128))
opts = {k: torch.optim.AdamW(p, lr=1e-4) for k, (_, p) in v.items()}


def step(k):
    m = v[k][0].train()
    m(input_ids=ids, labels=ids).loss.backward()
    opts[k].step()
    opts[k].zero_grad(set_to_none=True)


for _ in range(6):
    for k in v:
        step(k)
from torch.profiler import profile  # noqa: E402 - a script: imported where used

res = {}
for k in v:
    import resource

    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with profile() as p:
        step(k)
    print(k, "faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    res[k] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in p.key_averages()}
keys = set(res["lora"]) | set(res["topk"])
rows = sorted(keys, key=lambda x: -abs(res["topk"].get(x, (0, 0))[0] - res["lora"].get(x, (0, 0))[0]))
print(
    "total lora {:.0f} ms, topk {:.0f} ms".format(
        sum(a for a, _ in res["lora"].values()), sum(a for a, _ in res["topk"].values())
    )
)
for r in rows[:30]:
    a = res["lora"].get(r, (0, 0))
    b = res["topk"].get(r, (0, 0))
    print(f"{r[:60]:60s} lora {a[0]:8.1f} ms ({a[1]:5d})  topk {b[0]:8.1f} ms ({b[1]:5d})  diff {b[0] - a[0]:+8.1f}")
