"""Compiled one-token top-2 step with the expert B weights as stored, (E, out, r), against a contiguous (E, r, out)
copy (the compiled kernel then vectorises over the output instead of reducing over r); ms per token over 30
layers, median of 9 interleaved rounds. Session-6 figure in docs/benchmarks.md (run 10)::

    python scripts/decode_b_layout_probe.py
"""

import statistics
import time

import torch
import torch.nn.functional as F
from decode_probe_setup import topk_decode_layers  # scripts/ is on sys.path when a script runs

layers, x, _ = topk_decode_layers()

def make(k, scaling, bt):
    def delta(inp, A, B, e):
        z = torch.bmm(inp[:, None], A[e].transpose(1, 2)) * scaling  # (N,1,r)
        return torch.bmm(z, B[e] if bt else B[e].transpose(1, 2)).squeeze(1)

    def f(x, rw, bb, Ag, Bg, Au, Bu, Ad, Bd, Wg, Wu, Wd):
        logits = F.linear(x.float(), rw)
        probs = logits.softmax(-1)
        idx = (logits + bb).topk(k, dim=-1).indices
        w = probs.gather(-1, idx)
        w = w / w.sum(-1, keepdim=True)
        e = idx.reshape(-1)
        px = x.repeat_interleave(k, 0)
        g = F.linear(x, Wg).repeat_interleave(k, 0) + delta(px, Ag, Bg, e)
        u = F.linear(x, Wu).repeat_interleave(k, 0) + delta(px, Au, Bu, e)
        h = F.silu(g) * u
        T = x.shape[0]
        mixed = torch.bmm(w[:, None, :].to(x.dtype), h.view(T, k, -1)).squeeze(1)
        out = F.linear(mixed, Wd)
        d = delta(h, Ad, Bd, e)
        return out + torch.bmm(w[:, None, :].to(x.dtype), d.view(T, k, -1)).squeeze(1)

    return f


sc = layers[0].mixlora_experts["up"].scaling
f0 = torch.compile(make(2, sc, False))
f1 = torch.compile(make(2, sc, True))


def args(lay, bt):
    E = lay.mixlora_experts
    B = (lambda b: b.transpose(1, 2).contiguous()) if bt else (lambda b: b)
    return (
        lay.mixlora_router.weight,
        lay.mixlora_router.balance_bias,
        E["gate"].lora_A,
        B(E["gate"].lora_B),
        E["up"].lora_A,
        B(E["up"].lora_B),
        E["down"].lora_A,
        B(E["down"].lora_B),
        lay.proj("gate").weight,
        lay.proj("up").weight,
        lay.proj("down").weight,
    )


A0 = [args(lay, False) for lay in layers]
A1 = [args(lay, True) for lay in layers]
with torch.no_grad():
    print("diff", (f0(x, *A0[3]) - f1(x, *A1[3])).abs().max().item())


def t(fn, n=30):
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            for i, lay in enumerate(layers):
                fn(i, lay)
    return (time.perf_counter() - t0) / n * 1e3


fs = {
    "B (E,out,r)": lambda i, lay: f0(x, *A0[i]),
    "B (E,r,out)": lambda i, lay: f1(x, *A1[i]),
    "base": lambda i, lay: lay.base(x),
}
for fn in fs.values():
    t(fn, 3)
r = {k: [] for k in fs}
for _ in range(9):
    for k, fn in fs.items():
        r[k].append(t(fn))
print({k: round(statistics.median(v), 2) for k, v in r.items()})
