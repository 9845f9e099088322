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
"""

from __future__ import annotations

from collections.abc import Callable

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
