"""Expert LoRA products for every (token, expert) pair at once: one matmul per projection, no loop over experts
and no host sync.

A routing of T tokens with K slots each gives N = T*K pairs (:func:`routing_pairs`). Their number is fixed by
the shapes, never by the routing: an unused slot (padding, a token over a Switch expert's capacity, a slot
past top-p's mass) stays in place with weight 0 and no LoRA delta, so nothing has to be counted on the host.

:func:`expert_matmul` multiplies each pair's row by its own expert's matrix:

* **grouped** (``torch.nn.functional.grouped_mm``): the pairs sorted by expert, the group ends as a device
  tensor; one kernel, each row multiplied once. Used where torch has the kernel for the device and dtype
  (:func:`grouped_mm_supported`).
* **fallback**, everywhere else (float64, CUDA before sm90 or outside bfloat16, CPU float32 under
  ``torch.compile``): one dense matmul against all experts' matrices, each row's own block selected by a gather
  (narrow outputs, the A side) or by placing the row in its expert's block of a zero matrix (narrow inputs, the
  B side). It multiplies every row by all E matrices, which for LoRA's rank-r factors is E small products.

:func:`expert_matmul_reference` is the plain loop over experts that both are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fused
from .routers import Routing

USE_GROUPED_MM = True  # False: always the fallback (tests of the fallback, or a torch without the kernel)


def grouped_mm_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``F.grouped_mm`` runs for ``dtype`` on ``device`` here (eager or under ``torch.compile``).

    CUDA: bfloat16 on sm90 and newer. CPU: float32, bfloat16 and float16 in eager mode; under ``torch.compile``
    bfloat16 only (the kernel's shape function accepts nothing else).
    """
    if not USE_GROUPED_MM or not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and _cuda_capability(device) >= (9, 0)
    if device.type == "cpu":
        if torch.compiler.is_compiling():
            return dtype == torch.bfloat16
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    return False


_CAPABILITY: dict[int, tuple[int, int]] = {}


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


@dataclass
class Pairs:
    """The N = T*K (token, slot) pairs of a routing, sorted by expert when ``offsets`` is set."""

    token: torch.Tensor  # (N,) long: the pair's token
    expert: torch.Tensor  # (N,) long: the pair's expert
    weight: torch.Tensor  # (N,) float32 mixing weight: the routing weight of a used slot, else 0; and 1 on the
    #                       first slot of a token no expert took, whose LoRA delta is 0 (it gets the frozen FFN)
    active: torch.Tensor  # (N,) bool: the slot is used (its expert's LoRA applies)
    offsets: torch.Tensor | None  # (E,) int32 end of each expert's rows (grouped path), None: unsorted
    slots: torch.Tensor | None = None  # (T, K) long: where each token's K pairs are among these N (on request)


def routing_pairs(routing: Routing, num_experts: int, grouped: bool, with_slots: bool = False) -> Pairs:
    """All (token, slot) pairs of ``routing``; ``grouped`` sorts them by expert and sets the group ends;
    ``with_slots`` sets :attr:`Pairs.slots` (one more op; only the fused CPU backward reads it)."""
    num_tokens, k = routing.indices.shape
    expert = routing.indices.reshape(-1)  # (N,) N = T*k, slot-major within a token
    active = routing.mask.reshape(-1)  # (N,)
    dropped = ~routing.mask.any(dim=-1)  # (T,) tokens no expert took
    first = torch.arange(k, device=expert.device) == 0  # (k,)
    fallback = (dropped[:, None] & first).reshape(-1)  # (N,) the pair that carries a dropped token's frozen FFN
    weight = (routing.weights * routing.mask).reshape(-1) + fallback.to(routing.weights.dtype)  # (N,)
    position = torch.arange(num_tokens * k, device=expert.device)  # (N,)
    token = position // k  # (N,)
    if not grouped:
        return Pairs(token, expert, weight, active, None, position.view(num_tokens, k) if with_slots else None)
    order = torch.argsort(expert, stable=True)  # (N,) pairs sorted by expert
    expert = expert[order]
    ends = torch.searchsorted(expert, torch.arange(num_experts, device=expert.device), right=True, out_int32=True)
    slots = None
    if with_slots:
        slots = torch.empty_like(position).scatter_(0, order, position).view(num_tokens, k)  # (T, k) inverse of order
    return Pairs(token[order], expert, weight[order], active[order], ends, slots)


