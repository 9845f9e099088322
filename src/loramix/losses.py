"""Auxiliary router losses as pure functions of the routing (padding masked out), and their assembly into
the one aux loss a model's forward adds to the language-model loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import MixLoraConfig
from .routers import Routing


def _masked_mean(values: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (T, ...) over real tokens along dim 0."""
    w = token_mask.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))  # (T, 1...)
    return (values * w).sum(dim=0) / w.sum().clamp(min=1.0)


def tokens_per_expert(indices: torch.Tensor, mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Count of valid (token, slot) assignments each expert received: (E,) long, computed on the device (a
    scatter of the slot mask: no ``nonzero`` or ``bincount``, whose output sizes the host would have to read)."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=indices.device)
    return counts.scatter_add(0, indices.reshape(-1), mask.reshape(-1).long())  # (E,)


def load_balance_loss(
    probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """Switch/Mixtral balance loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of valid assignments routed to expert e (no gradient) and ``P_e`` the mean
    router probability of e over real tokens. It equals 1 for perfectly balanced routing and grows
    towards E as routing collapses onto one expert.
    """
    num_experts = probs.shape[-1]
    counts = tokens_per_expert(indices, mask, num_experts).to(probs.dtype)  # (E,)
    f = counts / counts.sum().clamp(min=1.0)  # (E,)
    p = _masked_mean(probs, token_mask)  # (E,)
    return num_experts * (f * p).sum()


def z_loss(logits: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition, keeps logits small and softmax stable."""
    return _masked_mean(torch.logsumexp(logits, dim=-1) ** 2, token_mask)


def router_entropy(probs: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the routing distribution over real tokens."""
    ent = -(probs * torch.log(probs.clamp(min=1e-9))).sum(dim=-1)  # (T,)
    return _masked_mean(ent, token_mask)


def aux_loss(
    routings: Sequence[tuple[Routing, int]], config: MixLoraConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The aux loss of one forward from each MoE layer's ``(routing, num_experts)``, and its statistics.

    ``aux = balance_coef * R_l LB_l + z_loss_coef * R_l Z_l + entropy_coef * R_l H_l``, where ``R`` is the sum
    (default) or the mean over layers (``aux_layer_reduction``). The statistics are
    ``{"tokens_per_expert": (L, E_max) long, "router_entropy": (L,)}``, zero-padded for layers with fewer
    experts.
    """
    balance, zs, ents, counts = [], [], [], []
    for r, num_experts in routings:
        balance.append(load_balance_loss(r.probs, r.indices, r.mask, r.token_mask))
        zs.append(z_loss(r.logits, r.token_mask))
        ents.append(router_entropy(r.probs, r.token_mask))
        counts.append(tokens_per_expert(r.indices, r.mask, num_experts))
    if not counts:
        raise ValueError("aux_loss needs the routing of at least one MoE layer (run a forward first)")
    device = balance[0].device

    def reduce(values: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(values)  # (L,)
        return stacked.sum() if config.aux_layer_reduction == "sum" else stacked.mean()

    aux = torch.zeros((), device=device)
    if config.balance_coef:
        aux = aux + config.balance_coef * reduce(balance)
    if config.z_loss_coef:
        aux = aux + config.z_loss_coef * reduce(zs)
    if config.entropy_coef:
        aux = aux + config.entropy_coef * reduce(ents)
    width = max(c.numel() for c in counts)
    table = torch.zeros(len(counts), width, dtype=torch.long, device=device)  # (L, E_max)
    for i, c in enumerate(counts):
        table[i, : c.numel()] = c
    return aux, {"tokens_per_expert": table, "router_entropy": torch.stack(ents).detach()}
