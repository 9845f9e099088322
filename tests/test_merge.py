"""Merging: a one-expert MixLoRA is plain LoRA, and folding adapters into the weights keeps the logits."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from helpers.tiny_models import (
    decoder_mlps,
    module_types,
    perturb_adapters,
    random_batch,
    randomize_biases,
    tiny_model,
)
from loramix import MixLoraConfig, inject, merge_and_unload, merge_attention, save_adapter
from loramix.injection import get_state
from loramix.moe_layer import MixLoraFFN
from loramix.precision import cast_trainable

TOL = dict(rtol=1e-5, atol=1e-5)
PEFT_TARGETS = {
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "qwen2": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "gpt2": (["c_attn", "c_proj", "c_fc"], {"up": "c_fc", "down": "c_proj"}),  # c_proj: attention and FFN
}


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    """Logits at the real (non-padding) positions of a left-padded batch.

    Padding positions are left out: MixLoRA routes no padding token to an expert (they get the frozen
    FFN), while plain LoRA adapts them too; nothing reads those positions.
    """
    ids, mask = random_batch(pad_left=3)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def one_expert(arch: str, router: str = "dense", use_rslora: bool = False) -> torch.nn.Module:
    cfg = MixLoraConfig(num_experts=1, top_k=1, router=router, r=4, alpha=8, attn_r=4, attn_alpha=8,
                        dropout=0.0, attn_dropout=0.0, use_rslora=use_rslora)
    model = inject(randomize_biases(tiny_model(arch)), cfg)
    perturb_adapters(model)
    return model


def peft_copy(mix: torch.nn.Module, arch: str, use_rslora: bool = False) -> torch.nn.Module:
    """Plain PEFT LoRA on the same base with the one-expert model's A/B matrices copied over."""
    targets, roles = PEFT_TARGETS[arch]
    model = randomize_biases(tiny_model(arch))
    inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_rslora=use_rslora,
                   fan_in_fan_out=arch == "gpt2"),
        model,
    )
    params = dict(model.named_parameters())
    with torch.no_grad():
        copied = 0
        for name, p in mix.named_parameters():
            if "lora_" in name and "mixlora_" not in name:  # attention LoRA: same names in both models
                params[name].copy_(p)
                copied += 1
        for i, mlp in enumerate(decoder_mlps(mix)):
            prefix = f"{'transformer.h' if arch == 'gpt2' else 'model.layers'}.{i}.mlp."
            for role, lora in mlp.mixlora_experts.items():
                params[prefix + f"{roles[role]}.lora_A.default.weight"].copy_(lora.lora_A[0])
                params[prefix + f"{roles[role]}.lora_B.default.weight"].copy_(lora.lora_B[0])
                copied += 2
    assert copied == sum(1 for n, _ in model.named_parameters() if "lora_" in n)  # every PEFT matrix set
    return model.eval()


def has_adapter_modules(model: torch.nn.Module) -> bool:
    return any(
        isinstance(m, MixLoraFFN) or hasattr(m, "lora_A") or "lora_" in n or "mixlora_" in n
        for n, m in model.named_modules()
    )