def _kernel_layout(x: torch.Tensor, out: int, inp: int) -> bool:
    """The grouped kernel's layout rule, forward and backward, for x times (out, inp) matrices: the rows of x,
    of the matrices and of the output start on 16-byte boundaries (a bf16 LoRA of rank 4, say, does not; the
    fallback takes it)."""
    size = x.element_size()
    return (x.stride(-1) == 1 and x.stride(0) * size % 16 == 0 and x.data_ptr() % 16 == 0
            and inp * size % 16 == 0 and out * size % 16 == 0)


def expert_matmul(x: torch.Tensor, w: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    """``x[i] @ w[expert[i]].T`` for every pair i: x (N, in), w (E, out, in) -> (N, out), in x's dtype."""
    w = w.to(x.dtype)
    if pairs.offsets is not None and _kernel_layout(x, *w.shape[1:]):
        return F.grouped_mm(x, w.transpose(1, 2), offs=pairs.offsets)  # (N, out)
    num_pairs, (num_experts, out, inp) = x.shape[0], w.shape
    if inp <= out:  # narrow input (LoRA B): each row placed in its expert's block, one (N, E*in) @ (E*in, out)
        index = pairs.expert[:, None, None].expand(num_pairs, 1, inp)  # (N, 1, in)
        spread = x.new_zeros(num_pairs, num_experts, inp).scatter(1, index, x[:, None, :])  # (N, E, in)
        return spread.reshape(num_pairs, num_experts * inp) @ w.transpose(1, 2).reshape(num_experts * inp, out)
    full = x @ w.reshape(num_experts * out, inp).t()  # (N, E*out) narrow output (LoRA A): every expert's product
    index = pairs.expert[:, None, None].expand(num_pairs, 1, out)  # (N, 1, out)
    return full.view(num_pairs, num_experts, out).gather(1, index).squeeze(1)  # (N, out) each row's own expert


def expert_matmul_reference(x: torch.Tensor, w: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """:func:`expert_matmul` as a loop over experts, each multiplying its own rows (the reference)."""
    w = w.to(x.dtype)
    out = x.new_zeros(x.shape[0], w.shape[1])  # (N, out)
    for e in range(w.shape[0]):
        rows = expert == e  # (N,)
        out = torch.where(rows[:, None], x @ w[e].t(), out)
    return out


def token_inputs_matmul(
    x: torch.Tensor, a: torch.Tensor, pairs: Pairs, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``(x * mask)[token[i]] @ a[expert[i]].T`` for every pair i, x (T, in) per token, a (E, r, in), mask (T, in)
    a uint8 dropout keep-mask or None -> (N, r).

    Grouped (:class:`TokenInputs`): the pairs' rows gathered and multiplied once each; backward keeps x and the
    one-byte mask, not the (N, in) rows. Fallback: the T tokens against all E experts (T*E products of width r
    instead of N*E), then each pair's block picked out.
    """
    a = a.to(x.dtype)
    if pairs.offsets is not None and _kernel_layout(x, *a.shape[1:]):
        return TokenInputs.apply(x, mask, a, pairs.token, pairs.offsets)  # (N, r)
    kept = x * mask.to(x.dtype) if mask is not None else x  # (T, in)
    num_experts, rank, inp = a.shape
    full = (kept @ a.reshape(num_experts * rank, inp).t()).view(x.shape[0], num_experts, rank)  # (T, E, r)
    return full[pairs.token, pairs.expert]  # (N, r)


class TokenInputs(torch.autograd.Function):
    """The grouped route of :func:`token_inputs_matmul`: x (T, in), mask (T, in) uint8 or None, a (E, r, in), the
    pairs' tokens (N,) sorted by expert and the group ends (E,) -> (N, r). Saves x (which the router keeps too)
    and the mask instead of the gathered (N, in) rows, and gathers them again in backward."""

    @staticmethod
    def forward(ctx, x, mask, a, token, offsets):  # noqa: ANN001, ANN205
        kept = x * mask.to(x.dtype) if mask is not None else x  # (T, in)
        ctx.save_for_backward(x, mask, a, token, offsets)
        return F.grouped_mm(kept.index_select(0, token), a.transpose(1, 2), offs=offsets)  # (N, r)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, mask, a, token, offsets = ctx.saved_tensors
        grad = grad.contiguous()  # (N, r)
        maskf = mask.to(x.dtype) if mask is not None else None  # (T, in)
        grad_x = grad_a = None
        if ctx.needs_input_grad[2]:
            kept = x * maskf if maskf is not None else x  # (T, in)
            grad_a = F.grouped_mm(grad.t(), kept.index_select(0, token), offs=offsets)  # (E, r, in)
        if ctx.needs_input_grad[0]:
            grad_rows = F.grouped_mm(grad, a, offs=offsets)  # (N, in)
            grad_x = grad_rows.new_zeros(x.shape).index_add_(0, token, grad_rows)  # (T, in)
            if maskf is not None:
                grad_x.mul_(maskf)
        return grad_x, None, grad_a, None, None


def expert_weight_grad(grad: torch.Tensor, x: torch.Tensor, pairs: Pairs, num_experts: int) -> torch.Tensor:
    """The gradient of every expert's matrix in ``out = expert_matmul(x, w)``: sum over expert e's pairs of
    ``grad_i^T x_i``; grad (N, out), x (N, in) -> (E, out, in)."""
    num_pairs, out, inp = grad.shape[0], grad.shape[1], x.shape[1]
    if pairs.offsets is not None and _kernel_layout(x, out, inp):
        return F.grouped_mm(grad.t(), x, offs=pairs.offsets)  # (E, out, in), N split by the group ends
    if out <= inp:  # each grad row placed in its expert's block: (E*out, N) @ (N, in)
        index = pairs.expert[:, None, None].expand(num_pairs, 1, out)  # (N, 1, out)
        spread = grad.new_zeros(num_pairs, num_experts, out).scatter(1, index, grad[:, None, :])  # (N, E, out)
        return (spread.reshape(num_pairs, num_experts * out).t() @ x).view(num_experts, out, inp)
    index = pairs.expert[:, None, None].expand(num_pairs, 1, inp)  # (N, 1, in)
    spread = x.new_zeros(num_pairs, num_experts, inp).scatter(1, index, x[:, None, :])  # (N, E, in)
    full = grad.t() @ spread.reshape(num_pairs, num_experts * inp)  # (out, E*in)
    return full.view(out, num_experts, inp).transpose(0, 1)  # (E, out, in)


class MixPairs(torch.autograd.Function):
    """The pairs' activations mixed per token, keeping only their pre-activations for backward.

    ``mixed, down = MixPairs.apply(up, gate, weight, pairs, num_tokens, act, mask, scale, a, b)``::

        h      = act(gate) * up   (or act(up) without a gate)                            (N, I)
        mixed  = sum over each token's pairs of weight * h                                (T, I)
        down   = sum over each token's pairs of weight * scale * ((mask * h) A_e^T) B_e^T (T, H)

    up, gate (N, I) pre-activations; weight (N, 1), 0 for unused slots (their down delta is 0); a (E, r, I) and
    b (E, H, r) the down LoRA (None: ``down`` is None); mask (N, I) uint8 dropout keep-mask or None; scale
    includes the dropout's 1/(1-p). Backward recomputes h from the saved pre-activations (elementwise) instead
    of keeping the activation, its masked copy and the products, which autograd would: several (N, I) tensors
    per layer. With SiLU on CPU the elementwise passes of both directions are fused loops
    (:mod:`loramix.fused`); otherwise eager ops, SiLU with its own backward kernel and any other activation
    differentiated by autograd. Eager mode only; under ``torch.compile`` the layer checkpoints the same maths
    instead.
    """

    @staticmethod
    def forward(ctx, up, gate, weight, pairs, num_tokens, act, mask, scale, a, b):  # noqa: ANN001, ANN205
        with torch.autocast(up.device.type, enabled=False), torch.no_grad():
            if fused.fusable(up, act):  # one pass for the activation, the weighting and the mask
                weighted, hk = fused.run(fused.pairs_forward, up, gate, weight, mask, a is not None)  # (N, I) each
            else:
                h = act(gate) * up if gate is not None else act(up)  # (N, I)
                weighted = h * weight  # (N, I)
                hk = None if a is None else h * mask.to(h.dtype) if mask is not None else h  # (N, I)
            mixed = up.new_zeros(num_tokens, up.shape[1]).index_add_(0, pairs.token, weighted)  # (T, I)
            del weighted
            down = z = None
            if a is not None:
                z = expert_matmul(hk, a, pairs)  # (N, r) unscaled
                wd = weight * pairs.active.to(weight.dtype)[:, None]  # (N, 1) no down delta on unused slots
                delta = expert_matmul(z * (wd * scale), b, pairs)  # (N, H)
                down = up.new_zeros(num_tokens, b.shape[1]).index_add_(0, pairs.token, delta)  # (T, H)
        ctx.save_for_backward(up, gate, weight, mask, z, a, b, pairs.token, pairs.expert, pairs.offsets)
        ctx.act, ctx.scale, ctx.active = act, scale, pairs.active
        return mixed, down

    @staticmethod
    def backward(ctx, grad_mixed, grad_down):  # noqa: ANN001, ANN205
        saved = ctx.saved_tensors  # unpacked once: activation checkpointing allows no second unpack
        with torch.autocast(saved[0].device.type, enabled=False):
            return MixPairs._backward(ctx, saved, grad_mixed, grad_down)

    @staticmethod
    def _backward(ctx, saved, grad_mixed, grad_down):  # noqa: ANN001, ANN205
        up, gate, weight, mask, z, a, b, token, expert, offsets = saved
        pairs = Pairs(token, expert, weight[:, 0], ctx.active, offsets)
        act = ctx.act
        if grad_mixed is not None and fused.fusable(up, act):
            return MixPairs._backward_fused(ctx, saved, pairs, grad_mixed, grad_down)
        pre = gate if gate is not None else up  # (N, I) the activation's input
        silu = fused.is_silu(act)
        if silu:
            act_pre = F.silu(pre)  # (N, I) recomputed
        else:
            pre = pre.detach().requires_grad_(True)
            with torch.enable_grad():
                act_pre_graph = act(pre)  # (N, I) recomputed, differentiated below
            act_pre = act_pre_graph.detach()
        h = act_pre * up if gate is not None else act_pre  # (N, I)
        grad_w = weight.new_zeros(weight.shape)  # (N, 1)
        if grad_mixed is not None:
            grad_h = grad_mixed.to(up.dtype).index_select(0, token)  # (N, I) each pair's token's gradient
            grad_w += (grad_h * h).sum(-1, keepdim=True)
            grad_h.mul_(weight)  # (N, I) gradient of h through mixed
        else:
            grad_h = up.new_zeros(up.shape)
        grad_a = grad_b = None
        if a is not None and grad_down is not None:
            gz, grad_b = MixPairs._down_products_backward(ctx, pairs, grad_down, weight, z, b, grad_w)
            maskf = mask.to(h.dtype) if mask is not None else None  # (N, I) converted once, used twice
            hk = h * maskf if maskf is not None else h  # (N, I)
            grad_a = expert_weight_grad(gz, hk, pairs, a.shape[0])  # (E, r, I)
            del hk
            grad_hk = expert_matmul(gz, a.transpose(1, 2), pairs)  # (N, I)
            if maskf is not None:
                grad_h.addcmul_(grad_hk, maskf)
            else:
                grad_h.add_(grad_hk)
            del grad_hk
        if gate is not None:
            grad_up = grad_h * act_pre  # (N, I)
            grad_h.mul_(up)  # (N, I) gradient of act(gate)
            grad_act = grad_h
        else:
            grad_up, grad_act = None, grad_h
        if silu:
            grad_pre = torch.ops.aten.silu_backward(grad_act, pre)  # (N, I)
        else:
            (grad_pre,) = torch.autograd.grad(act_pre_graph, pre, grad_act)
        if gate is None:
            grad_up, grad_gate = grad_pre, None
        else:
            grad_gate = grad_pre
        return grad_up, grad_gate, grad_w, None, None, None, None, None, grad_a, grad_b

    @staticmethod
    def _down_products_backward(ctx, pairs, grad_down, weight, z, b, grad_w):  # noqa: ANN001, ANN205
        """Backward through the down LoRA's B and the routing weight, ``down = sum of weight * scale * z B^T``:
        returns the gradient of z (N, r) and of b (E, H, r), and adds the weight's share to ``grad_w`` (N, 1)."""
        scale = ctx.scale
        gd = grad_down.to(z.dtype).index_select(0, pairs.token)  # (N, H)
        active = ctx.active.to(weight.dtype)[:, None]  # (N, 1)
        wd = weight * active  # (N, 1)
        zs = z * (wd * scale)  # (N, r) the products B saw
        gzs = expert_matmul(gd, b.transpose(1, 2), pairs)  # (N, r) gradient of zs
        grad_b = expert_weight_grad(gd, zs, pairs, b.shape[0])  # (E, H, r)
        grad_w += scale * active * (gzs * z).sum(-1, keepdim=True)
        return gzs * (wd * scale), grad_b  # gradient of z (N, r)

    @staticmethod
    def _backward_fused(ctx, saved, pairs, grad_mixed, grad_down):  # noqa: ANN001, ANN205
        """:meth:`_backward` with its elementwise ops in one fused pass (:func:`loramix.fused.pairs_backward`):
        the down LoRA's products first, as they do not need the activation."""
        up, gate, weight, mask, z, a, b, token = saved[:8]
        grad_w = weight.new_zeros(weight.shape)  # (N, 1)
        grad_a = grad_b = grad_hk = gz = None
        if a is not None and grad_down is not None:
            gz, grad_b = MixPairs._down_products_backward(ctx, pairs, grad_down, weight, z, b, grad_w)
            grad_hk = expert_matmul(gz, a.transpose(1, 2), pairs)  # (N, I)
        grad_mixed = grad_mixed.to(up.dtype)
        grad_pair_w, hk, grad_up, grad_gate = fused.run(
            fused.pairs_backward, up, gate, grad_mixed, token, weight, mask, grad_hk
        )
        grad_w += grad_pair_w
        if grad_hk is not None:
            del grad_hk
            grad_a = expert_weight_grad(gz, hk, pairs, a.shape[0])  # (E, r, I)
        return grad_up, grad_gate, grad_w, None, None, None, None, None, grad_a, grad_b


class GatherRows(torch.autograd.Function):
    """``rows = frozen[token] (+ delta)``: each pair's row of a per-token tensor, plus its own delta.

    Backward sums each token's pairs' gradients (read through ``slots``, (T, K)) into its row; on CPU both
    directions are one fused pass (:mod:`loramix.fused`), elsewhere the sums are added in place into one zero
    tensor (autograd's ``index_select`` backward adds into a copy of one).
    """

    @staticmethod
    def forward(ctx, frozen, token, delta, slots):  # noqa: ANN001, ANN205
        if delta is not None and fused.fusable(frozen):
            rows = fused.run(fused.gather_add, frozen, token, delta.to(frozen.dtype))  # (N, I)
        else:
            rows = frozen.index_select(0, token)  # (N, I)
            if delta is not None:
                rows.add_(delta.to(rows.dtype))
        ctx.save_for_backward(token, slots)
        ctx.num_rows, ctx.delta_dtype = frozen.shape[0], None if delta is None else delta.dtype
        return rows

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        token, slots = ctx.saved_tensors
        grad_frozen = grad_delta = None
        if ctx.needs_input_grad[0]:
            if slots is not None and fused.fusable(grad):
                grad_frozen = fused.run(fused.token_sums, grad, slots)  # (T, I)
            else:
                grad_frozen = grad.new_zeros(ctx.num_rows, grad.shape[1]).index_add_(0, token, grad)  # (T, I)
        if ctx.needs_input_grad[2]:
            grad_delta = grad.to(ctx.delta_dtype)
        return grad_frozen, None, grad_delta, None


def gather_rows(
    frozen: torch.Tensor, token: torch.Tensor, delta: torch.Tensor | None = None, slots: torch.Tensor | None = None
) -> torch.Tensor:
    """``frozen.index_select(0, token) + delta``: frozen (T, I), token (N,), delta (N, I) or None -> (N, I);
    ``slots`` (T, K), the pairs of each token (:attr:`Pairs.slots`), lets backward sum them in one pass."""
    return GatherRows.apply(frozen, token, delta, slots)


def mix_pairs(
    up: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor, pairs: Pairs, num_tokens: int,
    act: torch.nn.Module, mask: torch.Tensor | None = None, scale: float = 1.0, a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:class:`MixPairs` with every tensor cast to ``up``'s dtype (the compute dtype)."""
    dtype = up.dtype
    gate = gate.to(dtype) if gate is not None else None
    a = a.to(dtype) if a is not None else None
    b = b.to(dtype) if b is not None else None
    return MixPairs.apply(up, gate, weight.to(dtype), pairs, num_tokens, act, mask, scale, a, b)
