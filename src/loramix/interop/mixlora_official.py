"""Load adapters of the official MixLoRA package (PyPI ``mixlora`` 0.2.3, TUDB-Labs / MoE-PEFT) into loramix.

An official adapter directory holds ``adapter_config.json`` (``peft_type: "MIXLORA"``) and
``adapter_model.bin`` (a pickled ``dict[str, Tensor]``, read here with ``weights_only=True``)::

    mixlora.layers.{i}.mlp.moe_gate.weight                          (E, hidden)   router, no bias
    mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_A.weight          (r, in)       per expert and FFN proj
    mixlora.layers.{i}.mlp.{proj}.experts.{e}.lora_B.weight          (out, r)
    mixlora.layers.{i}.self_attn.{proj}.lora_A.weight                (r, in)       attention LoRA
    mixlora.layers.{i}.self_attn.{proj}.lora_B.weight                (out, r)

Both implementations compute, per token, ``sum_e w_e * FFN_e(x)`` where ``FFN_e`` is the frozen FFN with
expert e's LoRA on its gate/up/down projections and ``w`` are the top-k softmax probabilities
renormalised to sum to one; attention projections get plain LoRA. The official package uses the
top-level r / lora_alpha / lora_dropout / use_rslora for experts *and* attention and ignores an
``expert_lora`` block; this loader does the same unless ``honor_expert_lora=True`` (the MoE-PEFT
trainer's semantics). Known differences, none of which changes eval-mode logits in float32:

* routing runs in float32 in loramix; the official package routes in the dtype passed at load time;
* official ``jitter_noise`` multiplies the whole FFN input even in eval mode (random outputs); loramix
  jitters only the router input and only in training;
* official 0.2.3 crashes when ``act_fn`` is absent; loramix then uses the base FFN's activation;
* padding tokens are routed by the official code, skipped by loramix (their outputs are never attended).
"""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter_tensors import is_trainable_name
from ..checkpoint import pickle_refused
from ..config import FFN_ROLES, ConfigError, MixLoraConfig
from ..ffn_spec import FFNNotSupportedError, FFNSpec, detect_ffn
from ..injection import inject
from ..moe_layer import MixLoraFFN

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.bin", "adapter_model.safetensors")
TASK_TYPES = ("CAUSAL_LM", "QUESTION_ANS")  # what mixlora 0.2.3 accepts
# target_modules names the official package knows (mixlora.config.lora_target_modules); others it ignores.
OFFICIAL_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj",
    "dense", "fc1", "fc2", "qkv_proj", "gate_up_proj",
)  # fmt: skip
HANDLED_KEYS = {
    "peft_type", "routing_strategy", "task_type", "bias", "r", "lora_alpha", "lora_dropout", "use_rslora",
    "use_dora", "target_modules", "num_experts", "top_k", "act_fn", "router_init_range", "jitter_noise",
    "router_aux_loss_coef", "router_loss", "expert_lora",
}  # fmt: skip
# Keys with no effect on a loaded "mixlora"-routed model (bookkeeping, init, or other routing strategies).
IGNORED_KEYS = {
    "base_model_name_or_path", "lora_init", "name", "task_name", "adapter_name", "inference_mode", "revision",
    "top_p", "temperature", "router_z_loss_coef", "expert_capacity", "ffn_dropout", "sparse_step",
}  # fmt: skip
EXPERT_LORA_KEYS = {"r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "lora_init", "bias"}


class OfficialMixLoraError(ConfigError):
    """An official MixLoRA adapter uses something loramix cannot reproduce; the message names it."""


def _field_error(field: str, msg: str) -> OfficialMixLoraError:
    return OfficialMixLoraError(f"official MixLoRA adapter_config.json field '{field}': {msg}")


# --- reading ------------------------------------------------------------------------------------
def read_official_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The raw official config dict and tensors of ``adapter_dir`` (the pickle is read weights-only)."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {adapter_dir}")
    try:
        official = json.loads(cfg_path.read_text(encoding="utf8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OfficialMixLoraError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(official, dict):
        raise OfficialMixLoraError(f"{cfg_path}: expected a JSON object, got {type(official).__name__}")
    path = next((adapter_dir / n for n in WEIGHTS_NAMES if (adapter_dir / n).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no {' or '.join(WEIGHTS_NAMES)} in {adapter_dir}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise OfficialMixLoraError(f"{path} is not a readable safetensors file: {e}") from None
    else:
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # holds more than tensors: refused, never loaded unsafely
            raise pickle_refused(path, e) from None
        except (RuntimeError, EOFError, ValueError) as e:
            raise OfficialMixLoraError(f"{path} is not a readable PyTorch weights file ({type(e).__name__})") from None
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise OfficialMixLoraError(f"{path}: expected a dict of name -> tensor")
    return official, weights


# --- config -------------------------------------------------------------------------------------
def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers``: the only layout the official package injects into."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise OfficialMixLoraError(
            f"{type(model).__name__} has no model.model.layers; the official MixLoRA layout needs a "
            "Llama-style causal LM (llama, mistral, qwen2, gemma, gemma2, phi)"
        )
    return layers


def _number(
    d: dict[str, Any], key: str, default: Any, lo: float, hi: float | None = None, field: str = ""
) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or (hi is not None and v >= hi):
        bound = f"in [{lo}, {hi})" if hi is not None else f">= {lo}"
        raise _field_error(field or key, f"expected a number {bound}, got {v!r}")
    return float(v)


def _int(d: dict[str, Any], key: str, default: Any = None, field: str = "") -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _field_error(field or key, f"expected an int >= 1, got {v!r}")
    return v


def _bool(d: dict[str, Any], key: str, default: bool, field: str = "") -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise _field_error(field or key, f"expected true/false, got {v!r}")
    return v


def _lora_params(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    """r, alpha, dropout, use_rslora of one LoRA block (top level or expert_lora)."""
    if d.get("use_dora", False) is not False:
        raise _field_error(
            f"{prefix}use_dora",
            "DoRA is not supported by loramix (mixlora 0.2.3 also recomputes the magnitude vector at "
            "load time instead of reading it, so its DoRA output equals plain LoRA without the trained "
            "magnitudes)",
        )
    return {
        "r": _int(d, "r", field=f"{prefix}r"),
        "alpha": _number(d, "lora_alpha", None, 0.0, field=f"{prefix}lora_alpha"),
        "dropout": _number(d, "lora_dropout", None, 0.0, 1.0, field=f"{prefix}lora_dropout"),
        "use_rslora": _bool(d, "use_rslora", False, field=f"{prefix}use_rslora"),
    }


def _selected_targets(official: dict[str, Any]) -> list[str]:
    tm = official.get("target_modules")
    if isinstance(tm, list) and all(isinstance(t, str) for t in tm):
        return list(dict.fromkeys(tm))
    if isinstance(tm, dict) and all(isinstance(k, str) and isinstance(v, bool) for k, v in tm.items()):
        return [k for k, v in tm.items() if v]
    raise _field_error("target_modules", f"expected a list of names or a {{name: bool}} map, got {tm!r}")


def _classify_targets(
    official: dict[str, Any], model: nn.Module, strict: bool
) -> tuple[list[str], list[str], FFNSpec | None]:
    """(attention projection names, FFN projection names, FFN spec) as the official injector sees them."""
    layer = _decoder_layers(model)[0]
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        raise OfficialMixLoraError(
            f"{type(layer).__name__} lacks self_attn / mlp, which official adapters target"
        )
    attn_names, mlp_names = [], []
    for t in _selected_targets(official):
        in_attn, in_mlp = (
            t in OFFICIAL_TARGETS and hasattr(attn, t),
            t in OFFICIAL_TARGETS and hasattr(mlp, t),
        )
        if in_attn:
            attn_names.append(t)
        if in_mlp:
            mlp_names.append(t)
        if not (in_attn or in_mlp):  # the official package silently skips these
            msg = (
                f"'{t}' matches no projection of {type(attn).__name__} / {type(mlp).__name__} that the "
                "official package would adapt (wrong base model?)"
            )
            if strict:
                raise _field_error("target_modules", msg + "; pass strict=False to ignore it as mixlora does")
            warnings.warn(f"target_modules: {msg}; ignored", stacklevel=3)
    if "gate_up_proj" in mlp_names:
        raise _field_error(
            "target_modules", "'gate_up_proj' (Phi-3 fused gate/up) is not supported by loramix"
        )
    spec = None
    if mlp_names:
        try:
            spec = detect_ffn(mlp)
        except FFNNotSupportedError as err:
            raise _field_error("target_modules", f"the FFN cannot host loramix experts: {err}") from err
    return attn_names, mlp_names, spec


def _check_act_fn(act_fn: Any, model: nn.Module) -> None:
    """The official experts use ACT2FN[act_fn]; loramix uses the base FFN's activation: they must agree."""
    if act_fn is None:
        return  # mixlora 0.2.3 crashes here; its documented intent (and MoE-PEFT's) is the FFN's own act
    from transformers.activations import ACT2FN

    if not isinstance(act_fn, str) or act_fn not in ACT2FN:
        raise _field_error("act_fn", f"unknown activation {act_fn!r}")
    probe = torch.linspace(-8.0, 8.0, 321)
    want = ACT2FN[act_fn](probe)
    for i, layer in enumerate(_decoder_layers(model)):
        mlp = layer.mlp
        act = getattr(mlp, detect_ffn(mlp).act)
        got = act(probe)
        if not torch.allclose(got, want, atol=1e-6, rtol=1e-5):
            raise _field_error(
                "act_fn",
                f"{act_fn!r} differs from the base FFN activation {act} of layer {i}; loramix experts "
                "always use the base activation (core change needed: an activation override in "
                "MixLoraConfig)",
            )


def official_to_loramix_config(
    official: dict[str, Any], model: nn.Module, *, honor_expert_lora: bool = False, strict: bool = True
) -> MixLoraConfig:
    """Translate an official ``adapter_config.json`` dict into the equivalent loramix config.

    ``model`` is the base model the adapter will go on (it decides which targets are attention and
    which are FFN projections, exactly as the official injector does). Anything loramix cannot
    reproduce raises :class:`OfficialMixLoraError` naming the field.
    """
    if official.get("peft_type") != "MIXLORA":
        raise _field_error("peft_type", f"expected 'MIXLORA', got {official.get('peft_type')!r}")
    strategy = official.get("routing_strategy")
    if strategy != "mixlora":
        raise _field_error(
            "routing_strategy",
            f"only 'mixlora' (top-k) routing is supported, got {strategy!r} (mixlora 0.2.3 itself "
            "rejects 'mixlora-dynamic' and 'mixlora-switch'; their MoE-PEFT semantics differ from "
            "loramix's top_p/switch routers)",
        )
    if "task_type" in official and official["task_type"] not in TASK_TYPES:
        raise _field_error("task_type", f"expected one of {TASK_TYPES}, got {official['task_type']!r}")
    if official.get("bias", "none") != "none":
        raise _field_error("bias", f"only 'none' is supported, got {official['bias']!r}")
    unknown = sorted(set(official) - HANDLED_KEYS - IGNORED_KEYS)
    if unknown:
        msg = f"unknown key(s) {unknown}; loramix cannot tell whether they change the model"
        if strict:
            raise _field_error(unknown[0], msg + " (pass strict=False to ignore)")
        warnings.warn(msg + "; ignored", stacklevel=2)

    top = _lora_params(official, "")
    experts = dict(top)
    expert_block = official.get("expert_lora")
    if expert_block is not None:
        if not isinstance(expert_block, dict):
            raise _field_error("expert_lora", f"expected an object, got {expert_block!r}")
        bad = sorted(set(expert_block) - EXPERT_LORA_KEYS)
        if bad:
            raise _field_error(f"expert_lora.{bad[0]}", "unknown key")
        merged = _lora_params({**official, **expert_block}, "expert_lora.")
        differs = [k for k in ("r", "alpha", "use_rslora") if merged[k] != top[k]]
        if honor_expert_lora:
            experts = merged
        elif differs:
            name = {"r": "r", "alpha": "lora_alpha", "use_rslora": "use_rslora"}[differs[0]]
            raise _field_error(
                f"expert_lora.{name}",
                "differs from the top-level value; mixlora 0.2.3 ignores expert_lora (experts use the "
                "top-level LoRA settings) while the MoE-PEFT trainer applies it, so the intended logits "
                "are ambiguous. Pass honor_expert_lora=True for the trainer's semantics",
            )

    num_experts = _int(official, "num_experts")
    top_k = _int(official, "top_k", 2)
    if top_k > num_experts:
        raise _field_error("top_k", f"top_k={top_k} exceeds num_experts={num_experts}")
    _check_act_fn(official.get("act_fn"), model)
    attn_names, mlp_names, spec = _classify_targets(official, model, strict)
    roles = []
    if spec is not None:
        role_of = {getattr(spec, role): role for role in spec.roles()}
        for name in mlp_names:
            if name not in role_of:
                raise _field_error(
                    "target_modules", f"FFN projection '{name}' has no gate/up/down role in {spec}"
                )
            roles.append(role_of[name])
        roles = [r for r in FFN_ROLES if r in roles]  # canonical order

    # loramix has one use_rslora flag (experts and PEFT attention LoRA); keep the attention scaling exact
    # by choosing attn_alpha so that attn_alpha / denom(attn_r) equals the official attention scaling.
    attn_scaling = top["alpha"] / (math.sqrt(top["r"]) if top["use_rslora"] else top["r"])
    attn_alpha = attn_scaling * (math.sqrt(top["r"]) if experts["use_rslora"] else top["r"])

    coef = _number(official, "router_aux_loss_coef", 0.001, 0.0)  # MoE-PEFT's default
    router_loss = _bool(official, "router_loss", True)
    jitter = _number(official, "jitter_noise", 0.0, 0.0, 1.0)
    if jitter > 0:
        warnings.warn(
            "jitter_noise > 0: mixlora 0.2.3 also applies it in eval mode (random logits); loramix "
            "applies it to the router input during training only",
            stacklevel=2,
        )
    # No FFN target: every expert is the plain FFN and sum_e w_e FFN(x) == FFN(x), so no experts needed.
    # MoE-PEFT's balance loss is E * sum_e (count_e / T) P_e, top_k times loramix's
    # E * sum_e (count_e / (T k)) P_e: scale the coefficient to keep the same training signal.
    return MixLoraConfig(
        num_experts=num_experts if roles else 0,
        top_k=top_k,
        r=experts["r"],
        alpha=experts["alpha"],
        dropout=experts["dropout"],
        use_rslora=experts["use_rslora"],
        expert_targets=roles or ["gate", "up", "down"],
        expert_type="mixlora",
        router="topk",
        router_init_scale=_number(official, "router_init_range", 0.02, 0.0),
        router_jitter=jitter,
        attn_r=top["r"] if attn_names else 0,
        attn_alpha=attn_alpha,
        attn_dropout=top["dropout"],
        attn_targets=attn_names or None,
        balance_coef=coef * top_k if router_loss else 0.0,
        aux_layer_reduction="mean",  # MoE-PEFT computes one loss over all layers' tokens together
        mlp_name="mlp",
    )


# --- weights ------------------------------------------------------------------------------------
def convert_official_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Map official tensors onto the parameter names of ``model`` (already injected with the config
    from :func:`official_to_loramix_config`). Expert tensors are stacked to loramix's (E, ...) layout."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str, param: torch.Tensor) -> torch.Tensor:
        if key not in weights:
            raise OfficialMixLoraError(f"adapter_model: missing tensor '{key}'")
        t = weights[key]
        used.add(key)
        if not t.is_floating_point():
            raise OfficialMixLoraError(f"adapter_model: '{key}' has non-float dtype {t.dtype}")
        return t

    def put(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
        if tuple(value.shape) != tuple(param.shape):
            raise OfficialMixLoraError(
                f"adapter_model: {what} has shape {tuple(value.shape)} but loramix expects "
                f"{tuple(param.shape)} (different base model, or r / num_experts not matching "
                "adapter_config.json)"
            )
        out[names[id(param)]] = value

    for i, layer in enumerate(_decoder_layers(model)):
        gate_key = f"mixlora.layers.{i}.mlp.moe_gate.weight"
        ffn = layer.mlp
        if isinstance(ffn, MixLoraFFN):
            put(ffn.mixlora_router.weight, take(gate_key, ffn.mixlora_router.weight), gate_key)
            for role in ffn.targets:
                proj = getattr(ffn.spec, role)
                lora = ffn.mixlora_experts[role]
                for ab in ("lora_A", "lora_B"):
                    param = getattr(lora, ab)
                    keys = [
                        f"mixlora.layers.{i}.mlp.{proj}.experts.{e}.{ab}.weight"
                        for e in range(ffn.num_experts)
                    ]
                    stacked = torch.stack([take(k, param) for k in keys])  # (E, r, in) or (E, out, r)
                    put(param, stacked, f"mixlora.layers.{i}.mlp.{proj}.experts.*.{ab}.weight (stacked)")
        elif gate_key in weights:
            used.add(gate_key)  # no FFN targets: the router cannot change the output (weights sum to 1)
        for proj, module in layer.self_attn.named_children():
            if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
                continue
            for ab in ("lora_A", "lora_B"):
                param = getattr(module, ab)["default"].weight
                key = f"mixlora.layers.{i}.self_attn.{proj}.{ab}.weight"
                put(param, take(key, param), key)

    leftover = sorted(set(weights) - used)
    if leftover:
        msg = f"adapter_model: {len(leftover)} tensor(s) not used by this config/model, e.g. {leftover[:3]}"
        if strict:
            raise OfficialMixLoraError(msg + " (pass strict=False to ignore them as mixlora does)")
        warnings.warn(msg, stacklevel=2)
    trainable = {n for n, _ in model.named_parameters() if is_trainable_name(n)}
    missing = sorted(trainable - set(out))
    if missing:
        raise OfficialMixLoraError(
            f"no official tensor for loramix parameters {missing[:3]} ({len(missing)} total)"
        )
    return out


def is_official_mixlora(directory: str | Path) -> bool:
    """True for an adapter directory in the official MixLoRA format (``peft_type: MIXLORA``)."""
    path = Path(directory) / CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and str(meta.get("peft_type", "")).upper() == "MIXLORA"


def load_official_mixlora(
    base_model: nn.Module,
    adapter_dir: str | Path,
    *,
    honor_expert_lora: bool = False,
    strict: bool = True,
) -> nn.Module:
    """Inject an official MixLoRA adapter into ``base_model`` (modified in place and returned).

    The result is an ordinary loramix model: it trains, routes, saves with ``loramix.save_adapter`` and
    gives the official package's eval-mode logits. ``strict=False`` turns unknown config keys, unmatched
    target names and unused tensors (which mixlora silently ignores) into warnings.
    """
    official, weights = read_official_adapter(adapter_dir)
    config = official_to_loramix_config(
        official, base_model, honor_expert_lora=honor_expert_lora, strict=strict
    )
    was_training = base_model.training
    model = inject(base_model, config)
    converted = convert_official_weights(model, weights, strict=strict)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in converted.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
    model.train(was_training)  # newly injected modules start in training mode (dropout on)
    return model