@pytest.mark.parametrize("router", ["dense", "topk", "top_p"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_one_expert_equals_plain_peft_lora(arch: str, router: str) -> None:
    """One expert always weighted 1 is exactly LoRA on gate/up/down: logits equal PEFT LoRA with the
    same A/B on the FFN projections and attention."""
    mix = one_expert(arch, router)
    expected = logits_of(peft_copy(mix, arch))
    assert not torch.allclose(expected, logits_of(randomize_biases(tiny_model(arch))), **TOL)  # not a no-op
    torch.testing.assert_close(logits_of(mix), expected, **TOL)


def test_one_expert_equals_plain_peft_lora_with_rslora() -> None:
    """use_rslora scales experts and attention LoRA like PEFT's rank-stabilised LoRA."""
    mix = one_expert("llama", use_rslora=True)
    torch.testing.assert_close(logits_of(mix), logits_of(peft_copy(mix, "llama", use_rslora=True)), **TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_gives_an_equal_plain_model(arch: str) -> None:
    """merge_and_unload of a one-expert model returns the base architecture (same module types, no
    adapter modules or state, original requires_grad flags) with the adapted logits."""
    base = randomize_biases(tiny_model(arch))
    types, attrs, keys = module_types(base), set(vars(base)), set(base.state_dict())
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    mix = one_expert(arch)
    expected = logits_of(mix)
    merged = merge_and_unload(mix)
    torch.testing.assert_close(logits_of(merged), expected, **TOL)
    assert module_types(merged) == types
    assert not has_adapter_modules(merged)
    assert set(merged.state_dict()) == keys
    assert set(vars(merged)) == attrs  # no loramix_state, no peft_config
    assert {n: p.requires_grad for n, p in merged.named_parameters()} == flags
    assert not merged._forward_hooks and not merged._forward_pre_hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_attention_keeps_logits(arch: str) -> None:
    """merge_attention folds the attention LoRA into the weights of a multi-expert model: the logits
    stay the same, attention becomes plain modules and only the MoE parameters remain trainable."""
    cfg = MixLoraConfig(num_experts=4, top_k=2, dropout=0.0, attn_dropout=0.0)
    model = inject(randomize_biases(tiny_model(arch)), cfg)
    perturb_adapters(model)
    expected = logits_of(model)
    attn_targets = list(get_state(model).attn_targets)
    assert attn_targets
    merge_attention(model)
    torch.testing.assert_close(logits_of(model), expected, **TOL)
    for name in attn_targets:
        assert type(model.get_submodule(name)).__name__ in ("Linear", "Conv1D"), name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("mixlora_" in n for n in trainable)
    assert all(isinstance(m, MixLoraFFN) for m in decoder_mlps(model))


def test_save_after_merge_attention_is_refused(tmp_path) -> None:
    """save_adapter refuses a model whose attention LoRA was merged: its config would re-create attention
    LoRA that the weights file no longer has, so the checkpoint could never be loaded."""
    model = inject(tiny_model("llama"), MixLoraConfig(num_experts=2))
    merge_attention(model)
    with pytest.raises(ValueError, match="merge"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "cfg",
    [dict(num_experts=2, top_k=1), dict(num_experts=[1, 3], top_k=1), dict(num_experts=1, router="switch"),
     dict(num_experts=1, top_k=1, expert_type="adapter")],
    ids=["two-experts", "one-layer-of-three", "switch", "adapter"],
)
def test_merging_a_mixture_raises_and_changes_nothing(cfg: dict) -> None:
    """merge_and_unload refuses anything that is not a single always-on LoRA expert, before changing
    the model (attention LoRA included)."""
    model = inject(tiny_model("llama"), MixLoraConfig(**cfg))
    perturb_adapters(model)
    expected, types = logits_of(model), module_types(model)
    with pytest.raises(ValueError, match="cannot merge"):
        merge_and_unload(model)
    assert module_types(model) == types
    assert hasattr(model, "loramix_state")
    assert torch.equal(logits_of(model), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_of_float32_adapters_into_a_low_precision_base(dtype) -> None:
    """A bf16/fp16 base with float32 adapters merges into a plain model of the base's dtype whose logits equal the
    adapted model's, under the matching autocast, to the dtype's precision (the merged weight is rounded once)."""
    mix = one_expert("llama")
    mix.to(dtype)
    cast_trainable(mix, [n for n, p in mix.named_parameters() if p.requires_grad], "float32", dtype)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        expected = mix(input_ids=ids).logits.float()
    merged = merge_and_unload(mix)
    assert {p.dtype for p in merged.parameters()} == {dtype}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        got = merged(input_ids=ids).logits.float()
    assert (got - expected).abs().max() <= 32 * torch.finfo(dtype).eps * expected.abs().max()
