"""Growable FFN experts: one LoRA expert per discovered skill in every decoder layer's FFN.

Each expert is the frozen FFN with its own LoRA on the FFN projections (the MixLoRA expert form);
experts are mixed per sequence with weights the caller sets (``ExpertBank.route``), so routing can come
from anything -- here the novelty detector's prototype similarities. Experts live in an
``nn.ModuleList`` per layer, so adding one never touches the others, and an old expert can be frozen
(``requires_grad=False``) or pulled towards a snapshot of its values (L2) while the newest one trains.

With weights ``w`` (per sequence, summing to at most one) a layer computes, for every token,
``sum_e w_e FFN_e(x) + (1 - sum_e w_e) FFN_base(x)``; the frozen down projection is linear, so it runs
once on the weighted sum of activations (each expert's down-LoRA is added on top).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..experts import FrozenFFN
from ..ffn_spec import FFNSpec, check_targets, detect_ffn, linear_shape
from ..injection import find_ffns
from ..precision import compute_dtype

GUARDS = ("freeze", "l2", "none")


class FFNExpert(nn.Module):
    """One expert's LoRA pairs on the adapted projections of one FFN: ``delta = s * x A^T B^T``."""

    def __init__(self, shapes: dict[str, tuple[int, int]], r: int, scaling: float) -> None:
        super().__init__()
        self.scaling = scaling
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for role, (fan_in, fan_out) in shapes.items():
            a = torch.empty(r, fan_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's init; B = 0: a new expert equals the base FFN
            self.lora_A[role] = nn.Parameter(a)
            self.lora_B[role] = nn.Parameter(torch.zeros(fan_out, r))

    def delta(self, role: str, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x))
        a, b = self.lora_A[role].to(x.dtype), self.lora_B[role].to(x.dtype)
        return ((x @ a.t()) * self.scaling) @ b.t()


