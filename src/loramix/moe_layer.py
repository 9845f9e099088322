"""MixLoraFFN: a frozen FFN plus routed LoRA experts, with a fast path and a plain reference path.

Fast path (training and prefill), for T tokens with K slots each: N = T*K (token, slot) pairs, a number the
shapes fix, so nothing is read back to the host and ``torch.compile(fullgraph=True)`` traces the layer whole:
  1. the frozen gate/up projections run once over all T tokens;
  2. each pair adds its expert's LoRA to its token's rows: one grouped GEMM per projection over the pairs
     sorted by expert (``loramix.grouped``; a dense fallback where torch has no grouped kernel). Unused slots
     keep weight 0 and no delta; a token no expert took carries the frozen FFN on its first slot;
  3. the frozen down projection is linear, so it runs once per token on the routing-weighted sum of
     the chosen experts' activations; each expert's own down-LoRA is added on top.
  In training the pairs' activations are recomputed in backward from their gate/up pre-activations
  (``recompute_experts``: ``loramix.grouped.MixPairs``, or activation checkpointing of step 3 under
  ``torch.compile``), so the layer keeps two (N, I) tensors. On CPU the elementwise passes over the pairs run
  as fused loops (``loramix.fused``).
Pairwise path (inference on a few tokens, i.e. decoding): every (token, slot) pair gathers its expert's
LoRA weights and all pairs run as one batched matmul; for a one-token step that beats sorting.
The reference path computes every expert's full FFN for every token and mixes the outputs; tests
check that all paths agree.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fused
from .config import MixLoraConfig
from .dropout import FastDropout, dropout_keep_mask
from .experts import AdapterExperts, ExpertLoRA, FrozenFFN
from .ffn_spec import FFNSpec, linear_shape
from .grouped import (
    Pairs,
    expert_matmul,
    gather_rows,
    grouped_mm_supported,
    mix_pairs,
    routing_pairs,
    token_inputs_matmul,
)
from .precision import compute_dtype
from .routers import Router, Routing, build_router

logger = logging.getLogger(__name__)


class MixLoraFFN(FrozenFFN):
    """Replaces a decoder layer's FFN. ``base`` stays frozen; trainables live under ``mixlora_*``."""

    def __init__(
        self,
        base: nn.Module,
        spec: FFNSpec,
        targets: list[str],
        num_experts: int,
        config: MixLoraConfig,
    ) -> None:
        super().__init__(base, spec)
        self.targets = list(targets)
        self.num_experts = num_experts
        self.expert_type = config.expert_type
        self.use_reference = False  # switch to the loop-over-experts path (debugging, tests)
        self.pairwise_max_pairs = 16  # inference with at most this many (token, slot) pairs: pairwise path
        # training: recompute the pairs' activations in backward instead of storing them (see mixlora_fast)
        self.recompute_experts = True
        self._compiled: Any = None  # torch.compile'd route_pairwise (compile_decode), or None
        hidden, intermediate = linear_shape(self.proj("up"))
        self.mixlora_router = build_router(hidden, num_experts, config)
        self.mixlora_dropout = FastDropout(config.dropout)
        if config.expert_type == "mixlora":
            self.mixlora_experts = nn.ModuleDict()
            for role in self.targets:
                fan_in, fan_out = linear_shape(self.proj(role))
                self.mixlora_experts[role] = ExpertLoRA(num_experts, fan_in, fan_out, config.r, config.scaling)
        else:
            self.mixlora_adapters = AdapterExperts(num_experts, hidden, config.r, self.act)
            # shape (1,), not a scalar: FSDP2 (fully_shard) cannot shard 0-dim parameters
            self.mixlora_scale = nn.Parameter(torch.tensor([float(config.adapter_scale_init)]))
        self.token_mask: torch.Tensor | None = None  # set per forward by the model hook
        self.last_routing: Routing | None = None  # kept for the aux loss and statistics

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        token_mask = self._flat_token_mask(shape)
        if self.uses_pairwise(x.shape[0]):
            out, routing = self._decode(x, token_mask)
        else:
            routing = self.mixlora_router(x, token_mask)
            if self.expert_type == "adapter":
                out = self.adapter_reference(x, routing) if self.use_reference else self.adapter_fast(x, routing)
            elif self.use_reference:
                out = self.mixlora_reference(x, routing)
            else:
                out = self.mixlora_fast(x, routing)
        self.last_routing = routing
        return out.reshape(shape)

    def uses_pairwise(self, num_tokens: int) -> bool:
        """Inference on at most ``pairwise_max_pairs`` (token, slot) pairs takes the pairwise path."""
        return (
            not self.training
            and self.expert_type == "mixlora"
            and not self.use_reference
            and num_tokens * self.mixlora_router.slots <= self.pairwise_max_pairs
        )

    def route_pairwise(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, Routing]:
        """Router and pairwise experts in one function: the unit that :meth:`compile_decode` compiles."""
        routing = self.mixlora_router(x, token_mask)
        return self.mixlora_pairwise(x, routing), routing

    def compile_decode(self, enable: bool = True, **compile_kwargs: Any) -> None:
        """Run the decoding path (router + pairwise experts) through ``torch.compile``.

        A one-token step is some 80 small ops per layer in eager mode, and their dispatch cost, not the
        arithmetic, is what makes decoding slower than the base model; compiled, they fuse into a few
        kernels. The first call per input shape compiles (seconds); training and long inputs stay eager.
        If compiling fails (no C++ compiler, say), the layer logs it once and goes on in eager mode.
        """
        # the unbound function: a deep copy of the layer must not call back into this one
        self._compiled = torch.compile(MixLoraFFN.route_pairwise, **compile_kwargs) if enable else None

    def _decode(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> tuple[torch.Tensor, Routing]:
        if self._compiled is not None:
            try:
                return self._compiled(self, x, token_mask)
            except Exception as e:  # noqa: BLE001 - any backend failure: the eager path computes the same
                logger.warning("compiled decoding failed (%s: %s); using eager mode", type(e).__name__, e)
                self._compiled = None
        return self.route_pairwise(x, token_mask)

    def _flat_token_mask(self, shape: torch.Size) -> torch.Tensor | None:
        """The attention mask aligned with the current tokens: (B, L) -> (B*T,)."""
        mask = self.token_mask
        if mask is None or len(shape) != 3 or mask.dim() != 2 or mask.shape[0] != shape[0]:
            return None
        return mask[:, -shape[1] :].reshape(-1).bool()  # (T,) last T positions (KV-cache decoding)

    def mixlora_fast(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        num_tokens = x.shape[0]
        dtype = compute_dtype(x)  # the autocast dtype under torch.autocast, else x's
        grouped = grouped_mm_supported(dtype, x.device)
        slots = torch.is_grad_enabled() and fused.fusable(x)  # read only by the fused backward
        pairs = routing_pairs(routing, self.num_experts, grouped, with_slots=slots)  # N = T*K pairs
        # one dropout mask per token (T, H) for every expert's input: half the RNG work
        keep, rescale = dropout_keep_mask(x, self.mixlora_dropout.p, self.mixlora_dropout.training)
        up, gate = self.frozen_projections(x, dtype)  # (T, I) each, frozen projections once per token
        pair_up, pair_gate = self._pair_projections(x.to(dtype), keep, up, gate, pairs, rescale)  # (N, I) each
        weight = pairs.weight.to(dtype)[:, None]  # (N, 1)
        if self.recompute_experts and self.training and torch.is_grad_enabled():
            # backward keeps the pairs' gate/up pre-activations and recomputes the activations from them
            mixed, down_delta = self._mix_pairs_recomputed(pair_up, pair_gate, pairs, weight, num_tokens)
        else:
            mixed, down_delta = self._mix_pairs(pair_up, pair_gate, pairs, weight, num_tokens)
        coverage = torch.zeros(num_tokens, dtype=dtype, device=x.device).index_add(0, pairs.token, weight[:, 0])
        out = self.project_down(mixed, coverage, dtype)  # (T, H) frozen down projection once per token
        if down_delta is not None:
            out = out + down_delta
        return self.finish(out)

    def _pair_projections(
        self, x: torch.Tensor, keep: torch.Tensor | None, up: torch.Tensor, gate: torch.Tensor | None, pairs: Pairs,
        rescale: float,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each pair's gate/up pre-activations (N, I): its token's frozen rows of up/gate (T, I) plus its expert's
        LoRA of the input x (T, H) under the dropout keep-mask ``keep`` (uint8 (T, H) or None) and its factor
        ``rescale``; gate and up share one pass over their stacked A."""
        frozen = {"up": up} if gate is None else {"up": up, "gate": gate}
        deltas: dict[str, torch.Tensor] = {}
        adapted = [role for role in ("gate", "up") if role in frozen and role in self.targets]
        if adapted:
            lora = [self.mixlora_experts[role] for role in adapted]
            a = torch.cat([e.lora_A for e in lora], dim=1) if len(lora) > 1 else lora[0].lora_A  # (E, R, H)
            z = token_inputs_matmul(x, a, pairs, keep)  # (N, R) unscaled rank-R products
            scale = pairs.active.to(z.dtype)[:, None] * (lora[0].scaling * rescale)  # (N, 1): 0 for unused slots
            z = z * scale
            offset = 0
            for role, e in zip(adapted, lora, strict=True):
                r = e.lora_B.shape[-1]
                deltas[role] = expert_matmul(z[:, offset : offset + r], e.lora_B, pairs)  # (N, I)
                offset += r
        rows = {role: gather_rows(t, pairs.token, deltas.get(role), pairs.slots)  # (N, I) each
                for role, t in frozen.items()}
        return rows["up"], rows.get("gate")

    def _mix_pairs_recomputed(
        self, pair_up: torch.Tensor, pair_gate: torch.Tensor | None, pairs: Pairs, weight: torch.Tensor,
        num_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`_mix_pairs` keeping only the pairs' pre-activations for backward: in eager mode through
        :class:`loramix.grouped.MixPairs` (its backward recomputes the activations, an elementwise pass; the
        dropout mask is drawn here and kept as uint8), under ``torch.compile`` as activation checkpointing of
        :meth:`_mix_pairs` (the RNG state is replayed, so the dropout masks are the same)."""
        if torch.compiler.is_compiling():
            return checkpoint(self._mix_pairs, pair_up, pair_gate, pairs, weight, num_tokens, use_reentrant=False)
        if "down" not in self.targets:
            return mix_pairs(pair_up, pair_gate, weight, pairs, num_tokens, self.act)
        down = self.mixlora_experts["down"]
        mask, rescale = dropout_keep_mask(pair_up, self.mixlora_dropout.p, self.mixlora_dropout.training)
        return mix_pairs(pair_up, pair_gate, weight, pairs, num_tokens, self.act, mask, down.scaling * rescale,
                         down.lora_A, down.lora_B)

    def _mix_pairs(
        self, pair_up: torch.Tensor, pair_gate: torch.Tensor | None, pairs: Pairs, weight: torch.Tensor,
        num_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The pairs' activations mixed per token: the routing-weighted sum of the activations (T, I) and of the
        experts' down-LoRA deltas (T, H), or None without down LoRA; weight (N, 1)."""
        h = self.activation(pair_up, pair_gate)  # (N, I) each pair's expert activation
        mixed = h.new_zeros(num_tokens, h.shape[-1]).index_add(0, pairs.token, h * weight)  # (T, I)
        if "down" not in self.targets:
            return mixed, None
        down = self.mixlora_experts["down"]
        h_kept, rescale = self.mixlora_dropout.unscaled(h)  # (N, I); 1/(1-p) goes on the (N, r) product
        z = expert_matmul(h_kept, down.lora_A, pairs)  # (N, r)
        z = z * (weight * pairs.active.to(weight.dtype)[:, None] * (down.scaling * rescale))  # weighted, scaled
        delta = expert_matmul(z, down.lora_B, pairs)  # (N, H)
        return mixed, delta.new_zeros(num_tokens, delta.shape[-1]).index_add(0, pairs.token, delta)  # (T, H)

    def _pair_delta(self, role: str, inp: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """LoRA delta of ``role`` for each pair: input (N, in), expert ids (N,) -> (N, out)."""
        lora = self.mixlora_experts[role]
        inp = inp.to(compute_dtype(inp))
        a = lora.lora_A.index_select(0, experts).to(inp.dtype)  # (N, r, in)
        b = lora.lora_B.index_select(0, experts).to(inp.dtype)  # (N, out, r)
        z = torch.bmm(inp[:, None, :], a.transpose(1, 2)) * lora.scaling  # (N, 1, r)
        return torch.bmm(z, b.transpose(1, 2)).squeeze(1)  # (N, out)

    def mixlora_pairwise(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Inference for few tokens: gathered expert weights, batched over the T*k (token, slot) pairs."""
        num_tokens, k = routing.indices.shape
        dtype = compute_dtype(x)
        experts = routing.indices.reshape(-1)  # (N,) N = T*k, slot-major within each token
        weight = (routing.weights * routing.mask).to(dtype)  # (T, k) 0 for unused slots
        up, gate = self.frozen_projections(x, dtype)  # (T, I) each
        pair_up = up.repeat_interleave(k, dim=0)  # (N, I)
        pair_gate = gate.repeat_interleave(k, dim=0) if gate is not None else None  # (N, I)
        pair_x = x.to(dtype).repeat_interleave(k, dim=0)  # (N, H)
        if "up" in self.targets:
            pair_up = pair_up + self._pair_delta("up", pair_x, experts)
        if pair_gate is not None and "gate" in self.targets:
            pair_gate = pair_gate + self._pair_delta("gate", pair_x, experts)
        h = self.activation(pair_up, pair_gate)  # (N, I)
        mixed = torch.bmm(weight[:, None, :], h.view(num_tokens, k, -1)).squeeze(1)  # (T, I)
        coverage = weight.sum(dim=-1)  # (T,)
        dropped = (~routing.mask.any(dim=-1)).to(dtype)  # (T,) tokens no expert took: frozen FFN
        mixed = mixed + dropped[:, None] * self.activation(up, gate)
        out = self.project_down(mixed, coverage + dropped, dtype)  # (T, H)
        if "down" in self.targets:
            delta = self._pair_delta("down", h, experts)  # (N, H)
            out = out + torch.bmm(weight[:, None, :], delta.view(num_tokens, k, -1)).squeeze(1)  # (T, H)
        return self.finish(out)

    def mixlora_reference(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Plain loop: every expert's full FFN on every token, mixed by a dense weight matrix."""
        dtype = compute_dtype(x)
        dense = self._dense_weights(routing, dtype)  # (T, E)
        out = torch.zeros_like(x, dtype=dtype)
        for e in range(self.num_experts):
            xd = self.mixlora_dropout(x)
            proj = {}
            for role in self.spec.roles():
                if role == "down":
                    continue
                proj[role] = self.proj(role)(x)
                if role in self.targets:
                    proj[role] = proj[role] + self.mixlora_experts[role].expert(xd, e)
            h = self.activation(proj["up"], proj.get("gate"))  # (T, I)
            y = self.proj("down")(h)
            if "down" in self.targets:
                y = y + self.mixlora_experts["down"].expert(self.mixlora_dropout(h), e)
            out = out + dense[:, e : e + 1] * y
        dropped = ~routing.mask.any(dim=-1)  # (T,)
        base = self.frozen_forward(x)
        out = out + dropped[:, None].to(dtype) * base
        return self.finish(out.to(dtype))

    def adapter_fast(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        dtype = compute_dtype(x)
        pairs = routing_pairs(routing, self.num_experts, grouped_mm_supported(dtype, x.device))  # N = T*K pairs
        adapters = self.mixlora_adapters
        xd = self.mixlora_dropout(x.index_select(0, pairs.token)).to(dtype)  # (N, H) one mask per pair
        z = adapters.act(expert_matmul(xd, adapters.lora_A, pairs))  # (N, r)
        z = z * (pairs.weight * pairs.active).to(dtype)[:, None]  # (N, r) routing-weighted, 0 for unused slots
        delta = expert_matmul(z, adapters.lora_B, pairs)  # (N, H)
        mix = delta.new_zeros(x.shape[0], delta.shape[-1]).index_add(0, pairs.token, delta)  # (T, H)
        return self.base(x).to(dtype) + self.mixlora_scale.to(dtype) * mix

    def adapter_reference(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        dtype = compute_dtype(x)
        dense = self._dense_weights(routing, dtype)  # (T, E)
        mix = sum(
            dense[:, e : e + 1] * self.mixlora_adapters.expert(self.mixlora_dropout(x), e).to(dtype)
            for e in range(self.num_experts)
        )
        return self.base(x).to(dtype) + self.mixlora_scale.to(dtype) * mix

    # --- weights, for export ---------------------------------------------------------------------
    @property
    def router(self) -> Router:
        """The layer's router."""
        return self.mixlora_router

    def expert_weights(self, role: str) -> ExpertLoRA:
        """The LoRA experts on the frozen projection ``role`` (``mixlora`` experts; ``role`` in ``targets``)."""
        return self.mixlora_experts[role]

    @torch.no_grad()
    def adapter_state(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``adapter`` experts: float32 A (E, r, H), B (E, H, r) and the output scale."""
        a, b = self.mixlora_adapters.factors()
        return a, b, float(self.mixlora_scale.detach().float()[0])

    # --- helpers ---------------------------------------------------------------------------------
    def _dense_weights(self, routing: Routing, dtype: torch.dtype) -> torch.Tensor:
        """Routing as a (T, E) matrix with each token's expert weights (0 elsewhere)."""
        num_tokens = routing.indices.shape[0]
        dense = torch.zeros(num_tokens, self.num_experts, dtype=torch.float32, device=routing.indices.device)
        dense = dense.scatter_add(1, routing.indices, routing.weights * routing.mask)  # (T, E)
        return dense.to(dtype)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, type={self.expert_type}, targets={self.targets}"
