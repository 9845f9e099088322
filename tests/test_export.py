"""Export: a MixLoRA model written as a standard MoE checkpoint computes the loramix model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, MistralConfig, Qwen3Config

from helpers.tiny_models import perturb_adapters, random_batch, tiny_config, tiny_model
from helpers.tiny_tokenizer import tiny_tokenizer
from loramix import MixLoraConfig, inject, save_adapter
from loramix.cli import main
from loramix.export import ExportError, export_adapted, plan_export

TOL = 1e-4


def adapted(arch: str = "llama", seed: int = 0, base: torch.nn.Module | None = None, **cfg) -> torch.nn.Module:
    fields = dict(num_experts=4, top_k=2, r=4, alpha=8, attn_r=4, attn_alpha=8, dropout=0.0, attn_dropout=0.0)
    fields.update(cfg)
    model = inject(base if base is not None else tiny_model(arch, seed=seed), MixLoraConfig(**fields))
    perturb_adapters(model, scale=0.3)
    return model.eval()


def from_config(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.config._name_or_path = f"tiny-{config.model_type}"
    return model.eval()


def loramix_logits(model: torch.nn.Module) -> torch.Tensor:
    ids, _ = random_batch(batch=2, seq=16)
    with torch.no_grad():
        return model(input_ids=ids).logits


def exported_logits(directory: Path) -> tuple[torch.nn.Module, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    ids, _ = random_batch(batch=2, seq=16)
    with torch.no_grad():
        return model, model(input_ids=ids).logits


def export_and_compare(model: torch.nn.Module, out: Path, **kwargs):
    expected = loramix_logits(model)
    report = export_adapted(model, out, tiny_tokenizer(), **kwargs)
    exported, logits = exported_logits(out)
    assert (logits - expected).abs().max() < TOL
    return report, exported


BASES = {
    "llama": lambda: tiny_model("llama"),
    "qwen2": lambda: tiny_model("qwen2"),
    "mistral": lambda: from_config(MistralConfig(**tiny_config("llama").to_dict() | {"sliding_window": 8})),
    "qwen3": lambda: from_config(Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, head_dim=16,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64)),
}
EXPECTED_CLASS = {"llama": "MixtralForCausalLM", "mistral": "MixtralForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
                  "qwen3": "Qwen3MoeForCausalLM"}


@pytest.mark.parametrize("arch", sorted(BASES))
def test_exported_logits_equal_loramix(arch, tmp_path):
    model = adapted(base=BASES[arch]())
    report, exported = export_and_compare(model, tmp_path / "out")
    assert type(exported).__name__ == EXPECTED_CLASS[arch]
    assert report.max_abs_logit_diff is not None and report.max_abs_logit_diff < TOL
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [EXPECTED_CLASS[arch]]
    assert config["num_experts_per_tok"] == 2
    assert config.get("num_local_experts", config.get("num_experts")) == 4
    assert not config["tie_word_embeddings"]
    for name in ("tokenizer.json", "generation_config.json", "README.md", "loramix_export.json"):
        assert (tmp_path / "out" / name).is_file(), name
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "f").write_text("x")
    assert (tmp_path / "out").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not private
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == (plain / "f").stat().st_mode & 0o777


def test_exported_model_differs_from_base(tmp_path):
    """The comparison is meaningful: the adapter changes the logits, and the export keeps that change."""
    base_logits = loramix_logits(tiny_model("llama"))
    model = adapted()
    export_and_compare(model, tmp_path / "out")
    _, logits = exported_logits(tmp_path / "out")
    assert (logits - base_logits).abs().max() > 1e-2


def test_checkpoint_uses_standard_names(tmp_path):
    """Mixtral's on-disk names (block_sparse_moe.experts.N.w1/w2/w3): what vLLM and llama.cpp read."""
    export_adapted(adapted(), tmp_path / "out", tiny_tokenizer())
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert {f"model.layers.1.block_sparse_moe.experts.3.w{i}.weight" for i in (1, 2, 3)} <= names
    assert "lm_head.weight" in names
    assert not any("lora" in n for n in names)


def test_expert_is_merged_ffn(tmp_path):
    """Expert e's w1 is the frozen gate projection plus scaling * B_e @ A_e; the gate is the router weight."""
    model = adapted()
    layer = model.model.layers[0].mlp
    lora = layer.mixlora_experts["gate"]
    want = layer.proj("gate").weight + lora.scaling * lora.lora_B[2] @ lora.lora_A[2]
    router = layer.mixlora_router.weight.detach().clone()
    export_adapted(model, tmp_path / "out", tiny_tokenizer())
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        torch.testing.assert_close(f.get_tensor("model.layers.0.block_sparse_moe.experts.2.w1.weight"), want.detach())
        torch.testing.assert_close(f.get_tensor("model.layers.0.block_sparse_moe.gate.weight"), router)


