"""Routers: map each token to experts and mixing weights, always in float32.

Every router returns a :class:`Routing` of fixed-width ``(T, K)`` tensors plus a validity mask, so the
dispatch code never needs to know which rule picked the experts. Routers are registered by name in
``loramix.config.ROUTERS`` (read here as ``ROUTERS``) and built with :func:`build_router`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import config
from .config import MixLoraConfig


@dataclass
class Routing:
    """The routing decision for ``T`` tokens over ``E`` experts (``K`` slots per token)."""

    weights: torch.Tensor  # (T, K) float32 mixing weight of each slot (0 where not valid)
    indices: torch.Tensor  # (T, K) long expert id of each slot
    mask: torch.Tensor  # (T, K) bool: the slot is used (False for dropped/unused slots and padding)
    logits: torch.Tensor  # (T, E) float32 router logits (after noise, if any)
    probs: torch.Tensor  # (T, E) float32 softmax(logits)
    token_mask: torch.Tensor | None = None  # (T,) bool real (non-padding) tokens; set by Router.forward


class Router(nn.Module):
    """Linear router ``logits = x W^T`` computed in float32; subclasses choose the experts."""

    def __init__(self, hidden_size: int, num_experts: int, config: MixLoraConfig) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.jitter = config.router_jitter
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, std=config.router_init_scale)
        self.bias_rate = config.balance_bias_rate
        # Auxiliary-loss-free balancing: a selection-only bias and the assignments counted since its last
        # update. Both are saved with the adapter, so a resumed run continues exactly.
        self.register_buffer("balance_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("balance_pending", torch.zeros(num_experts, dtype=torch.float32))

    @property
    def slots(self) -> int:
        """Expert slots per token (the K of :class:`Routing`): fixed by the rule, known before routing."""
        return self.num_experts

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # (T, H) routing is done in float32 whatever the model dtype
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return F.linear(x, self.weight.float())  # (T, E)

    def selection_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Scores that pick the experts: the logits plus the balance bias (mixing weights never see it)."""
        return logits + self.balance_bias  # (T, E)

    @torch.no_grad()
    def record_assignments(self, counts: torch.Tensor) -> None:
        """Add one forward's per-expert assignment counts (E,) to those awaiting the next bias update."""
        self.balance_pending += counts.to(self.balance_pending)

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """``b_e += rate * sign(mean_load - load_e)`` from the pending counts, which are then cleared.

        Counts are summed over ranks first (:func:`update_balance_biases`), so every rank keeps the
        same bias.
        """
        load = self.balance_pending
        if self.bias_rate > 0:  # a step with no assignments (load all 0) leaves the bias as it is: sign(0) = 0
            self.balance_bias += self.bias_rate * torch.sign(load.mean() - load)
        load.zero_()

    @torch.no_grad()
    def export_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Detached float32 copies of the router weight (E, H) and the selection-only balance bias (E,)."""
        return self.weight.detach().float().clone(), self.balance_bias.detach().float().clone()

    @contextlib.contextmanager
    def serving_rule(self, drop_balance_bias: bool = False) -> Iterator[None]:
        """Route as a served model does: without a batch-dependent capacity limit and, if asked, without the
        balance bias; restored on exit."""
        saved = self.balance_bias.clone()
        if drop_balance_bias:
            self.balance_bias.zero_()
        try:
            yield
        finally:
            self.balance_bias.copy_(saved)

    def select(self, logits: torch.Tensor, token_mask: torch.Tensor) -> Routing:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> Routing:
        """Route ``x`` (T, H); ``token_mask`` (T,) marks real (non-padding) tokens."""
        if token_mask is None:
            token_mask = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        with torch.autocast(x.device.type, enabled=False):  # autocast would run the router's matmul in bf16/fp16
            routing = self.select(self.compute_logits(x), token_mask)
        routing.mask = routing.mask & token_mask[:, None]  # padding never reaches an expert
        routing.weights = routing.weights * routing.mask
        routing.token_mask = token_mask
        return routing


class TopKRouter(Router):
    """Softmax over experts, keep the top-k, renormalise the kept weights to sum to one."""

    def __init__(self, hidden_size: int, num_experts: int, config: MixLoraConfig) -> None:
        super().__init__(hidden_size, num_experts, config)
        self.top_k = min(config.top_k, num_experts)

    @property
    def slots(self) -> int:
        return self.top_k

    def select(self, logits: torch.Tensor, token_mask: torch.Tensor) -> Routing:
        probs = logits.softmax(dim=-1)  # (T, E)
        indices = self.selection_scores(logits).topk(self.top_k, dim=-1).indices  # (T, k)
        weights = probs.gather(-1, indices)  # (T, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        mask = torch.ones_like(indices, dtype=torch.bool)
        return Routing(weights, indices, mask, logits, probs)


class NoisyTopKRouter(TopKRouter):
    """Top-k on logits plus learned Gaussian noise (Shazeer et al. 2017); noise only in training."""

    def __init__(self, hidden_size: int, num_experts: int, config: MixLoraConfig) -> None:
        super().__init__(hidden_size, num_experts, config)
        self.noise = nn.Linear(hidden_size, num_experts, bias=False, dtype=torch.float32)
        nn.init.zeros_(self.noise.weight)

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(x)  # (T, E)
        if self.training:
            # (T, E); the weight is cast too, so a model moved to another dtype still routes in float32
            noise_std = F.softplus(F.linear(x.float(), self.noise.weight.float()))
            logits = logits + torch.randn_like(logits) * noise_std
        return logits


class SwitchRouter(Router):
    """Top-1 with a per-expert capacity (Switch Transformer); tokens over capacity are dropped.

    The kept weight is 1 in value but carries the router probability's gradient (straight-through),
    so the adapted model equals the base at initialisation and the router still learns from the LM loss.
    Dropped tokens fall back to the frozen FFN.
    """

    def __init__(self, hidden_size: int, num_experts: int, config: MixLoraConfig) -> None:
        super().__init__(hidden_size, num_experts, config)
        self.capacity_factor = config.capacity_factor

    @property
    def slots(self) -> int:
        return 1

    @contextlib.contextmanager
    def serving_rule(self, drop_balance_bias: bool = False) -> Iterator[None]:
        factor, self.capacity_factor = self.capacity_factor, math.inf
        try:
            with super().serving_rule(drop_balance_bias):
                yield
        finally:
            self.capacity_factor = factor

    def select(self, logits: torch.Tensor, token_mask: torch.Tensor) -> Routing:
        probs = logits.softmax(dim=-1)  # (T, E)
        top_idx = self.selection_scores(logits).argmax(dim=-1)  # (T,)
        top_prob = probs.gather(-1, top_idx[:, None]).squeeze(-1)  # (T,)
        # capacity = max(1, ceil(factor * real tokens / E)), kept a tensor: no host sync, no graph break
        capacity = (token_mask.sum().double() * self.capacity_factor / self.num_experts).ceil().clamp(min=1)
        experts = torch.arange(self.num_experts, device=logits.device)  # (E,)
        one_hot = ((top_idx[:, None] == experts) & token_mask[:, None]).long()  # (T, E), no F.one_hot: it reads the ids
        position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1)  # (T,) 1-based slot in its expert
        keep = (position >= 1) & (position <= capacity)  # (T,)
        weight = top_prob - top_prob.detach() + 1.0  # value 1, gradient of the probability
        return Routing(weight[:, None], top_idx[:, None], keep[:, None], logits, probs)


class DenseRouter(Router):
    """Soft mixture of all experts with softmax weights (no sparsity)."""

    def select(self, logits: torch.Tensor, token_mask: torch.Tensor) -> Routing:
        probs = logits.softmax(dim=-1)  # (T, E)
        indices = torch.arange(self.num_experts, device=logits.device).expand_as(probs)  # (T, E)
        mask = torch.ones_like(probs, dtype=torch.bool)
        return Routing(probs, indices, mask, logits, probs)


class TopPRouter(Router):
    """The fewest experts whose probability mass reaches ``top_p`` (at least one), renormalised."""

    def __init__(self, hidden_size: int, num_experts: int, config: MixLoraConfig) -> None:
        super().__init__(hidden_size, num_experts, config)
        self.top_p = config.top_p

    def select(self, logits: torch.Tensor, token_mask: torch.Tensor) -> Routing:
        probs = logits.softmax(dim=-1)  # (T, E)
        sorted_probs, indices = probs.sort(dim=-1, descending=True)  # (T, E)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (T, E) mass of the better experts
        mask = mass_before < self.top_p  # the first slot always qualifies
        kept = sorted_probs * mask
        weights = kept / kept.sum(dim=-1, keepdim=True)
        return Routing(weights, indices, mask, logits, probs)


ROUTERS: dict[str, type[Router]] = {name: globals()[cls] for name, cls in config.ROUTERS.items()}
"""Name -> router class, from the one registry ``loramix.config.ROUTERS`` (name -> class name in this module)."""


def build_router(hidden_size: int, num_experts: int, config: MixLoraConfig) -> Router:
    return ROUTERS[config.router](hidden_size, num_experts, config)


# --- the balance bias over all MoE layers ---------------------------------------------------------
def record_assignments(layers: Sequence[nn.Module], table: torch.Tensor) -> None:
    """Queue each routed layer's row of ``table`` ((L, E_max) tokens per expert, from
    :func:`loramix.losses.aux_loss`) for its router's next balance-bias update."""
    routed = [layer for layer in layers if layer.last_routing is not None]  # the rows of table, in order
    for layer, row in zip(routed, table, strict=True):
        if layer.mixlora_router.bias_rate > 0:
            layer.mixlora_router.record_assignments(row[: layer.num_experts])


@torch.no_grad()
def update_balance_biases(layers: Sequence[nn.Module]) -> None:
    """Apply the pending assignment counts of every MoE layer to its balance bias, summed over ranks first
    (one all-reduce for all layers) so that every rank keeps the same bias."""
    routers = [layer.mixlora_router for layer in layers if layer.mixlora_router.bias_rate > 0]
    if not routers:
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flat = torch.cat([r.balance_pending for r in routers])  # (sum E,)
        torch.distributed.all_reduce(flat)
        for r, part in zip(routers, flat.split([r.num_experts for r in routers]), strict=True):
            r.balance_pending.copy_(part)
    for r in routers:
        r.update_balance_bias()
