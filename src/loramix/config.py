"""MixLoraConfig: every knob of a Mixture-of-LoRA-Experts adapter, validated on construction."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROUTERS: dict[str, str] = {
    "topk": "TopKRouter",
    "noisy_topk": "NoisyTopKRouter",
    "switch": "SwitchRouter",
    "dense": "DenseRouter",
    "top_p": "TopPRouter",
}
"""The router registry: each ``MixLoraConfig.router`` name and the class in :mod:`loramix.routers` that
implements it. Config validation, the CLI, ``routers.ROUTERS`` (name -> class) and the tests all read it; it
lives here, beside the config, so validation needs no torch. Adding a router: its class in ``routers.py``,
one line here, and its name in ``MixLoraConfig.router``'s docstring (the ``--router`` help)."""
EXPERT_TYPES = ("mixlora", "adapter")
FFN_ROLES = ("gate", "up", "down")
_FLOAT_FIELDS = (
    "alpha", "dropout", "adapter_scale_init", "top_p", "capacity_factor", "router_init_scale",
    "router_jitter", "attn_alpha", "attn_dropout", "balance_coef", "z_loss_coef", "entropy_coef",
    "balance_bias_rate",
)


class ConfigError(ValueError):
    """A config value or combination is invalid; the message names the field."""


def _fail(field_name: str, msg: str) -> None:
    raise ConfigError(f"MixLoraConfig.{field_name}: {msg}")


