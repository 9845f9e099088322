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
