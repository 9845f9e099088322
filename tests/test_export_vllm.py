"""``format='vllm'``: the native MixLoRA export written and read back (no vLLM needed), and its bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from helpers.tiny_models import perturb_adapters, random_batch, tiny_model
from helpers.tiny_tokenizer import tiny_tokenizer
from loramix import AdapterLoadError, MixLoraConfig, inject, load_exported, save_adapter
from loramix.cli import main
from loramix.export import ExportError, export_adapted, export_model
from loramix.vllm_plugin import TESTED_VLLM, check_vllm_version

CASES = {
    "topk": dict(num_experts=4, top_k=2),
    "uneven_top2": dict(num_experts=[4, 3], top_k=2),
    "frozen_layer": dict(num_experts=[0, 4], top_k=2),
    "noisy_topk": dict(num_experts=4, router="noisy_topk"),
    "dense": dict(num_experts=4, router="dense"),
    "top_p": dict(num_experts=4, router="top_p", top_p=0.6),
    "adapter": dict(num_experts=4, top_k=2, expert_type="adapter"),
    "up_down": dict(num_experts=4, top_k=2, expert_targets=["up", "down"]),
}


def adapted(fields: dict, arch: str = "llama", seed: int = 0, bias: bool = True) -> torch.nn.Module:
    cfg = MixLoraConfig(**(dict(r=4, alpha=8, attn_r=4, attn_alpha=8, dropout=0.0, attn_dropout=0.0) | fields))
    model = inject(tiny_model(arch, seed=seed), cfg)
    perturb_adapters(model, scale=0.3)
    if bias:  # a trained balance bias: it changes which experts are chosen
        for layer in model.model.layers:
            if hasattr(layer.mlp, "router"):
                layer.mlp.router.balance_bias.copy_(torch.linspace(-0.5, 0.5, layer.mlp.num_experts))
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids, _ = random_batch(batch=2, seq=16)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_equals_loramix(case, tmp_path):
    """Written, read back with load_exported: the loramix model's logits (float32), balance bias included."""
    model = adapted(CASES[case])
    expected = logits(model)
    report = export_adapted(model, tmp_path / "out", tiny_tokenizer(), format="vllm")
    assert report.architecture == "MixLoraLlamaForCausalLM" and report.max_abs_logit_diff < 1e-4
    torch.testing.assert_close(logits(load_exported(tmp_path / "out")), expected, rtol=1e-4, atol=1e-4)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["MixLoraLlamaForCausalLM"] and config["model_type"] == "llama"
    section = config["mixlora"]
    assert section["layer_experts"] == [layer.mlp.num_experts if hasattr(layer.mlp, "router") else 0
                                        for layer in model.model.layers]
    assert section["router"] == {"noisy_topk": "topk"}.get(model_router(model), model_router(model))
    assert "pip install loramix[vllm]" in (tmp_path / "out" / "README.md").read_text()


def model_router(model) -> str:
    from loramix import get_config

    return get_config(model).router


def test_weights_stored_once_and_routers_float32(tmp_path):
    """The base's tensors appear once (no merged expert copies), the tied embedding stays tied, the adapter adds
    only its factors, routers and biases; in bfloat16 the routers stay float32."""
    base = tiny_model("llama", tie_word_embeddings=True)
    base_tensors = {k: v.numel() for k, v in base.state_dict().items() if k != "lm_head.weight"}
    model = inject(base, MixLoraConfig(num_experts=4, top_k=2, r=4, attn_r=4, dropout=0.0, attn_dropout=0.0))
    perturb_adapters(model, scale=0.3)
    adapter = sum(p.numel() for n, p in model.named_parameters() if "mixlora_" in n and "attn" not in n)
    adapter += sum(layer.mlp.num_experts for layer in model.model.layers)  # balance biases
    report = export_adapted(model.eval(), tmp_path / "out", tiny_tokenizer(), format="vllm", dtype="bfloat16")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        dtypes = {n: f.get_tensor(n).dtype for n in names}
    assert "lm_head.weight" not in names
    assert set(base_tensors) <= names
    assert report.exported_params == sum(base_tensors.values()) + adapter
    assert all(dtypes[n] == torch.float32 for n in names if ".router." in n)
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16
    assert report.measured["max_abs_logit_diff_after_cast"] > 0


def test_qwen2_round_trip(tmp_path):
    model = adapted(CASES["topk"], arch="qwen2")
    expected = logits(model)
    report = export_adapted(model, tmp_path / "out", tiny_tokenizer(), format="vllm")
    assert report.architecture == "MixLoraQwen2ForCausalLM"
    torch.testing.assert_close(logits(load_exported(tmp_path / "out")), expected, rtol=1e-4, atol=1e-4)


