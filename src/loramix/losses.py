"""Auxiliary router losses as pure functions of a layer's routing (padding masked out)."""

from __future__ import annotations

import torch


def _masked_mean(values: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (T, ...) over real tokens along dim 0."""
    w = token_mask.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))  # (T, 1...)
    return (values * w).sum(dim=0) / w.sum().clamp(min=1.0)


def tokens_per_expert(indices: torch.Tensor, mask: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Count of valid (token, slot) assignments each expert received: (E,) long."""
    return torch.bincount(indices[mask], minlength=num_experts)


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
