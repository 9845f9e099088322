"""The MixLoRA FFN as the vLLM plugin computes it, in plain torch (no vLLM import): routing and experts.

For T tokens and K slots (what loramix's ``MixLoraFFN`` computes in eval mode, ``mixlora_pairwise`` /
``adapter_fast``):

1. the frozen gate/up projection once per token; the router logits in float32 and the router's rule
   (``topk`` choosing with the selection-only balance bias, ``switch`` top-1 with weight 1 and no capacity
   limit, ``dense``, ``top_p``): weights (T, K), 0 for unused slots, and expert ids (T, K);
2. the chosen experts' gate/up deltas ``s * B_e (A_e x)``;
3. one frozen down projection of the router-weighted sum of the slots' activations, plus the experts'
   down deltas.

The deltas take one of two fixed-shape routes, with no loop over experts:

* few (token, slot) pairs (decoding): each pair gathers its expert's A and B and all pairs run as one batched
  matmul (loramix's ``mixlora_pairwise``): the work is the k chosen experts' only;
* many pairs (prefill): x against every expert's A at once (T, E*r), each slot keeping its expert's block,
  times every expert's B stacked (E*r, out); the down deltas are summed over the slots before their B.
  Gathering weights per pair would copy N x r x I values here.

These functions are the plain reference. The plugin serves with the ``*_serving`` functions below, which compute
the same with fewer ops on tensors laid out once at load time (:class:`ServingLayout`): gate's and up's factors
stacked per expert, B transposed with the LoRA scaling folded in, each B read row by row with
``F.embedding_bag`` (only the chosen experts' rows, no gathered copy), and no Python branch on the number of
tokens inside a compiled graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Linear = Callable[[torch.Tensor], torch.Tensor]
#: at most this many (token, slot) pairs: gather each pair's expert weights (decoding); more: the stacked route
PAIRWISE_MAX_PAIRS = 64


def route(x: torch.Tensor, weight: torch.Tensor, balance_bias: torch.Tensor, rule: str, top_k: int,
          top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixing weights (T, K) float32 (0 for unused slots) and expert ids (T, K) of x (T, H), as loramix's
    routers in eval mode; router weight (E, H) and bias (E,) float32."""
    logits = F.linear(x.float(), weight)  # (T, E) routers in float32
    probs = logits.softmax(dim=-1)  # (T, E)
    if rule == "topk":
        idx = (logits + balance_bias).topk(top_k, dim=-1).indices  # (T, k) chosen with the bias
        w = probs.gather(-1, idx)  # (T, k) weighted without it
        return w / w.sum(dim=-1, keepdim=True), idx
    if rule == "switch":  # top-1 with the bias, weight 1; no capacity limit when serving
        idx = (logits + balance_bias).argmax(dim=-1, keepdim=True)  # (T, 1)
        return torch.ones_like(idx, dtype=probs.dtype), idx
    if rule == "dense":
        return probs, torch.arange(probs.shape[-1], device=x.device).expand_as(probs)  # (T, E) each
    if rule == "top_p":  # the fewest experts whose mass reaches top_p (at least one), renormalised
        sorted_probs, idx = probs.sort(dim=-1, descending=True)  # (T, E)
        kept = sorted_probs * ((sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p)  # (T, E)
        return kept / kept.sum(dim=-1, keepdim=True), idx
    raise ValueError(f"mixlora.router={rule!r} is unknown; expected topk, switch, dense or top_p")


def _stacked_a(a: torch.Tensor) -> torch.Tensor:
    """Every expert's A (E, r, in) as one (in, E*r) matrix."""
    return a.reshape(-1, a.shape[-1]).t()  # (in, E*r)


def _stacked_b(b_t: torch.Tensor) -> torch.Tensor:
    """Every expert's B, given transposed (E, r, out), as one (E*r, out) matrix (a view)."""
    return b_t.reshape(-1, b_t.shape[-1])  # (E*r, out)


def mixlora_ffn(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: Linear, weights: torch.Tensor,
                idx: torch.Tensor, loras: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float
                ) -> torch.Tensor:
    """``mixlora`` experts: x (T, H), the frozen gate/up projections (T, I), the frozen ``down`` projection,
    routing weights / ids (T, K), and each adapted role's stacked factors A (E, r, in) and B transposed
    (E, r, out): the plugin keeps B that way so that no forward copies it."""
    num_tokens, k = idx.shape
    if num_tokens * k <= PAIRWISE_MAX_PAIRS:
        delta = _pairwise_delta(idx.reshape(-1), loras, scaling)  # gathers the chosen experts' factors
    else:
        delta = _stacked_delta(idx, next(iter(loras.values()))[0].shape[0], loras, scaling)
    pair = {"gate": gate[:, None, :].expand(-1, k, -1), "up": up[:, None, :].expand(-1, k, -1)}  # (T, K, I)
    for role in ("gate", "up"):
        if role in loras:
            pair[role] = pair[role] + delta(role, x[:, None, :].expand(-1, k, -1))  # (T, K, I)
    h = F.silu(pair["gate"]) * pair["up"]  # (T, K, I) each slot's expert activation
    w = weights.to(x.dtype)  # (T, K)
    out = down(torch.bmm(w[:, None, :], h).squeeze(1))  # (T, H) frozen down of the weighted sum, once per token
    if "down" in loras:
        out = out + delta("down", h, w)  # (T, H) the slots' down deltas, weighted and summed
    return out


def _pairwise_delta(experts: torch.Tensor, loras: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float):
    """Deltas by gathering each (token, slot) pair's expert factors; experts (N,) = (T*K,) slot-major per token."""

    def delta(role: str, inp: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        a, b_t = loras[role]
        num_tokens, k, width = inp.shape
        pairs = inp.reshape(num_tokens * k, 1, width)  # (N, 1, in)
        z = torch.bmm(pairs, a.index_select(0, experts).transpose(1, 2)) * scaling  # (N, 1, r)
        out = torch.bmm(z, b_t.index_select(0, experts)).view(num_tokens, k, -1)  # (T, K, out)
        if w is None:
            return out
        return torch.bmm(w[:, None, :], out).squeeze(1)  # (T, out) weighted sum over the slots

    return delta


def _stacked_delta(idx: torch.Tensor, num_experts: int, loras: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   scaling: float):
    """Deltas with every expert's factors stacked: each slot keeps its expert's block of the (T, E*r) product."""
    num_tokens, k = idx.shape

    def delta(role: str, inp: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        a, b_t = loras[role]
        r = a.shape[1]
        slot_mask = F.one_hot(idx, num_experts).to(inp.dtype)  # (T, K, E) which expert each slot holds
        if w is None:  # gate/up: every slot sees the same token input
            z = (inp[:, 0] @ _stacked_a(a)) * scaling  # (T, E*r) every expert's A x, scaled
            z = z.view(num_tokens, 1, num_experts, r) * slot_mask[..., None]  # (T, K, E, r) the slot's block
            return (z.reshape(num_tokens * k, -1) @ _stacked_b(b_t)).view(num_tokens, k, -1)  # (T, K, out)
        z = (inp.reshape(num_tokens * k, -1) @ _stacked_a(a)) * scaling  # (T*K, E*r) each slot's input
        z = z.view(num_tokens, k, num_experts, r) * (slot_mask * w[..., None])[..., None]  # own block, weighted
        return z.sum(dim=1).reshape(num_tokens, -1) @ _stacked_b(b_t)  # (T, out) summed over slots before B

    return delta


def adapter_ffn(x: torch.Tensor, frozen: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``adapter`` experts: the frozen FFN's output (T, H) + scale * sum_k w_k B_e silu(A_e x);
    A (E, r, H), B transposed (E, r, H)."""
    num_tokens = x.shape[0]
    e, r = a.shape[0], a.shape[1]
    dense = (F.one_hot(idx, e).to(x.dtype) * weights.to(x.dtype)[..., None]).sum(dim=1)  # (T, E) expert weights
    z = F.silu(x @ _stacked_a(a))  # (T, E*r) every expert's silu(A x)
    z = (z.view(num_tokens, e, r) * dense[..., None]).reshape(num_tokens, e * r)  # (T, E*r) weighted
    return frozen + scale * (z @ _stacked_b(b))  # (T, H)


# --------------------------------------------------------------------------------------------------
# serving: the same maths on the load-time layout, fewer ops
# --------------------------------------------------------------------------------------------------
def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a (..., 2I) gate/up activation: (..., I)."""
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]) * gate_up[..., half:]  # (..., I)


def serve_route(x: torch.Tensor, weight: torch.Tensor, balance_bias: torch.Tensor, rule: str, top_k: int,
                top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`route` with ``topk``'s weights as the softmax of the chosen logits (the renormalised probabilities
    over the chosen experts, two ops fewer); the other rules as :func:`route`."""
    if rule != "topk":
        return route(x, weight, balance_bias, rule, top_k, top_p)
    logits = F.linear(x.float(), weight)  # (T, E) routers in float32
    idx = (logits + balance_bias).topk(top_k, dim=-1).indices  # (T, k) chosen with the bias
    return logits.gather(-1, idx).softmax(dim=-1), idx  # (T, k) weighted without it


@dataclass(eq=False)
class ServingLayout:
    """One MoE layer's expert tensors as the serving functions read them (views of storage the plugin loads into).

    ``mixlora`` experts (roles the adapter does not train stay zero: they add exactly 0):

    * ``a_gu`` (E, 2r, H): gate's A then up's A per expert; ``None`` when neither is adapted;
    * ``b_gu`` (E*2r, I): gate's then up's B transposed, times the LoRA scaling, one row per
      (expert, role, rank) (row ``e*2r + j``);
    * ``a_down`` (E, r, I) and ``b_down`` (E*r, H): down's A and its scaled, transposed B; ``None`` when down is
      not adapted.

    ``adapter`` experts: ``a_down`` unused, ``a_gu`` (E, r, H) the adapters' A, ``b_down`` (E*r, H) their B
    transposed (the learned ``scale`` is applied to the routing weights).
    """

    num_experts: int
    rank: int
    a_gu: torch.Tensor | None
    b_gu: torch.Tensor | None
    a_down: torch.Tensor | None
    b_down: torch.Tensor | None

    @classmethod
    def from_factors(cls, loras: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> ServingLayout:
        """From each adapted role's A (E, r, in) and B (E, out, r), as loramix's experts and the export hold them."""
        a = next(iter(loras.values()))[0]
        e, r = a.shape[0], a.shape[1]
        a_gu = b_gu = a_down = b_down = None
        if "gate" in loras or "up" in loras:
            some = loras["gate"] if "gate" in loras else loras["up"]
            hidden, inter = some[0].shape[2], some[1].shape[1]
            a_gu = a.new_zeros(e, 2, r, hidden)  # (E, role, r, H)
            b_gu = a.new_zeros(e, 2, r, inter)  # (E, role, r, I)
            for j, role in enumerate(("gate", "up")):
                if role in loras:
                    a_gu[:, j] = loras[role][0]
                    b_gu[:, j] = loras[role][1].transpose(1, 2) * scaling
            a_gu, b_gu = a_gu.view(e, 2 * r, hidden), b_gu.view(e * 2 * r, inter)  # (E, 2r, H), (E*2r, I)
        if "down" in loras:
            a_down = loras["down"][0]  # (E, r, I)
            b_down = (loras["down"][1].transpose(1, 2) * scaling).reshape(e * r, -1)  # (E*r, H)
        return cls(e, r, a_gu, b_gu, a_down, b_down)

    @classmethod
    def from_adapters(cls, a: torch.Tensor, b: torch.Tensor) -> ServingLayout:
        """From ``adapter`` experts' A (E, r, H) and B (E, H, r)."""
        e, r = a.shape[0], a.shape[1]
        return cls(e, r, a, None, None, b.transpose(1, 2).reshape(e * r, -1))  # B (E*r, H)


def _chosen_a(x: torch.Tensor, a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(T, K, m): each (token, slot) pair's A_e x, for x (T, in), A (E, m, in), expert ids (T, K).

    Eagerly, for at most :data:`PAIRWISE_MAX_PAIRS` pairs (decoding), the chosen experts' A are gathered and
    multiplied per token; otherwise, and always inside a compiled graph (one graph serves every batch size),
    every expert's A runs at once and each pair keeps its expert's block."""
    num_tokens, k = idx.shape
    e, m, width = a.shape
    if not torch.compiler.is_compiling() and num_tokens * k <= PAIRWISE_MAX_PAIRS:
        chosen = a.index_select(0, idx.reshape(-1)).view(num_tokens, k * m, width)  # (T, K*m, in)
        return torch.bmm(chosen, x.view(num_tokens, width, 1)).view(num_tokens, k, m)  # (T, K, m)
    every = F.linear(x, a.view(e * m, width)).view(num_tokens, e, m)  # (T, E, m) every expert's A x
    return every.gather(1, idx[..., None].expand(num_tokens, k, m))  # (T, K, m)


def _bag_rows(idx: torch.Tensor, offsets: torch.Tensor, width: int) -> torch.Tensor:
    """Row ids (T, K, len(offsets)) of the pairs' B rows: expert ``e``'s rows are ``e*width + offsets``."""
    return torch.add(offsets, idx[..., None], alpha=width)  # (T, K, n)


def mixlora_ffn_serving(x: torch.Tensor, gate_up: torch.Tensor, down: Linear, weights: torch.Tensor,
                        idx: torch.Tensor, layout: ServingLayout, offsets: torch.Tensor,
                        act_and_mul: Linear = silu_and_mul) -> torch.Tensor:
    """:func:`mixlora_ffn` on a :class:`ServingLayout`: x (T, H), the frozen merged gate/up projection (T, 2I),
    the frozen ``down`` projection, routing weights / ids (T, K); ``offsets`` = ``arange(2r)``;
    ``act_and_mul`` maps (..., 2I) to silu(gate) * up (..., I)."""
    num_tokens, k = idx.shape
    r = layout.rank
    w = weights.to(x.dtype)  # (T, K)
    pre = gate_up[:, None, :]  # (T, 1, 2I) the frozen part every slot shares
    if layout.a_gu is not None:
        z = _chosen_a(x, layout.a_gu, idx)  # (T, K, 2r): each pair's gate and up A x
        rows = _bag_rows(idx, offsets, 2 * r).view(num_tokens * k * 2, r)  # (T*K*2, r) one bag per (pair, role)
        delta = F.embedding_bag(rows, layout.b_gu, per_sample_weights=z.reshape(num_tokens * k * 2, r),
                                mode="sum")  # (T*K*2, I) each pair's scaled gate and up B (A x)
        pre = pre + delta.view(num_tokens, k, -1)  # (T, K, 2I) merged gate/up per slot
    else:
        pre = pre.expand(num_tokens, k, -1)  # (T, K, 2I)
    h = act_and_mul(pre)  # (T, K, I) each slot's expert activation
    out = down(torch.bmm(w[:, None, :], h).view(num_tokens, -1))  # (T, H) frozen down of the weighted sum
    if layout.a_down is None:
        return out
    zd = _chosen_a(h.reshape(num_tokens * k, -1), layout.a_down, idx.reshape(num_tokens * k, 1))  # (T*K, 1, r)
    zd = zd.view(num_tokens, k, r) * w[..., None]  # (T, K, r) weighted by the slot's routing weight
    rows = _bag_rows(idx, offsets[:r], r).view(num_tokens, k * r)  # (T, K*r) one bag per token
    return out + F.embedding_bag(rows, layout.b_down, per_sample_weights=zd.view(num_tokens, k * r), mode="sum")


def adapter_ffn_serving(x: torch.Tensor, frozen: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor,
                        layout: ServingLayout, scale: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """:func:`adapter_ffn` on a :class:`ServingLayout`: the frozen FFN's output (T, H) + scale * sum_k w_k
    B_e silu(A_e x), only the chosen experts' B rows read."""
    num_tokens, k = idx.shape
    r = layout.rank
    z = F.silu(_chosen_a(x, layout.a_gu, idx))  # (T, K, r) each pair's silu(A x)
    z = z * (weights.to(x.dtype) * scale)[..., None]  # (T, K, r) weighted
    rows = _bag_rows(idx, offsets[:r], r).view(num_tokens, k * r)  # (T, K*r) one bag per token
    return frozen + F.embedding_bag(rows, layout.b_down, per_sample_weights=z.view(num_tokens, k * r), mode="sum")
