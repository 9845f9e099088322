"""Blended forward and generation: every skill adapter on ONE frozen base, mixed per example.

How it is built. ``loramix.inject`` puts one adapter on a model. ``SkillBlend`` loads each skill in turn
with ``load_adapter`` onto the same base, keeps that skill's adapter modules (the PEFT attention LoRA
matrices and the ``MixLoraFFN`` layers, whose frozen ``base`` is the model's own FFN) and ``unload``s it
again; then every adapted module of the base is wrapped once:

* an attention projection becomes ``BlendLinear``: ``y = W x + sum_k w[b, k] * s_k B_k A_k x``;
* an FFN becomes ``BlendFFN``, holding each skill's ``MixLoraFFN`` (all sharing the one frozen FFN).

``w`` is a (batch, skills) weight matrix set before each forward (``set_weights`` / ``using``); row ``b``
of the batch uses its own row of ``w``, so one batch can hold prompts routed to different skills. A skill
adds work only on the rows where its weight is > 0: in top-1 mode every row runs the frozen base once plus
exactly one skill's adapter branches (rows are gathered per skill, so cost ~ one adapted model). Nothing is
merged into the weights and the base weights are never copied.

What soft mode mixes: the adapters' OUTPUT DELTAS inside every adapted module, per example, with the gate's
weights (fixed for the whole generation, since the gate reads only the prompt):

* LoRA on a linear projection: ``delta_k(x) = s_k B_k A_k x``, so ``W x + sum_k w_k delta_k(x)`` is exactly
  the output of the weight-merged projection ``W + sum_k w_k s_k B_k A_k`` -- the per-example, dynamic
  form of PEFT's static ``add_weighted_adapter(combination_type="cat")``, without materialising it.
  Plain-LoRA skills (``adapter="lora"``: one always-on expert) are mixed this way in the FFN too
  (per gate/up/down projection), so a blend of LoRA skills with fixed weights equals the static merge.
* a MixLoRA FFN (several experts and a router) has no single weight delta: its router mixes whole expert
  FFNs after the nonlinearity. There the unit is the FFN block: ``FFN_mix(x) = sum_k w_k FFN_k(x)`` (with
  ``sum_k w_k = 1``, i.e. ``FFN(x) + sum_k w_k (FFN_k(x) - FFN(x))``), each skill routing its tokens with its
  own router. A layer is mixed per projection only when every skill present there is a single-expert LoRA.

Why deltas and not next-token distributions: mixing inside the network needs one forward pass and ONE KV
cache for the whole batch (mixing log-probs or logits of K separately adapted models needs K passes and K
caches), the base computation is shared by all skills, and the result is the per-prompt counterpart of a
weight merge, which makes soft blends and static merges directly comparable. A one-hot row reduces exactly
to that skill's adapter alone (the other branches are skipped), so top-1 output equals the single adapter's.

Weight rows must be non-negative and sum to 1 (a convex mixture) or be all zero (the frozen base).
``set_weights(None)`` runs the frozen base for any batch (the gate's prompt embedding uses this).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_adapter
from ..injection import get_state, unload
from ..moe_layer import MixLoraFFN
from .library import SkillLibrary, SkillLibraryError, base_fingerprint

ROW_SUM_TOL = 1e-4
BASE_EPS = 1e-6


class BlendContext:
    """The per-row skill weights shared by every blend module of one model."""

    def __init__(self, num_skills: int) -> None:
        self.num_skills = num_skills
        self.weights: torch.Tensor | None = None  # (B, K) float32 on the model device
        self.mask: torch.Tensor | None = None  # (B, L) attention mask of the current forward
        self._select: dict[int, tuple[torch.Tensor | None, torch.Tensor] | None] = {}

    def set(self, weights: torch.Tensor | None, device: torch.device) -> None:
        if weights is None:
            self.weights, self._select = None, {}
            return
        w = torch.as_tensor(weights, dtype=torch.float32).to(device)
        if w.dim() != 2 or w.shape[1] != self.num_skills:
            raise ValueError(f"blend weights must be (batch, {self.num_skills}), got {tuple(w.shape)}")
        sums = w.sum(-1)
        bad = (w < 0).any(-1) | (((sums - 1).abs() > ROW_SUM_TOL) & (sums.abs() > ROW_SUM_TOL))
        if bad.any():
            raise ValueError(
                f"blend weight rows must be >= 0 and sum to 1 (or be all zero = base); bad rows: "
                f"{bad.nonzero().flatten().tolist()}"
            )
        self.weights = w
        self._select = {}
        for k in range(self.num_skills):
            col = w[:, k]
            on = col > 0
            if not on.any():
                self._select[k] = None
            elif on.all():
                self._select[k] = (None, col)
            else:
                rows = on.nonzero().flatten()
                self._select[k] = (rows, col[rows])

    def select(self, k: int) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """(rows or None for all rows, their weights) of skill ``k``; None when no row uses it."""
        return self._select.get(k)

    def check(self, x: torch.Tensor) -> None:
        if self.weights is not None and x.shape[0] != self.weights.shape[0]:
            raise RuntimeError(
                f"blend weights are set for {self.weights.shape[0]} rows but the model got a batch of "
                f"{x.shape[0]}; set weights for each batch (beam search and num_return_sequences > 1 are "
                "not supported)"
            )


def _take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def _add(y: torch.Tensor, rows: torch.Tensor | None, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``y[rows] += w[:, None, ...] * d`` out of place (``rows`` None = every row)."""
    d = d * w.reshape(-1, *([1] * (d.dim() - 1))).to(d.dtype)
    return y + d.to(y.dtype) if rows is None else y.index_add(0, rows, d.to(y.dtype))