def test_tied_embeddings(tmp_path):
    """SmolLM2 ties lm_head to the embeddings: the export writes lm_head explicitly and unties it."""
    base = tiny_model("llama", tie_word_embeddings=True)
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    _, exported = export_and_compare(adapted(base=base), tmp_path / "out")
    assert not exported.config.tie_word_embeddings
    torch.testing.assert_close(exported.lm_head.weight, exported.model.embed_tokens.weight)


def test_rope_scaling(tmp_path):
    """Llama-3 rope scaling is carried over (and matters: the logits differ without it)."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8, "rope_theta": 10000.0}
    base = tiny_model("llama", rope_parameters=rope)
    report, exported = export_and_compare(adapted(base=base), tmp_path / "out")
    assert exported.config.rope_parameters["rope_type"] == "llama3"
    assert exported.config.rope_parameters["factor"] == 8.0
    plain = adapted(base=tiny_model("llama"))
    assert (loramix_logits(plain) - exported_logits(tmp_path / "out")[1]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_layer_without_experts(arch, tmp_path):
    """A layer with 0 experts keeps the frozen FFN: every Mixtral expert holds it; Qwen makes it dense."""
    model = adapted(arch, num_experts=[4, 0])
    _, exported = export_and_compare(model, tmp_path / "out")
    if arch == "qwen2":
        assert exported.config.mlp_only_layers == [1]


def test_uneven_counts_top1_are_padded(tmp_path):
    model = adapted(num_experts=[4, 2], top_k=1)
    report, exported = export_and_compare(model, tmp_path / "out")
    assert exported.config.num_local_experts == 4
    assert any("padded" in n for n in report.notes)


def test_uneven_counts_top2_refused():
    with pytest.raises(ExportError, match="one num_experts for all MoE layers"):
        plan_export(adapted(num_experts=[4, 2], top_k=2))


@pytest.mark.parametrize("router", ["noisy_topk", "dense"])
def test_exact_routers(router, tmp_path):
    model = adapted(router=router)
    report, exported = export_and_compare(model, tmp_path / "out")
    assert exported.config.num_experts_per_tok == (4 if router == "dense" else 2)
    assert report.approximations == []


def test_constant_balance_bias_is_exact(tmp_path):
    """A bias equal for every expert of a layer chooses nothing differently: exported without asking."""
    model = adapted()
    for layer in model.loramix_state.moe_layers.values():
        layer.mixlora_router.balance_bias.fill_(0.7)
    assert plan_export(model).approximations == []
    export_and_compare(model, tmp_path / "out")


def biased(model: torch.nn.Module, scale: float = 2.0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(5)
    for layer in model.loramix_state.moe_layers.values():
        bias = layer.mixlora_router.balance_bias
        bias.copy_(torch.randn(bias.shape, generator=g) * scale)
    return model


def test_balance_bias_refused_without_option(tmp_path):
    with pytest.raises(ExportError, match="allow_approximate") as err:
        export_adapted(biased(adapted()), tmp_path / "out", tiny_tokenizer())
    assert "balance bias" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_balance_bias_exported_on_request_with_measured_difference(tmp_path):
    model = biased(adapted())
    expected = loramix_logits(model)
    report = export_adapted(model, tmp_path / "out", tiny_tokenizer(), allow_approximate=True)
    m = report.measured
    assert 0.0 < m["token_layer_expert_sets_differing"] <= 1.0
    assert m["tokens_with_any_layer_differing"] >= m["token_layer_expert_sets_differing"]
    assert m["loss_change"] == pytest.approx(m["loss_exported"] - m["loss_loramix"])
    assert m["max_abs_logit_diff_vs_loramix"] > TOL
    assert report.max_abs_logit_diff < TOL  # exact against loramix routed without the bias
    _, logits = exported_logits(tmp_path / "out")
    assert (logits - expected).abs().max() > TOL
    assert "balance bias" in (tmp_path / "out" / "README.md").read_text()
    assert "balance bias" in report.summary()


def test_switch_needs_option_and_is_top1_weight_one(tmp_path):
    model = adapted(router="switch", capacity_factor=0.5)
    with pytest.raises(ExportError, match="capacity"):
        export_adapted(model, tmp_path / "refused", tiny_tokenizer())
    report = export_adapted(model, tmp_path / "out", tiny_tokenizer(), allow_approximate=True)
    assert report.experts_per_token == 1
    assert report.measured["tokens_dropped_by_capacity"] > 0  # capacity 0.5 must drop some tokens
    assert report.max_abs_logit_diff < TOL


@pytest.mark.parametrize(("cfg", "match"), [
    (dict(router="top_p"), "top_p"),
    (dict(expert_type="adapter"), "adapter"),
])
def test_no_standard_form_refused(cfg, match):
    with pytest.raises(ExportError, match=match):
        plan_export(adapted(**cfg))


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_unsupported_base_names_supported_ones(arch):
    with pytest.raises(ExportError, match="llama -> mixtral") as err:
        plan_export(adapted(arch, attn_r=0) if arch == "gpt2" else adapted(arch))
    assert arch in str(err.value)


def test_wrong_format_names_the_right_one():
    with pytest.raises(ExportError, match="format='qwen2_moe'"):
        plan_export(adapted("qwen2"), format="mixtral")
    with pytest.raises(ExportError, match="unknown"):
        plan_export(adapted(), format="deepseek")


def test_refuses_a_model_that_differs(tmp_path, monkeypatch):
    """The built-in check is live: a wrong expert weight makes the export fail and write nothing."""
    import loramix.export.moe as export

    real = export.merged_experts

    def wrong(mlp):
        experts = real(mlp)
        experts[0]["down"] = experts[0]["down"] + 0.5
        return experts

    monkeypatch.setattr(export, "merged_experts", wrong)
    with pytest.raises(ExportError, match="refusing to write"):
        export_adapted(adapted(), tmp_path / "out", tiny_tokenizer())
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left behind


def test_non_empty_output_dir_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="overwrite"):
        export_adapted(adapted(), out, tiny_tokenizer())
    assert (out / "keep.txt").exists()
    export_adapted(adapted(), out, tiny_tokenizer(), overwrite=True)
    assert not (out / "keep.txt").exists()


def test_bfloat16_shards_and_index(tmp_path):
    report = export_adapted(adapted(), tmp_path / "out", tiny_tokenizer(), dtype="bfloat16", max_shard_size="50KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    with safe_open(str(out / shards[0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    assert report.exported_bytes == sum((out / s).stat().st_size for s in shards)
    assert report.max_abs_logit_diff < TOL  # checked on the float32 weights
    assert report.measured["max_abs_logit_diff_after_cast"] > report.max_abs_logit_diff  # bf16 rounding, reported
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(model).__name__ == "MixtralForCausalLM"


def test_cli_export(tmp_path, capsys):
    """`loramix export` on a saved base directory and adapter: the report prints the three sizes."""
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = adapted()
    save_adapter(model, tmp_path / "adapter")
    expected = loramix_logits(model)
    code = main(["export", "--adapter", str(tmp_path / "adapter"), "--model", str(base_dir),
                 "--output-dir", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "exported" in printed and "base" in printed and "adapter" in printed
    _, logits = exported_logits(tmp_path / "out")
    assert (logits - expected).abs().max() < TOL
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(tmp_path / "adapter") in card and "loramix" in card
    meta = json.loads((tmp_path / "out" / "loramix_export.json").read_text())
    assert meta["adapter_bytes"] == (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size


def test_cli_export_error_names_option(tmp_path, capsys):
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    save_adapter(biased(adapted()), tmp_path / "adapter")
    code = main(["export", "--adapter", str(tmp_path / "adapter"), "--model", str(base_dir),
                 "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert "--allow-approximate" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["adapter_all_top2", "adapter_rslora_top1"])
def test_official_mixlora_adapter_exports(variant, tmp_path):
    """An adapter written by the official MixLoRA package exports to a Mixtral that computes the official
    package's logits (stored in the fixture)."""
    from safetensors.torch import load_file

    from loramix import load_adapter

    fixture = Path(__file__).parent / "fixtures" / "official_mixlora"
    base = AutoModelForCausalLM.from_pretrained(fixture / "base", dtype=torch.float32).eval()
    export_adapted(load_adapter(base, fixture / variant), tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids = load_file(fixture / "inputs.safetensors")["input_ids"]
    with torch.no_grad():
        logits = exported(input_ids=ids).logits
    assert (logits - load_file(fixture / "expected_logits.safetensors")[variant]).abs().max() < TOL
