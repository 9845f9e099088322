"""One-token decode steps, base vs MixLoRA top-2 (attention merged, decoding compiled), interleaved, with a
16-token KV cache; then the same with dynamo guard evaluation skipped. Session-4 figures in docs/benchmarks.md::

    python scripts/decode_step_ab.py
"""

import statistics
import time

import torch

from loramix import compile_decoding, merge_attention, tune_malloc
from loramix.bench import fresh_copy, frozen_base, make_loramix

tune_malloc()
torch.set_num_threads(1)
torch.manual_seed(0)
base = frozen_base()
mix, _ = make_loramix(fresh_copy(base), router="topk")
mix = merge_attention(mix.eval())
compile_decoding(mix)
prompt = torch.randint(0, base.config.vocab_size, (1, 16))


def prep(m):
    with torch.no_grad():
        out = m(input_ids=prompt, attention_mask=torch.ones(1, 16, dtype=torch.long), use_cache=True)
    return out.past_key_values


def step(m, cache, n=20):
    tok = torch.tensor([[5]])
    t0 = time.perf_counter()
    with torch.no_grad():
        for _i in range(n):
            c = cache
            m(input_ids=tok, attention_mask=torch.ones(1, 17, dtype=torch.long), past_key_values=c, use_cache=True)
            c.crop(-1)
    return (time.perf_counter() - t0) / n * 1e3


def ab(label: str) -> None:
    """5 interleaved rounds of 20 steps each, base and MixLoRA."""
    step(mix, cm, 3)
    step(base, cb, 3)
    rb, rm = [], []
    for _ in range(5):
        rb.append(step(base, cb))
        rm.append(step(mix, cm))
    print(label, "base ms/token", [round(x, 1) for x in rb], "mix", [round(x, 1) for x in rm],
          "ratio", statistics.median(rb) / statistics.median(rm))


cb, cm = prep(base), prep(mix)
ab("")
with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
    ab("SKIP GUARDS")