class LoraBranch(nn.Module):
    """One skill's LoRA on one linear projection (the PEFT modules, reused as they were trained)."""

    def __init__(self, skill: int, lora_a: nn.Module, lora_b: nn.Module, scaling: float, dropout: nn.Module) -> None:
        super().__init__()
        self.skill = skill
        self.lora_A = lora_a
        self.lora_B = lora_b
        self.scaling = float(scaling)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling  # PEFT's own order of operations


class BlendLinear(nn.Module):
    """A frozen projection plus the per-row weighted LoRA deltas of every skill that adapts it."""

    def __init__(self, base: nn.Module, branches: list[LoraBranch], ctx: BlendContext) -> None:
        super().__init__()
        self.base = base
        self.branches = nn.ModuleList(branches)
        self.ctx = ctx

    @property
    def weight(self) -> torch.Tensor:  # code that inspects q_proj.weight (dtype, device) keeps working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        if self.ctx.weights is None:
            return y
        self.ctx.check(x)
        for br in self.branches:
            sel = self.ctx.select(br.skill)
            if sel is not None:
                rows, w = sel
                y = _add(y, rows, br(_take(x, rows)), w)
        return y


def _per_projection(layer: MixLoraFFN, config: Any) -> bool:
    """A single always-on LoRA expert is a plain LoRA on each FFN projection (linear deltas)."""
    return layer.num_experts == 1 and layer.expert_type == "mixlora" and config.router != "switch"


