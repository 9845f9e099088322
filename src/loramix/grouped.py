"""Grouped expert LoRA products with a hand-written backward, for the training path of ``MixLoraFFN``.

Rows are (token, expert) pairs sorted by expert, ``counts[e]`` rows each. For every projection ``j`` that reads
the same input ``x`` (gate and up; or down alone)::

    out_j = base_j[token] + scale * (x A_j,e^T) B_j,e^T      for the rows of expert e

Built from autograd ops, this costs a gather, one ``addmm`` per expert and a ``torch.cat`` of the per-expert
pieces in forward, and in backward the ``cat`` of the split's gradients again, for every (pairs, width) tensor.
:class:`GroupedLoRA` writes each expert's rows into one preallocated output (in-place ``addmm`` on row
slices) and its gradients into preallocated buffers the same way, so neither pass copies the wide tensors
more than the gather needs. :func:`grouped_lora_reference` is the plain autograd version; tests check that
values and gradients agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .precision import compute_dtype


def _expert_rows(counts: Sequence[int]) -> Iterator[tuple[int, slice]]:
    """(expert, its row slice) for every expert with rows, in order."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


class GroupedLoRA(torch.autograd.Function):
    """``outs = GroupedLoRA.apply(x, a_cat, token, counts, scale, ranks, b_1, base_1, b_2, base_2, ...)``.

    x (N, in) rows sorted by expert; a_cat (E, R, in): the projections' A stacked along the rank
    (R = sum(ranks)); b_j (E, out_j, r_j); base_j (T, out_j) frozen output per token or None (then
    out_j is the delta alone); token (N,) the token of each row. Returns one (N, out_j) tensor per projection.
    """

    @staticmethod
    def forward(ctx, x, a_cat, token, counts, scale, ranks, *b_and_base):  # noqa: ANN001, ANN205
        with torch.autocast(x.device.type, enabled=False):  # inputs arrive in one dtype; `out=` ops ignore autocast
            return GroupedLoRA._forward(ctx, x, a_cat, token, counts, scale, ranks, *b_and_base)

    @staticmethod
    def _forward(ctx, x, a_cat, token, counts, scale, ranks, *b_and_base):  # noqa: ANN001, ANN205
        bs, bases = b_and_base[0::2], b_and_base[1::2]
        z = x.new_empty(x.shape[0], a_cat.shape[1])  # (N, R) unscaled rank-R products
        outs = [
            base.index_select(0, token) if base is not None else x.new_empty(x.shape[0], b.shape[1])  # (N, out_j)
            for b, base in zip(bs, bases, strict=True)
        ]
        for e, rows in _expert_rows(counts):
            torch.mm(x[rows], a_cat[e].t(), out=z[rows])  # (n_e, R)
            offset = 0
            for b, base, out, r in zip(bs, bases, outs, ranks, strict=True):
                beta = 1.0 if base is not None else 0.0  # beta 0: the uninitialised rows are ignored
                out[rows].addmm_(z[rows, offset : offset + r], b[e].t(), beta=beta, alpha=scale)  # (n_e, out_j)
                offset += r
        ctx.save_for_backward(x, a_cat, token, z, *bs)
        ctx.counts, ctx.scale, ctx.ranks = counts, scale, ranks
        ctx.num_tokens = [None if base is None else base.shape[0] for base in bases]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN205
        saved = ctx.saved_tensors  # unpacked once: activation checkpointing allows no second unpack
        with torch.autocast(saved[0].device.type, enabled=False):
            return GroupedLoRA._backward(ctx, saved, *grads)

    @staticmethod
    def _backward(ctx, saved, *grads):  # noqa: ANN001, ANN205
        x, a_cat, token, z, *bs = saved
        counts, scale, ranks = ctx.counts, ctx.scale, ctx.ranks
        need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grads = [g if g is None else g.to(x.dtype).contiguous() for g in grads]
        gz = x.new_zeros(x.shape[0], a_cat.shape[1])  # (N, R) gradient of the scaled products
        grad_bs = [torch.zeros_like(b) if ctx.needs_input_grad[6 + 2 * j] else None for j, b in enumerate(bs)]
        for e, rows in _expert_rows(counts):
            offset = 0
            for j, (g, b, r) in enumerate(zip(grads, bs, ranks, strict=True)):
                if g is not None:
                    gz[rows, offset : offset + r] = g[rows] @ b[e]  # (n_e, r_j)
                    if grad_bs[j] is not None:
                        torch.mm(g[rows].t(), z[rows, offset : offset + r], out=grad_bs[j][e])  # (out_j, r_j)
                offset += r
        gz.mul_(scale)
        grad_x = x.new_empty(x.shape) if need_x else None  # (N, in)
        grad_a = torch.zeros_like(a_cat) if need_a else None  # (E, R, in)
        for e, rows in _expert_rows(counts):
            if grad_x is not None:
                torch.mm(gz[rows], a_cat[e], out=grad_x[rows])  # (n_e, in)
            if grad_a is not None:
                torch.mm(gz[rows].t(), x[rows], out=grad_a[e])  # (R, in)
        out: list[torch.Tensor | None] = [grad_x, grad_a, None, None, None, None]
        for j, (g, grad_b) in enumerate(zip(grads, grad_bs, strict=True)):
            if grad_b is not None:
                grad_b.mul_(scale)
            grad_base = None
            if ctx.needs_input_grad[7 + 2 * j] and g is not None:
                grad_base = g.new_zeros(ctx.num_tokens[j], g.shape[1]).index_add_(0, token, g)  # (T, out_j)
            out += [grad_b, grad_base]
        return tuple(out)