class GrowableFFN(FrozenFFN):
    """A decoder layer's FFN plus a growable list of LoRA experts, mixed by externally set weights."""

    def __init__(self, base: nn.Module, spec: FFNSpec, targets: list[str], r: int, alpha: float, dropout: float):
        super().__init__(base, spec)
        self.targets = list(targets)
        self.r = r
        self.scaling = alpha / r
        self.shapes = {role: linear_shape(self.proj(role)) for role in self.targets}
        self.experts = nn.ModuleList()
        self.expert_dropout = nn.Dropout(dropout)
        self.weights: torch.Tensor | None = None  # (E,) for every row, or (B, E) per sequence; None = base
        self.checkpoint = True  # recompute the expert activations in backward instead of storing them

    def add_expert(self) -> FFNExpert:
        ref = next(self.base.parameters())
        expert = FFNExpert(self.shapes, self.r, self.scaling).to(ref.device)  # float32 master weights
        expert.train(self.training)
        self.experts.append(expert)
        return expert

    def _token_weights(self, shape: torch.Size, w: torch.Tensor) -> torch.Tensor:
        """Weights per token ``(T, E)`` from ``(E,)`` or per-row ``(B, E)`` weights."""
        num_tokens = math.prod(shape[:-1])
        w = w.to(torch.float32)
        if w.dim() == 1:
            return w[None, :].expand(num_tokens, -1)
        if w.dim() != 2 or w.shape[0] != shape[0] or len(shape) < 2:
            raise ValueError(f"routing weights of shape {tuple(w.shape)} do not fit hidden states {tuple(shape)}")
        per_row = num_tokens // shape[0]
        return w[:, None, :].expand(-1, per_row, -1).reshape(num_tokens, -1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self.weights
        if w is None or not len(self.experts):
            return self.base(hidden_states)
        if w.shape[-1] != len(self.experts):
            raise ValueError(f"routing weights have {w.shape[-1]} entries for {len(self.experts)} experts")
        if self.checkpoint and torch.is_grad_enabled() and (
                hidden_states.requires_grad or any(p.requires_grad for p in self.experts.parameters())):
            # keep only the layer's input for the backward pass and recompute the experts' activations there:
            # they cost about ten (tokens x intermediate) tensors per expert that runs, the bulk of the
            # training memory. The weights go in as an argument: the recomputation runs in backward(), when
            # the caller's routing context may have ended. Dropout masks are replayed (RNG state kept).
            return checkpoint(self._mix, hidden_states, w, use_reentrant=False)
        return self._mix(hidden_states, w)

    def _mix(self, hidden_states: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        dtype = compute_dtype(x)  # the autocast dtype under torch.autocast, else x's
        tok_w = self._token_weights(shape, w.to(x.device))  # (T, E) float32
        base_share = 1.0 - tok_w.sum(-1)  # (T,)
        # weights that sum to 1 up to rounding leave no base share (else the base FFN would run for nothing)
        base_share = torch.where(base_share > 1e-6, base_share, torch.zeros_like(base_share))
        up, gate = self.frozen_projections(x, dtype)  # (T, I) each, frozen projections once per token
        xd = self.expert_dropout(x).to(dtype)
        mixed = torch.zeros_like(up)  # (T, I) weighted sum of activations
        down_delta = torch.zeros_like(x, dtype=dtype) if "down" in self.targets else None  # (T, H)
        for e, expert in enumerate(self.experts):
            idx = (tok_w[:, e] > 0).nonzero().squeeze(-1)  # tokens this expert serves
            if idx.numel() == 0:
                continue
            we = tok_w[idx, e].to(dtype)[:, None]  # (n, 1)
            xe = xd.index_select(0, idx)
            u = up.index_select(0, idx)
            if "up" in self.targets:
                u = u + expert.delta("up", xe)
            g = None
            if gate is not None:
                g = gate.index_select(0, idx)
                if "gate" in self.targets:
                    g = g + expert.delta("gate", xe)
            h = self.activation(u, g)  # (n, I)
            mixed = mixed.index_add(0, idx, h * we)
            if down_delta is not None:
                down_delta = down_delta.index_add(0, idx, expert.delta("down", self.expert_dropout(h)) * we)
        if bool((base_share > 0).any()):
            h_base = self.activation(up, gate)
            mixed = mixed + base_share.to(dtype)[:, None] * h_base
        out = self.project_down(mixed, tok_w.sum(-1) + base_share, dtype)  # (T, H)
        if down_delta is not None:
            out = out + down_delta
        return self.finish(out).reshape(shape)

    def extra_repr(self) -> str:
        return f"experts={len(self.experts)}, targets={self.targets}, r={self.r}"


class ExpertBank:
    """Attaches a :class:`GrowableFFN` to every decoder-layer FFN of ``model`` (in place) and manages
    the experts across layers: add, freeze, L2 snapshot, routing weights, save/load, detach.

    The base model is frozen by :meth:`attach` (its ``requires_grad`` flags are restored by
    :meth:`detach`). Trainable parameter names contain ``lora_``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        targets: list[str] | None = None,
        mlp_name: str = "mlp",
        ffn_names: dict[str, str] | None = None,
    ) -> None:
        if r < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"ExpertBank: need r >= 1, alpha > 0, 0 <= dropout < 1 (got {r}, {alpha}, {dropout})")
        self.model = model
        self.settings = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets, "mlp_name": mlp_name,
                         "ffn_names": ffn_names}
        self.names: list[str] = []
        self.layers: list[GrowableFFN] = []
        self.snapshots: dict[int, list[torch.Tensor]] = {}  # expert -> its values when it was frozen for L2
        self._requires_grad: dict[str, bool] = {}
        self.attach()

    # --- attach / detach -----------------------------------------------------------------------------
    def attach(self) -> None:
        if self.layers:
            raise RuntimeError("ExpertBank is already attached")
        if any(isinstance(m, GrowableFFN) for m in self.model.modules()):
            raise ValueError("model already carries growable experts (another ExpertBank); detach it first")
        s = self.settings
        ffns = find_ffns(self.model, s["mlp_name"])
        specs = []
        for _, name in ffns:
            mlp = self.model.get_submodule(name)
            spec = detect_ffn(mlp, s["ffn_names"])
            specs.append((spec, check_targets(spec, s["targets"], mlp)))
        self._requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for (_, name), (spec, targets) in zip(ffns, specs, strict=True):
            parent, child = name.rsplit(".", 1)
            base = self.model.get_submodule(name)
            layer = GrowableFFN(base, spec, targets, s["r"], s["alpha"], s["dropout"])
            layer.train(base.training)
            setattr(self.model.get_submodule(parent), child, layer)
            self.names.append(name)
            self.layers.append(layer)

    def detach(self) -> nn.Module:
        """Put the original FFNs back and restore ``requires_grad``; returns the base model."""
        for name, layer in zip(self.names, self.layers, strict=True):
            parent, child = name.rsplit(".", 1)
            setattr(self.model.get_submodule(parent), child, layer.base)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        self.names, self.layers = [], []
        return self.model

    # --- experts -------------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.layers[0].experts) if self.layers else 0

    def add_expert(self) -> int:
        """Append one new (identity-initialised) expert to every layer; returns its id."""
        for layer in self.layers:
            layer.add_expert()
        return self.num_experts - 1

    def expert_parameters(self, expert: int) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.experts[expert].parameters()]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for e in range(self.num_experts) for p in self.expert_parameters(e) if p.requires_grad]

    def set_trainable(self, expert: int, trainable: bool) -> None:
        for p in self.expert_parameters(expert):
            p.requires_grad_(trainable)

    def is_trainable(self, expert: int) -> bool:
        return all(p.requires_grad for p in self.expert_parameters(expert))

    def copy_expert(self, expert: int) -> list[torch.Tensor]:
        """A copy of an expert's values, in :meth:`expert_parameters` order (see :meth:`load_expert`)."""
        return [p.detach().clone() for p in self.expert_parameters(expert)]

    def load_expert(self, expert: int, values: list[torch.Tensor]) -> None:
        """Set an expert's parameters to ``values`` taken by :meth:`copy_expert`."""
        with torch.no_grad():
            for p, v in zip(self.expert_parameters(expert), values, strict=True):
                p.copy_(v)

    def take_snapshot(self, expert: int) -> None:
        """Remember an expert's current values: the anchor of :meth:`l2_penalty`."""
        self.snapshots[expert] = self.copy_expert(expert)

    def l2_penalty(self) -> torch.Tensor:
        """``sum over snapshotted experts of ||theta - theta_snapshot||^2`` (0 when there are none)."""
        ref = next(self.model.parameters())
        total = torch.zeros((), device=ref.device)
        for expert, anchors in self.snapshots.items():
            for p, a in zip(self.expert_parameters(expert), anchors, strict=True):
                total = total + (p.float() - a.float()).pow(2).sum()
        return total

    def expert_state(self, expert: int) -> dict[str, torch.Tensor]:
        """A copy of one expert's tensors (names without the layer prefix ambiguity: ``layer.role.A/B``)."""
        return {f"{li}.{n}": p.detach().clone() for li, layer in enumerate(self.layers)
                for n, p in layer.experts[expert].named_parameters()}

    # --- routing -------------------------------------------------------------------------------------
    def set_weights(self, weights: torch.Tensor | None) -> None:
        """Mixing weights for the next forwards: ``(E,)`` for every sequence, ``(B, E)`` per sequence,
        or None for the frozen base model."""
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32)
            if weights.shape[-1] != self.num_experts:
                raise ValueError(f"weights have {weights.shape[-1]} entries for {self.num_experts} experts")
            if bool((weights < 0).any()):
                raise ValueError("routing weights must be >= 0")
        for layer in self.layers:
            layer.weights = weights

    @contextlib.contextmanager
    def route(self, weights: torch.Tensor | None) -> Iterator[None]:
        previous = self.layers[0].weights if self.layers else None
        self.set_weights(weights)
        try:
            yield
        finally:
            self.set_weights(previous)

    def disabled(self) -> contextlib.AbstractContextManager:
        """Run the frozen base model (no expert contributes)."""
        return self.route(None)

    # --- save / load ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"layers.{li}.{n}": p.detach().cpu().contiguous() for li, layer in enumerate(self.layers)
                for n, p in layer.experts.named_parameters()}

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Expert weights (safetensors) + ``experts.json`` (settings, expert count, ``extra``)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), str(directory / "experts.safetensors"))
        meta = {"format": "loramix-continual", "version": 1, "settings": self.settings,
                "num_experts": self.num_experts, "layers": self.names, "extra": extra or {}}
        (directory / "experts.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, model: nn.Module, directory: str | Path) -> tuple[ExpertBank, dict[str, Any]]:
        """Attach a saved bank to ``model`` (all experts frozen); returns it and the saved ``extra``."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / "experts.json").read_text())
        if meta.get("format") != "loramix-continual":
            raise ValueError(f"{directory}: not a loramix continual expert bank")
        bank = cls(model, **meta["settings"])
        for _ in range(meta["num_experts"]):
            bank.add_expert()
        tensors = load_file(str(directory / "experts.safetensors"))
        own = dict(bank.state_dict())
        if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
            bank.detach()
            raise ValueError(f"{directory}: saved expert tensors do not match this model's FFNs")
        with torch.no_grad():
            for li, layer in enumerate(bank.layers):
                for n, p in layer.experts.named_parameters():
                    p.copy_(tensors[f"layers.{li}.{n}"])
        for e in range(bank.num_experts):
            bank.set_trainable(e, False)
        return bank, meta["extra"]