def yaml_error_text(error: Exception) -> str:
    """One line for a YAML parse error: ``line L column C: problem`` (PyYAML's own text spans lines)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or str(error)
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split())


@dataclass
class MixLoraConfig:
    """Configuration of a MixLoRA adapter.

    Expert LoRA sits on the FFN (``expert_targets``), a router picks experts per token, and plain
    PEFT LoRA sits on attention (``attn_targets``). Defaults follow the MixLoRA paper's recipe.
    """

    # --- experts ---------------------------------------------------------------------------------
    num_experts: int | list[int] | dict[int, int] = 8
    """Experts per layer: one int for all layers, a list (one per layer) or ``{layer_index: n}``
    (layers not named get ``default_num_experts``). A count of 0 leaves that layer's FFN untouched."""
    default_num_experts: int = 8
    """Count for layers missing from a ``{layer_index: n}`` map."""
    top_k: int = 2
    """Experts per token for ``topk`` / ``noisy_topk`` (more = more compute, smoother mixing)."""
    r: int = 8
    """Rank of each expert's LoRA (``mixlora``) or bottleneck width (``adapter``)."""
    alpha: float = 16.0
    """LoRA scaling numerator: the update is scaled by alpha / r (or alpha / sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the expert LoRA input; off in ``.eval()``."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    expert_targets: list[str] | None = None
    """FFN roles that carry expert LoRA, any of gate, up, down; None = every projection the FFN has
    (gate/up/down on Llama-style FFNs, up/down on GPT-2 style ones)."""
    expert_type: str = "mixlora"
    """``mixlora``: each expert is the frozen FFN with its own LoRA (the MixLoRA paper).
    ``adapter``: frozen FFN output + alpha_adapter * routed mixture of low-rank FFN experts."""
    adapter_scale_init: float = 1.0
    """Initial value of the learnable output scale of ``adapter`` experts."""

    # --- router ----------------------------------------------------------------------------------
    router: str = "topk"
    """One of topk, noisy_topk, switch, dense, top_p."""
    top_p: float = 0.75
    """``top_p`` router: keep the fewest experts whose probability reaches this mass."""
    capacity_factor: float = 1.25
    """``switch`` router: each expert takes at most capacity_factor * tokens / experts tokens."""
    router_init_scale: float = 0.02
    """Std of the router weight's normal init; small = near-uniform routing at the start."""
    router_jitter: float = 0.0
    """Multiplicative uniform input noise (1 +/- jitter) on the router input, training only."""
    balance_bias_rate: float = 0.01
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the router logits only to
    *choose* experts (never to the mixing weights), moves by this much after every training forward:
    up for experts that got fewer than the mean number of tokens, down for the others. It undoes the
    imbalance that a shared direction in the hidden states gives a random router, which the balance loss
    alone corrects too slowly in the last layers. 0 turns it off; no effect on ``dense`` and ``top_p``."""

    # --- attention LoRA (PEFT) -------------------------------------------------------------------
    attn_r: int = 8
    """Rank of the attention LoRA; 0 turns attention LoRA off."""
    attn_alpha: float = 16.0
    """Scale of the attention LoRA: its update is multiplied by attn_alpha / attn_r."""
    attn_dropout: float = 0.05
    """Dropout on the attention LoRA's input during training."""
    attn_targets: list[str] | None = None
    """Attention projection names; None = the architecture's q/k/v/o (c_attn/c_proj for GPT-2)."""

    # --- auxiliary losses ------------------------------------------------------------------------
    balance_coef: float = 0.01
    """Load-balance loss weight (Switch/Mixtral form, padding masked out; summed or averaged over layers as
    ``aux_layer_reduction`` says)."""
    z_loss_coef: float = 0.0
    """Router z-loss weight (keeps router logits small; ST-MoE)."""
    entropy_coef: float = 0.0
    """Router entropy weight: > 0 pushes routing to be decisive, < 0 to spread."""
    aux_layer_reduction: str = "sum"
    """How the per-layer router losses combine: ``sum`` (Switch: every MoE layer adds its own loss, so each
    layer feels the full coefficient) or ``mean`` (Mixtral-style average over layers; weaker per layer)."""

    # --- model structure -------------------------------------------------------------------------
    mlp_name: str = "mlp"
    """Attribute name of the FFN inside each decoder layer."""
    ffn_names: dict[str, str] | None = None
    """Override of role -> module name inside the FFN, e.g. {"gate": "w1", "up": "w3", "down": "w2"}."""

    # --- precision -------------------------------------------------------------------------------
    adapter_dtype: str = "float32"
    """dtype of the trainable weights (expert LoRA and attention LoRA): ``float32`` (default, as PEFT: the
    optimiser never updates them in bf16/fp16, they are cast per forward) or ``model`` (the base model's
    floating dtype, to save memory). Routers always stay float32."""

    def __post_init__(self) -> None:
        for name in ("expert_targets", "attn_targets"):  # list("up") would silently become ["u", "p"]
            if isinstance(getattr(self, name), str):
                _fail(name, f"must be a list of names, not the string {getattr(self, name)!r}")
        if self.expert_targets is not None:
            self.expert_targets = list(self.expert_targets)
        if self.attn_targets is not None:
            self.attn_targets = list(self.attn_targets)
        if isinstance(self.num_experts, dict):
            try:
                self.num_experts = {int(k): v for k, v in self.num_experts.items()}
            except (TypeError, ValueError):
                _fail("num_experts", f"dict keys must be layer indices, got {list(self.num_experts)}")
        self._validate()

    def _validate(self) -> None:
        # Types first, so a wrong type (e.g. r: "8" or 8.0 from a YAML file) names its field instead of
        # surfacing as a TypeError here or deep inside inject().
        for name in ("top_k", "r", "attn_r", "default_num_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                _fail(name, f"must be an int, got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                _fail(name, f"must be a number, got {value!r}")
        if not isinstance(self.use_rslora, bool):
            _fail("use_rslora", f"must be true or false, got {self.use_rslora!r}")
        if self.default_num_experts < 0:
            _fail("default_num_experts", "must be >= 0")
        counts = self._count_values()
        if not counts or any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in counts):
            _fail("num_experts", f"expected a non-negative int, a list or a dict of them, got {self.num_experts!r}")
        if isinstance(self.num_experts, dict) and any(k < 0 for k in self.num_experts):
            _fail("num_experts", "layer indices must be >= 0")
        if self.aux_layer_reduction not in ("sum", "mean"):
            _fail("aux_layer_reduction", f"must be 'sum' or 'mean', got {self.aux_layer_reduction!r}")
        if self.router not in ROUTERS:
            _fail("router", f"unknown router {self.router!r}; choose one of {', '.join(ROUTERS)}")
        if self.expert_type not in EXPERT_TYPES:
            _fail("expert_type", f"unknown expert type {self.expert_type!r}; choose one of {EXPERT_TYPES}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            _fail("top_k", f"must be an int >= 1, got {self.top_k!r}")
        positive = [n for n in counts if n > 0]
        if self.router in ("topk", "noisy_topk") and positive and self.top_k > min(positive):
            _fail("top_k", f"top_k={self.top_k} exceeds the smallest expert count {min(positive)}")
        if self.r < 1:
            _fail("r", f"must be >= 1, got {self.r}")
        if self.alpha <= 0:
            _fail("alpha", f"must be > 0, got {self.alpha}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _fail(name, f"must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.top_p <= 1.0:
            _fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.capacity_factor <= 0:
            _fail("capacity_factor", f"must be > 0, got {self.capacity_factor}")
        if self.router_init_scale < 0:
            _fail("router_init_scale", "must be >= 0")
        if not 0.0 <= self.router_jitter < 1.0:
            _fail("router_jitter", f"must be in [0, 1), got {self.router_jitter}")
        bad = [t for t in self.expert_targets or [] if t not in FFN_ROLES]
        if bad or self.expert_targets == []:
            _fail("expert_targets", f"must be a non-empty subset of {FFN_ROLES}, got {self.expert_targets}")
        if self.attn_r < 0:
            _fail("attn_r", "must be >= 0 (0 turns attention LoRA off)")
        if self.attn_r > 0 and self.attn_alpha <= 0:
            _fail("attn_alpha", "must be > 0")
        if self.attn_r == 0 and not positive:
            _fail("num_experts", f"{self.num_experts!r} gives no layer an expert and attn_r is 0: the adapter "
                  "would have nothing to train; give some layer experts or set attn_r > 0")
        for name in ("balance_coef", "z_loss_coef", "balance_bias_rate"):
            if getattr(self, name) < 0:
                _fail(name, "must be >= 0")
        if self.adapter_dtype not in ("float32", "model"):
            _fail("adapter_dtype", f"must be 'float32' or 'model', got {self.adapter_dtype!r}")
        if self.ffn_names is not None:
            bad = [k for k in self.ffn_names if k not in FFN_ROLES]
            if bad:
                _fail("ffn_names", f"keys must be roles {FFN_ROLES}, got {bad}")

    def _count_values(self) -> list[Any]:
        if isinstance(self.num_experts, dict):
            return [*self.num_experts.values(), self.default_num_experts]
        if isinstance(self.num_experts, list):
            return list(self.num_experts)
        return [self.num_experts]

    # --- helpers ---------------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)

    def experts_for_layer(self, layer: int, num_layers: int) -> int:
        """Expert count of one decoder layer (layer-wise allocation)."""
        if isinstance(self.num_experts, list):
            if len(self.num_experts) != num_layers:
                _fail("num_experts", f"list has {len(self.num_experts)} entries but the model has {num_layers} layers")
            return self.num_experts[layer]
        if isinstance(self.num_experts, dict):
            if any(k >= num_layers for k in self.num_experts):
                _fail("num_experts", f"layer index out of range for a model with {num_layers} layers")
            return self.num_experts.get(layer, self.default_num_experts)
        return self.num_experts

    def experts_per_token(self, num_experts: int) -> int:
        """Upper bound of experts one token uses in a layer with ``num_experts`` experts."""
        if self.router in ("dense", "top_p"):
            return num_experts
        if self.router == "switch":
            return 1
        return min(self.top_k, num_experts)

    # --- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(d["num_experts"], dict):  # JSON keys are strings; keep them explicit
            d["num_experts"] = {str(k): v for k, v in d["num_experts"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MixLoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"MixLoraConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Write JSON or YAML by the file suffix."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> MixLoraConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                d = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {yaml_error_text(e)}") from None
        else:
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON: line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields, got {type(d).__name__}")
        return cls.from_dict(d)