def test_switch_needs_allow_approximate_and_measures_it(tmp_path):
    model = adapted(dict(num_experts=4, router="switch", capacity_factor=1.0))
    with pytest.raises(ExportError, match="capacity_factor"):
        export_adapted(model, tmp_path / "out", tiny_tokenizer(), format="vllm")
    assert not (tmp_path / "out").exists()
    report = export_adapted(model, tmp_path / "out", tiny_tokenizer(), format="vllm", allow_approximate=True)
    assert report.measured["tokens_dropped_by_capacity"] > 0


def test_unsupported_base_named(tmp_path):
    with pytest.raises(ExportError, match="format='vllm' cannot represent a 'gpt2' base"):
        export_adapted(adapted(dict(num_experts=2, top_k=1), arch="gpt2", bias=False), tmp_path / "out",
                       format="vllm")
    assert list(tmp_path.iterdir()) == []


def test_non_empty_output_dir_refused_before_loading(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match=f"output_dir {out} exists and is not empty"):
        export_adapted(adapted(CASES["topk"]), out, format="vllm")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_mismatched_base_refused(tmp_path):
    """An adapter exported with another base of the same shapes: refused, naming both, nothing written."""
    model = adapted(CASES["topk"], seed=0)
    save_adapter(model, tmp_path / "adapter")
    other = tmp_path / "other_base"
    tiny_model("llama", seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    with pytest.raises(AdapterLoadError, match="weights differ"):
        export_model(tmp_path / "adapter", tmp_path / "out", model=str(other), format="vllm")
    assert not (tmp_path / "out").exists()


def test_cli_export_format_vllm(tmp_path, capsys):
    base_dir = tmp_path / "base"
    tiny_model("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = adapted(CASES["topk"])
    save_adapter(model, tmp_path / "adapter")
    expected = logits(model)
    code = main(["export", "--adapter", str(tmp_path / "adapter"), "--model", str(base_dir), "--format", "vllm",
                 "--output-dir", str(tmp_path / "out")])
    assert code == 0
    assert "MixLoraLlamaForCausalLM" in capsys.readouterr().out
    torch.testing.assert_close(logits(load_exported(tmp_path / "out")), expected, rtol=1e-4, atol=1e-4)


def test_load_exported_refuses_other_directories(tmp_path):
    export_adapted(adapted(CASES["topk"], bias=False), tmp_path / "mixtral", tiny_tokenizer())
    with pytest.raises(ExportError, match="no 'mixlora' section"):
        load_exported(tmp_path / "mixtral")
    with pytest.raises(ExportError, match="config.json not found"):
        load_exported(tmp_path / "nothing")


def test_untested_vllm_version_named(monkeypatch):
    low, high = TESTED_VLLM
    check_vllm_version(low)
    monkeypatch.delenv("LORAMIX_VLLM_UNTESTED", raising=False)
    for version in ("0.31.2", high + ".0", "1.0.0"):
        with pytest.raises(RuntimeError, match=f"tested with vLLM >= {low}, < {high}; this is vLLM {version}"):
            check_vllm_version(version)
    monkeypatch.setenv("LORAMIX_VLLM_UNTESTED", "1")
    check_vllm_version("1.0.0")


def test_other_format_version_named(tmp_path):
    export_adapted(adapted(CASES["topk"]), tmp_path / "out", tiny_tokenizer(), format="vllm")
    path = tmp_path / "out" / "config.json"
    config = json.loads(path.read_text())
    config["mixlora"]["format_version"] = 99
    path.write_text(json.dumps(config))
    with pytest.raises(ExportError, match="mixlora.format_version=99"):
        load_exported(tmp_path / "out")


def test_entry_point_and_architectures_agree():
    """pyproject's vllm.general_plugins entry point names the plugin's register(), and the plugin registers every
    architecture the export writes."""
    import importlib
    from pathlib import Path

    import tomllib

    from loramix.export.vllm import VLLM_ARCHITECTURES
    from loramix.vllm_plugin import MODELS

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    module, func = project["entry-points"]["vllm.general_plugins"]["loramix"].split(":")
    assert callable(getattr(importlib.import_module(module), func))
    assert set(VLLM_ARCHITECTURES.values()) == set(MODELS)
    assert all(target.startswith("loramix.vllm_plugin.model:") for target in MODELS.values())
    assert any(dep.startswith("vllm") for dep in project["optional-dependencies"]["vllm"])
