"""vLLM model classes for loramix's MixLoRA export: vLLM's own Llama / Mistral / Qwen2 / Qwen3 with the FFN
of each MoE layer replaced by :class:`MixLoraMLP`.

Everything frozen is vLLM's (attention, norms, embeddings, the parallel gate/up and down projections), so
its attention backends and tensor parallelism apply. :class:`MixLoraMLP` holds the adapter's tensors and
computes with :mod:`loramix.vllm_plugin.mixture` what loramix's ``MixLoraFFN`` computes in eval mode.

Tensor parallelism: gate/up's B and down's A are split along the FFN width like vLLM's projections; the
down deltas are added before the down projection's all-reduce. Only one GPU / CPU process is tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.utils import set_weight_attrs

from . import FORMAT_VERSION, check_vllm_version
from .mixture import adapter_ffn, mixlora_ffn, route


def _section(config) -> dict:
    section = getattr(config, "mixlora", None)
    if not isinstance(section, dict) or section.get("format_version") != FORMAT_VERSION:
        got = section.get("format_version") if isinstance(section, dict) else None
        raise ValueError(f"config.json: mixlora.format_version={got!r}; this loramix plugin reads {FORMAT_VERSION} "
                         "(export again with the installed loramix)")
    return section


def _loader(shard_dim: int | None, transpose: bool):
    """A weight loader: B factors are kept transposed, (E, r, out), so that no forward copies them; a tensor split
    for tensor parallelism keeps this rank's slice of ``shard_dim`` (the FFN width, in the kept layout)."""

    def load(param: torch.Tensor, loaded: torch.Tensor) -> None:
        if transpose:
            loaded = loaded.transpose(1, 2)  # (E, out, r) on disk -> (E, r, out)
        if shard_dim is not None:
            size = param.shape[shard_dim]
            loaded = loaded.narrow(shard_dim, get_tensor_model_parallel_rank() * size, size)
        if param.shape != loaded.shape:
            raise ValueError(f"MixLoRA tensor of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(loaded)

    return load


def _param(module: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype | None,
           shard_dim: int | None = None, transpose: bool = False) -> None:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    set_weight_attrs(p, {"weight_loader": _loader(shard_dim, transpose)})
    module.register_parameter(name, p)


class MixLoraMLP(nn.Module):
    """A MixLoRA FFN on vLLM's parallel linear layers (see the module docstring)."""

    def __init__(self, config, section: dict, num_experts: int, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        hidden, inter = config.hidden_size, config.intermediate_size
        tp = get_tensor_model_parallel_world_size()
        self.tp = tp
        self.inter = inter // tp  # this rank's FFN width
        self.num_experts = num_experts
        self.rule = section["router"]
        self.top_k = min(int(section["top_k"]), num_experts)
        self.top_p = float(section["top_p"])
        self.expert_type = section["expert_type"]
        self.rank = r = int(section["r"])
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter] * 2, bias=False, quant_config=quant_config,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(inter, hidden, bias=False, quant_config=quant_config,
                                           reduce_results=False, prefix=f"{prefix}.down_proj")
        self.router = nn.Module()
        _param(self.router, "weight", (num_experts, hidden), torch.float32)  # routers in float32
        _param(self.router, "balance_bias", (num_experts,), torch.float32)
        if self.expert_type == "mixlora":
            self.targets = list(section["targets"])
            self.scaling = float(section["scaling"])
            self.experts = nn.ModuleDict()
            fans = {"gate": (hidden, self.inter), "up": (hidden, self.inter), "down": (self.inter, hidden)}
            for role in self.targets:
                fan_in, fan_out = fans[role]
                m = nn.Module()
                _param(m, "lora_A", (num_experts, r, fan_in), None, 2 if role == "down" else None)  # (E, r, in)
                _param(m, "lora_B", (num_experts, r, fan_out), None, None if role == "down" else 2, True)  # (E, r, out)
                self.experts[role] = m
        else:
            self.adapters = nn.Module()
            _param(self.adapters, "lora_A", (num_experts, r, hidden), None)  # (E, r, H)
            _param(self.adapters, "lora_B", (num_experts, r, hidden), None, transpose=True)  # (E, r, H)
            _param(self.adapters, "scale", (1,), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)  # (T, 2I) frozen, once per token
        gate, up = gate_up.split(self.inter, dim=-1)  # (T, I) each
        weights, idx = route(x, self.router.weight, self.router.balance_bias, self.rule, self.top_k, self.top_p)
        if self.expert_type == "adapter":
            frozen = self._down(F.silu(gate) * up)  # (T, H)
            if self.tp > 1:
                frozen = tensor_model_parallel_all_reduce(frozen)
            return adapter_ffn(x, frozen, weights, idx, self.adapters.lora_A, self.adapters.lora_B,
                               self.adapters.scale)
        loras = {role: (m.lora_A, m.lora_B) for role, m in self.experts.items()}
        out = mixlora_ffn(x, gate, up, self._down, weights, idx, loras, self.scaling)  # this rank's part
        if self.tp > 1:  # the down deltas of this rank's FFN slice are summed with the projection
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