class BlendFFN(nn.Module):
    """A frozen FFN plus every skill's MixLoraFFN (sharing it), mixed per row (see the module docstring)."""

    def __init__(self, base: nn.Module, members: list[tuple[int, MixLoraFFN, bool]], ctx: BlendContext) -> None:
        super().__init__()
        self.base = base
        self.members = nn.ModuleList([m for _, m, _ in members])
        self.skills = [k for k, _, _ in members]
        self.per_projection = all(linear for _, _, linear in members)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.weights is None:
            return self.base(x)
        self.ctx.check(x)
        return self._per_projection(x) if self.per_projection else self._per_block(x)

    def _per_block(self, x: torch.Tensor) -> torch.Tensor:
        w = self.ctx.weights
        out = torch.zeros_like(x)
        base_w = 1.0 - w[:, self.skills].sum(-1)  # rows (partly) on the base or on skills absent here
        base_rows = (base_w > BASE_EPS).nonzero().flatten()
        if base_rows.numel():
            out = _add(out, base_rows, self.base(x.index_select(0, base_rows)), base_w[base_rows])
        for k, member in zip(self.skills, self.members, strict=True):
            sel = self.ctx.select(k)
            if sel is None:
                continue
            rows, wk = sel
            mask = self.ctx.mask
            member.token_mask = _take(mask, rows) if mask is not None and mask.shape[0] == x.shape[0] else None
            try:
                out = _add(out, rows, member(_take(x, rows)), wk)
            finally:
                member.token_mask = None
        return out

    def _per_projection(self, x: torch.Tensor) -> torch.Tensor:
        first: MixLoraFFN = self.members[0]
        up = first.proj("up")(x)
        gate = first.proj("gate")(x) if first.spec.gated else None
        active = []
        for k, member in zip(self.skills, self.members, strict=True):
            sel = self.ctx.select(k)
            if sel is None:
                continue
            rows, wk = sel
            active.append((member, rows, wk))
            xd = member.mixlora_dropout(_take(x, rows))
            lora = member.mixlora_experts
            if "up" in member.targets:
                up = _add(up, rows, lora["up"].expert(xd, 0), wk)
            if gate is not None and "gate" in member.targets:
                gate = _add(gate, rows, lora["gate"].expert(xd, 0), wk)
        h = first.activation(up, gate)
        out = first.proj("down")(h)
        for member, rows, wk in active:
            if "down" in member.targets:
                hd = member.mixlora_dropout(_take(h, rows))
                out = _add(out, rows, member.mixlora_experts["down"].expert(hd, 0), wk)
        return first.finish(out)


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