@torch.compiler.disable(reason="per-expert row slices of a data-dependent size; the layer breaks the graph here anyway")
def grouped_lora(
    x: torch.Tensor,
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    counts: list[int],
    scale: float,
    token: torch.Tensor | None = None,
    bases: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """``base_j[token] + scale * (x A_j,e^T) B_j,e^T`` per projection j (rows sorted by expert); see
    :class:`GroupedLoRA`. Everything is cast to the compute dtype (the autocast dtype under ``torch.autocast``,
    else x's): ``a[j]`` (E, r_j, in), ``b[j]`` (E, out_j, r_j), ``x`` and the frozen ``bases``."""
    dtype = compute_dtype(x)
    x = x.to(dtype)
    bases = [None if base is None else base.to(dtype) for base in bases] if bases is not None else [None] * len(a)
    if token is None:
        if any(base is not None for base in bases):
            raise ValueError("grouped_lora: bases need the token index of every row")
        token = torch.empty(0, dtype=torch.long, device=x.device)
    a_cat = torch.cat([w.to(x.dtype) for w in a], dim=1) if len(a) > 1 else a[0].to(x.dtype)  # (E, R, in)
    ranks = tuple(w.shape[1] for w in a)
    pairs = [t for w, base in zip(b, bases, strict=True) for t in (w.to(x.dtype), base)]
    return GroupedLoRA.apply(x, a_cat, token, counts, scale, ranks, *pairs)


def grouped_lora_reference(
    x: torch.Tensor,
    a: Sequence[torch.Tensor],
    b: Sequence[torch.Tensor],
    counts: list[int],
    scale: float,
    token: torch.Tensor | None = None,
    bases: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, ...]:
    """:func:`grouped_lora` from plain autograd ops: the reference it is tested against."""
    dtype = compute_dtype(x)
    x = x.to(dtype)
    outs = []
    for j, (a_j, b_j) in enumerate(zip(a, b, strict=True)):
        delta = torch.cat([(chunk @ a_j[e].to(x.dtype).t()) * scale @ b_j[e].to(x.dtype).t()
                           for e, chunk in enumerate(x.split(counts))])  # (N, out_j)
        base = bases[j] if bases is not None else None
        outs.append(delta if base is None else base.to(delta.dtype).index_select(0, token) + delta)
    return tuple(outs)


class MixPairs(torch.autograd.Function):
    """The pairs' activations mixed per token, keeping only their pre-activations for backward.

    ``mixed, down = MixPairs.apply(up, gate, weight, token, counts, num_tokens, act, mask, scale, a, b)``::

        h      = act(gate) * up   (or act(up) without a gate)            (N, I), pairs sorted by expert
        mixed  = sum over each token's pairs of weight * h                (T, I)
        down   = sum over each token's pairs of weight * scale * ((mask * h) A_e^T) B_e^T      (T, H)

    up, gate (N, I) pre-activations; weight (N, 1); token (N,); a (E, r, I) and b (E, H, r) the down LoRA (None:
    no down LoRA, ``down`` is None); mask (N, I) uint8 dropout keep-mask or None; scale includes the dropout's
    1/(1-p). Backward recomputes h from the saved pre-activations (an elementwise pass) instead of storing the
    activation, its masked copy and the products, which autograd would keep: several (N, I) tensors per layer.
    """

    @staticmethod
    def forward(ctx, up, gate, weight, token, counts, num_tokens, act, mask, scale, a, b):  # noqa: ANN001, ANN205
        with torch.autocast(up.device.type, enabled=False), torch.no_grad():
            act_gate = act(gate) if gate is not None else None
            h = act_gate * up if gate is not None else act(up)  # (N, I)
            mixed = up.new_zeros(num_tokens, up.shape[1]).index_add_(0, token, h * weight)  # (T, I)
            down = z = None
            if a is not None:
                hk = h * mask if mask is not None else h  # (N, I)
                z = up.new_empty(up.shape[0], a.shape[1])  # (N, r)
                delta = up.new_empty(up.shape[0], b.shape[1])  # (N, H)
                for e, rows in _expert_rows(counts):
                    torch.mm(hk[rows], a[e].t(), out=z[rows])  # (n_e, r)
                    torch.mm(z[rows], b[e].t(), out=delta[rows])  # (n_e, H)
                down = up.new_zeros(num_tokens, b.shape[1]).index_add_(0, token, delta.mul_(weight * scale))
        ctx.save_for_backward(up, gate, weight, token, mask, z, a, b)
        ctx.counts, ctx.act, ctx.scale = counts, act, scale
        return mixed, down

    @staticmethod
    def backward(ctx, grad_mixed, grad_down):  # noqa: ANN001, ANN205
        saved = ctx.saved_tensors  # unpacked once: activation checkpointing allows no second unpack
        with torch.autocast(saved[0].device.type, enabled=False):
            return MixPairs._backward(ctx, saved, grad_mixed, grad_down)

    @staticmethod
    def _backward(ctx, saved, grad_mixed, grad_down):  # noqa: ANN001, ANN205
        up, gate, weight, token, mask, z, a, b = saved
        counts, act, scale = ctx.counts, ctx.act, ctx.scale
        pre = (gate if gate is not None else up).detach().requires_grad_(True)
        with torch.enable_grad():
            act_pre = act(pre)  # (N, I) recomputed activation of the gate (or of up)
        h = act_pre.detach() * up if gate is not None else act_pre.detach()  # (N, I)
        grad_h = up.new_zeros(up.shape)
        grad_w = weight.new_zeros(weight.shape)  # (N, 1)
        if grad_mixed is not None:
            gm = grad_mixed.to(up.dtype).index_select(0, token)  # (N, I)
            grad_w += (gm * h).sum(-1, keepdim=True)
            grad_h += gm * weight
        grad_a = grad_b = None
        if a is not None and grad_down is not None:
            gd = grad_down.to(up.dtype).index_select(0, token)  # (N, H)
            gdb = up.new_empty(z.shape)  # (N, r) gd B_e
            grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
            hk = h * mask if mask is not None else h  # (N, I)
            grad_hk = up.new_empty(up.shape)
            for e, rows in _expert_rows(counts):
                torch.mm(gd[rows], b[e], out=gdb[rows])  # (n_e, r)
                ws = weight[rows] * scale  # (n_e, 1) each pair's routing weight times the LoRA scale
                gz = gdb[rows] * ws  # (n_e, r) gradient of z
                torch.mm((gd[rows] * ws).t(), z[rows], out=grad_b[e])  # (H, r)
                torch.mm(gz.t(), hk[rows], out=grad_a[e])  # (r, I)
                torch.mm(gz, a[e], out=grad_hk[rows])  # (n_e, I)
            grad_w += scale * (z * gdb).sum(-1, keepdim=True)
            grad_h += grad_hk * mask if mask is not None else grad_hk
        if gate is not None:
            grad_up = grad_h * act_pre.detach()
            (grad_gate,) = torch.autograd.grad(act_pre, pre, grad_h * up)
        else:
            grad_gate = None
            (grad_up,) = torch.autograd.grad(act_pre, pre, grad_h)
        return grad_up, grad_gate, grad_w, None, None, None, None, None, None, grad_a, grad_b


@torch.compiler.disable(reason="per-expert row slices of a data-dependent size; the layer breaks the graph here anyway")
def mix_pairs(
    up: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, token: torch.Tensor, counts: list[int],
    num_tokens: int, act: torch.nn.Module, mask: torch.Tensor | None = None, scale: float = 1.0,
    a: torch.Tensor | None = None, b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:class:`MixPairs` with every tensor cast to ``up``'s dtype (the compute dtype)."""
    dtype = up.dtype
    gate = gate.to(dtype) if gate is not None else None
    a = a.to(dtype) if a is not None else None
    b = b.to(dtype) if b is not None else None
    return MixPairs.apply(up, gate, weight.to(dtype), token, counts, num_tokens, act, mask, scale, a, b)
