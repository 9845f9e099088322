"""vLLM model classes for loramix's MixLoRA export: vLLM's own Llama / Mistral / Qwen2 / Qwen3 with the FFN
of each MoE layer replaced by :class:`MixLoraMLP`.

Everything frozen is vLLM's (attention, norms, embeddings, the parallel gate/up and down projections), so
its attention backends and tensor parallelism apply. :class:`MixLoraMLP` holds the adapter's tensors in the
serving layout and computes with :mod:`loramix.vllm_plugin.mixture`'s serving functions what loramix's
``MixLoraFFN`` computes in eval mode.

Tensor parallelism: gate/up's B and down's A are split along the FFN width like vLLM's projections; the
down deltas are added before the down projection's all-reduce. Only one GPU / CPU process is tested.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.utils import set_weight_attrs

from . import FORMAT_VERSION, check_vllm_version
from .mixture import adapter_ffn_serving, mixlora_ffn_serving, serve_route


def _section(config) -> dict:
    section = getattr(config, "mixlora", None)
    if not isinstance(section, dict) or section.get("format_version") != FORMAT_VERSION:
        got = section.get("format_version") if isinstance(section, dict) else None
        raise ValueError(f"config.json: mixlora.format_version={got!r}; this loramix plugin reads {FORMAT_VERSION} "
                         "(export again with the installed loramix)")
    return section


def _loader(shard_dim: int | None, transpose: bool, scale: float | None = None):
    """A weight loader: B factors are kept transposed, (E, r, out), so that no forward copies them, and times the
    LoRA scaling (``scale``); a tensor split for tensor parallelism keeps this rank's slice of ``shard_dim`` (the
    FFN width, in the kept layout)."""

    def load(param: torch.Tensor, loaded: torch.Tensor) -> None:
        if transpose:
            loaded = loaded.transpose(1, 2)  # (E, out, r) on disk -> (E, r, out)
        if shard_dim is not None:
            size = param.shape[shard_dim]
            loaded = loaded.narrow(shard_dim, get_tensor_model_parallel_rank() * size, size)
        if param.shape != loaded.shape:
            raise ValueError(f"MixLoRA tensor of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(loaded)
        if scale is not None:
            param.data.mul_(scale)

    return load


def _param(module: nn.Module, name: str, storage: torch.Tensor, shard_dim: int | None = None,
           transpose: bool = False, scale: float | None = None) -> None:
    """Register ``storage`` (a view of a serving buffer, or a tensor of its own) as the parameter that vLLM loads
    the checkpoint tensor ``name`` into."""
    p = nn.Parameter(storage, requires_grad=False)  # shares storage's memory
    set_weight_attrs(p, {"weight_loader": _loader(shard_dim, transpose, scale)})
    module.register_parameter(name, p)


class MixLoraMLP(nn.Module):
    """A MixLoRA FFN on vLLM's parallel linear layers (see the module docstring).

    The checkpoint's per-role factors are loaded into views of the serving buffers that
    :class:`~loramix.vllm_plugin.mixture.ServingLayout` describes (this module has its attributes): ``a_gu``,
    ``b_gu``, ``a_down``, ``b_down``."""

    def __init__(self, config, section: dict, num_experts: int, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        tp = get_tensor_model_parallel_world_size()
        self.tp = tp
        self.inter = inter // tp  # this rank's FFN width
        self.num_experts = e = num_experts
        self.rule = section["router"]
        self.top_k = min(int(section["top_k"]), num_experts)
        self.top_p = float(section["top_p"])
        self.expert_type = section["expert_type"]
        self.rank = r = int(section["r"])
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter] * 2, bias=False, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, hidden, bias=False, quant_config=quant_config,
                                           reduce_results=False, prefix=f"{prefix}.down_proj")
        self.act_and_mul = SiluAndMul()
        self.router = nn.Module()
        _param(self.router, "weight", torch.empty(e, hidden, dtype=torch.float32))  # routers in float32
        _param(self.router, "balance_bias", torch.empty(e, dtype=torch.float32))
        self.register_buffer("offsets", torch.arange(2 * r), persistent=False)  # (2r,) a pair's B rows
        for name in ("a_gu", "b_gu", "a_down", "b_down"):
            self.register_buffer(name, None, persistent=False)
        if self.expert_type == "mixlora":
            self._mixlora_params(section, hidden)
        else:
            self.a_gu = torch.zeros(e, r, hidden)  # (E, r, H) the adapters' A
            self.b_down = torch.zeros(e * r, hidden)  # (E*r, H) their B transposed
            self.adapters = nn.Module()
            _param(self.adapters, "lora_A", self.a_gu)
            _param(self.adapters, "lora_B", self.b_down.view(e, r, hidden), transpose=True)  # (E, r, H)
            _param(self.adapters, "scale", torch.empty(1))

    def _mixlora_params(self, section: dict, hidden: int) -> None:
        e, r, inter = self.num_experts, self.rank, self.inter
        targets = list(section["targets"])
        scaling = float(section["scaling"])
        self.experts = nn.ModuleDict({role: nn.Module() for role in targets})
        if "gate" in targets or "up" in targets:  # a role not adapted keeps zero factors: it adds exactly 0
            self.a_gu = torch.zeros(e, 2 * r, hidden)  # (E, 2r, H) gate's A then up's A per expert
            self.b_gu = torch.zeros(e * 2 * r, inter)  # (E*2r, I) gate's then up's B transposed, scaled
            b_gu = self.b_gu.view(e, 2, r, inter)  # (E, role, r, I)
            for j, role in enumerate(("gate", "up")):
                if role in targets:
                    _param(self.experts[role], "lora_A", self.a_gu[:, j * r:(j + 1) * r])  # (E, r, H)
                    _param(self.experts[role], "lora_B", b_gu[:, j], 2, True, scaling)  # (E, r, I)
        if "down" in targets:
            self.a_down = torch.zeros(e, r, inter)  # (E, r, I)
            self.b_down = torch.zeros(e * r, hidden)  # (E*r, H) B transposed, scaled
            _param(self.experts["down"], "lora_A", self.a_down, 2)
            _param(self.experts["down"], "lora_B", self.b_down.view(e, r, hidden), None, True, scaling)  # (E, r, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)  # (T, 2I) frozen, once per token
        weights, idx = serve_route(x, self.router.weight, self.router.balance_bias, self.rule, self.top_k,
                                   self.top_p)
        if self.expert_type == "adapter":
            frozen = self._down(self.act_and_mul(gate_up))  # (T, H)
            if self.tp > 1:
                frozen = tensor_model_parallel_all_reduce(frozen)
            return adapter_ffn_serving(x, frozen, weights, idx, self, self.adapters.scale, self.offsets)
        out = mixlora_ffn_serving(x, gate_up, self._down, weights, idx, self, self.offsets, self.act_and_mul)
        if self.tp > 1:  # this rank's FFN slice: its down deltas are summed with the projection's
            out = tensor_model_parallel_all_reduce(out)
        return out

    def _down(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(h)[0]


def _replace_mlps(model: nn.Module, vllm_config) -> None:
    """Swap the FFN of every layer with experts (``mixlora.layer_experts``) for a :class:`MixLoraMLP`."""
    check_vllm_version()
    config = vllm_config.model_config.hf_config
    section = _section(config)
    counts = section["layer_experts"]
    if len(counts) != config.num_hidden_layers:
        raise ValueError(f"config.json: mixlora.layer_experts has {len(counts)} entries for "
                         f"{config.num_hidden_layers} layers")
    for i, layer in enumerate(model.model.layers):
        if counts[i] and hasattr(layer, "mlp"):  # PPMissingLayer on other pipeline stages has no mlp
            layer.mlp = MixLoraMLP(config, section, counts[i], vllm_config.quant_config,
                                   prefix=f"model.layers.{i}.mlp")


class MixLoraLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama with MixLoRA FFNs."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _replace_mlps(self, vllm_config)


class MixLoraMistralForCausalLM(MistralForCausalLM):
    """vLLM's Mistral with MixLoRA FFNs."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _replace_mlps(self, vllm_config)


class MixLoraQwen2ForCausalLM(Qwen2ForCausalLM):
    """vLLM's Qwen2 with MixLoRA FFNs."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _replace_mlps(self, vllm_config)


class MixLoraQwen3ForCausalLM(Qwen3ForCausalLM):
    """vLLM's Qwen3 with MixLoRA FFNs."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _replace_mlps(self, vllm_config)
