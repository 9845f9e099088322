"""A/B of the compiled one-token MixLoRA step (session 6, run at the commit that added loramix.decode_step):
the tensor function ``decode_step`` (arguments prebuilt), the compiled method ``route_pairwise`` (guards on the
module tree) and a stripped top-2-only function ``probe_f`` (no Routing outputs, no padding or dropped-token
handling), against the 30 frozen base FFNs; ms per token over 30 layers, median of 7 interleaved rounds::

    python scripts/decode_tensor_fn_ab.py
"""

import statistics
import time

import torch
import torch.nn.functional as F
from loramix.decode_step import decode_spec, decode_step, decode_tensors

from loramix.bench import fresh_copy, frozen_base, make_loramix
from loramix.compiled import moe_layers
from loramix.layer import MixLoraFFN

torch.set_num_threads(1)
mix, _ = make_loramix(fresh_copy(frozen_base()), router="topk")
mix.eval()
layers = moe_layers(mix)
x = torch.randn(1, 576)
m = torch.ones(1, dtype=torch.bool)
step = torch.compile(decode_step)
method = torch.compile(MixLoraFFN.route_pairwise)


def make(k, scaling):
    def f(x, rw, bb, Ag, Bg, Au, Bu, Ad, Bd, Wg, Wu, Wd):
        logits = F.linear(x.float(), rw)
        probs = logits.softmax(-1)
        idx = (logits + bb).topk(k, dim=-1).indices  # (T,k)
        w = probs.gather(-1, idx)
        w = w / w.sum(-1, keepdim=True)
        e = idx.reshape(-1)
        px = x.repeat_interleave(k, 0)
        g = F.linear(x, Wg).repeat_interleave(k, 0)
        u = F.linear(x, Wu).repeat_interleave(k, 0)
        g = g + torch.bmm(torch.bmm(px[:, None], Ag[e].transpose(1, 2)) * scaling, Bg[e].transpose(1, 2)).squeeze(1)
        u = u + torch.bmm(torch.bmm(px[:, None], Au[e].transpose(1, 2)) * scaling, Bu[e].transpose(1, 2)).squeeze(1)
        h = F.silu(g) * u
        T = x.shape[0]
        mixed = torch.bmm(w[:, None, :].to(x.dtype), h.view(T, k, -1)).squeeze(1)
        out = F.linear(mixed, Wd)
        d = torch.bmm(torch.bmm(h[:, None], Ad[e].transpose(1, 2)) * scaling, Bd[e].transpose(1, 2)).squeeze(1)
        return out + torch.bmm(w[:, None, :].to(x.dtype), d.view(T, k, -1)).squeeze(1)

    return torch.compile(f)


f = make(2, layers[0].mixlora_experts["up"].scaling)


def args(lay):
    E = lay.mixlora_experts
    return (
        lay.mixlora_router.weight,
        lay.mixlora_router.balance_bias,
        E["gate"].lora_A,
        E["gate"].lora_B,
        E["up"].lora_A,
        E["up"].lora_B,
        E["down"].lora_A,
        E["down"].lora_B,
        lay.proj("gate").weight,
        lay.proj("up").weight,
        lay.proj("down").weight,
    )


A = [args(lay) for lay in layers]
pre = [(decode_tensors(lay), decode_spec(lay)) for lay in layers]


def t(fn, n=30):
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            for i, lay in enumerate(layers):
                fn(i, lay)
    return (time.perf_counter() - t0) / n * 1e3


fs = {
    "step_prebuilt": lambda i, lay: step(x, m, *pre[i]),
    "method": lambda i, lay: method(lay, x, m),
    "probe_f": lambda i, lay: f(x, *A[i]),
    "base": lambda i, lay: lay.base(x),
}
for fn in fs.values():
    t(fn, 3)
r = {k: [] for k in fs}
for _ in range(7):
    for k, fn in fs.items():
        r[k].append(t(fn))
print({k: round(statistics.median(v), 2) for k, v in r.items()})