class SkillBlend:
    """A frozen base carrying every skill adapter of a library, mixed per example by a weight matrix."""

    def __init__(self, model: nn.Module, tokenizer: Any, skills: list[str], adapter_dirs: list[str | os.PathLike]):
        """Wrap ``model`` (a plain base, modified in place; ``remove()`` restores it) with ``adapter_dirs``."""
        if len(skills) != len(adapter_dirs) or not skills:
            raise ValueError("SkillBlend needs one adapter directory per skill (at least one)")
        self.model = model
        self.tokenizer = tokenizer
        self.skills = list(skills)
        self.ctx = BlendContext(len(skills))
        attn: dict[str, list[LoraBranch]] = {}
        ffn: dict[str, list[tuple[int, MixLoraFFN, bool]]] = {}
        ffn_base: dict[str, nn.Module] = {}
        self.configs = []
        for k, directory in enumerate(adapter_dirs):
            load_adapter(model, Path(directory))  # verifies architecture, checksums, names and shapes
            state = get_state(model)
            self.configs.append(state.config)
            try:
                for name in state.attn_targets:
                    mod = model.get_submodule(name)
                    attn.setdefault(name, []).append(LoraBranch(
                        k, mod.lora_A["default"], mod.lora_B["default"], mod.scaling["default"],
                        mod.lora_dropout["default"]))
                for name, layer in state.moe_layers.items():
                    ffn.setdefault(name, []).append((k, layer, _per_projection(layer, state.config)))
                    ffn_base[name] = layer.base
            finally:
                unload(model)
        self._originals: dict[str, nn.Module] = {}
        for name, branches in attn.items():
            base = model.get_submodule(name)
            self._originals[name] = base
            _set_child(model, name, BlendLinear(base, branches, self.ctx))
        for name, members in ffn.items():
            base = model.get_submodule(name)
            if base is not ffn_base[name]:
                raise RuntimeError(f"{name}: the skills' FFN layers do not share the model's FFN")
            self._originals[name] = base
            _set_child(model, name, BlendFFN(base, members, self.ctx))
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        self._hooks = [
            model.register_forward_pre_hook(self._capture_mask, with_kwargs=True),
            model.register_forward_hook(self._release_mask),
        ]

    # --- construction from a library ---------------------------------------------------------------
    @classmethod
    def from_library(cls, library: SkillLibrary | str | os.PathLike, skills: list[str] | None = None, *,
                     model: str | None = None, device: str | None = None, dtype: str = "auto",
                     check_base: bool = True) -> SkillBlend:
        """Load the library's base (or ``model``, which must have the same fingerprint) with ``skills``."""
        from ..models import load_base_model

        lib = library if isinstance(library, SkillLibrary) else SkillLibrary.open(library)
        names = lib.resolve_names(skills)
        base, tok = load_base_model(model or lib.model_spec, device=device, dtype=dtype)
        if check_base:
            lib.check_base(base_fingerprint(base), model or lib.model_spec)
        return cls(base, tok, names, [lib.adapter_path(n) for n in names])

    # --- weights -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_weights(self, weights: torch.Tensor | list[list[float]] | None) -> None:
        """(batch, skills) weights for the following forwards; None = frozen base for any batch."""
        self.ctx.set(weights, self.device)

    @contextlib.contextmanager
    def using(self, weights: torch.Tensor | list[list[float]] | None) -> Iterator[SkillBlend]:
        self.set_weights(weights)
        try:
            yield self
        finally:
            self.set_weights(None)

    def one_hot(self, skill: str, batch: int = 1) -> torch.Tensor:
        if skill not in self.skills:
            raise SkillLibraryError(f"unknown skill {skill!r}; this blend has: {', '.join(self.skills)}")
        w = torch.zeros(batch, len(self.skills))
        w[:, self.skills.index(skill)] = 1.0
        return w

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]
        self.ctx.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _release_mask(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.ctx.mask = None

    # --- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, weights: torch.Tensor | None,
               attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Logits of one forward with per-row ``weights`` (None = the frozen base)."""
        with self.using(weights):
            out = self.model(input_ids=input_ids.to(self.device), use_cache=False,
                             attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                             **kwargs)
        return out.logits

    @torch.no_grad()
    def generate(self, prompts: list[str], weights: torch.Tensor, *, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 0.9, top_k: int = 50, repetition_penalty: float = 1.0,
                 batch_size: int = 8, chat_template: bool = True, system: str | None = None,
                 seed: int | None = None) -> list[str]:
        """Generate a reply per prompt; row i of ``weights`` blends the adapters for prompt i.

        Prompts are rendered as training renders them (chat template), batches are left-padded and
        decoded with the KV cache by ``transformers``' ``generate`` (greedy when ``temperature == 0``).
        """
        from ..generation import generation_config, render_chat

        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape[0] != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {weights.shape[0]} weight rows")
        tok = self.tokenizer
        cfg = generation_config(self.model, tok, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
        encoded = []
        for p in prompts:
            msgs = ([{"role": "system", "content": system}] if system is not None else [])
            text, add_special = render_chat(tok, [*msgs, {"role": "user", "content": p}], chat_template=chat_template)
            encoded.append(tok(text, add_special_tokens=add_special)["input_ids"])
        if seed is not None:
            torch.manual_seed(seed)
        pad = tok.pad_token_id if tok.pad_token_id is not None else cfg.pad_token_id
        texts: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = encoded[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, row in enumerate(chunk):  # left padding: every prompt ends where generation starts
                ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row):] = 1
            with self.using(weights[start : start + batch_size]):
                out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          generation_config=cfg)
            texts += [tok.decode(row[width:], skip_special_tokens=True) for row in out]
        return texts

    def remove(self) -> nn.Module:
        """Put the original modules back and return the plain base model."""
        for h in self._hooks:
            h.remove()
        for name, module in self._originals.items():
            _set_child(self.model, name, module)
        self._originals = {}
        self.ctx.set(None, self.device)
        return self.model
