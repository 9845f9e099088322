"""Official MixLoRA (PyPI mixlora 0.2.3) adapters load into loramix with the official logits.

The fixture (tests/fixtures/official_mixlora, made by make_official_mixlora_fixture.py in a separate
venv with the official package) holds a tiny Llama, two official adapters and the logits the official
package computed for them. The last tests re-run the official package live when it is importable.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Qwen2Config

import loramix
from loramix.interop import OfficialMixLoraError, load_official_mixlora, read_official_adapter

FIXTURE = Path(__file__).parent / "fixtures" / "official_mixlora"
VARIANTS = ["adapter_all_top2", "adapter_rslora_top1"]
ATOL = 1e-5
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return load_file(FIXTURE / "inputs.safetensors")["input_ids"]


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "expected_logits.safetensors")


def base_model() -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(FIXTURE / "base", dtype=torch.float32).eval()


def logits(model: torch.nn.Module, input_ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kw).logits


def tampered_copy(tmp_path: Path, variant: str, **changes) -> Path:
    """A copy of a fixture adapter with some adapter_config.json fields replaced."""
    dst = tmp_path / variant
    shutil.copytree(FIXTURE / variant, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


# --- fixture: logits equal the official package's --------------------------------------------------
def test_fixture_base_is_reproduced(inputs, expected):
    # float32 rounding differs between CPU kernels (AVX2 / AVX-512): equal to rounding, not bit for bit
    torch.testing.assert_close(logits(base_model(), inputs), expected["base"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("reference", [False, True], ids=["fast", "reference"])
def test_official_adapter_logits_match(variant, reference, inputs, expected):
    model = load_official_mixlora(base_model(), FIXTURE / variant)
    assert not model.training
    for layer in loramix.injection.get_state(model).moe_layers.values():
        layer.use_reference = reference
    out = logits(model, inputs)
    assert (expected[variant] - expected["base"]).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(out, expected[variant], atol=ATOL, rtol=0)


def test_config_mapping(tmp_path):
    model = load_official_mixlora(base_model(), FIXTURE / "adapter_rslora_top1")
    cfg = loramix.get_config(model)
    assert (cfg.num_experts, cfg.top_k, cfg.r, cfg.alpha, cfg.use_rslora) == (3, 1, 2, 4.0, True)
    assert cfg.expert_targets == ["up", "down"] and cfg.attn_targets == ["q_proj", "o_proj"]
    assert (cfg.attn_r, cfg.attn_alpha, cfg.router, cfg.expert_type) == (2, 4.0, "topk", "mixlora")
    assert cfg.balance_coef == pytest.approx(0.001 * 1)  # MoE-PEFT default coef, x top_k


def test_loaded_model_saves_and_reloads_as_loramix(tmp_path, inputs, expected):
    model = load_official_mixlora(base_model(), FIXTURE / "adapter_all_top2")
    loramix.save_adapter(model, tmp_path / "converted")
    again = loramix.load_adapter(base_model(), tmp_path / "converted").eval()
    torch.testing.assert_close(logits(again, inputs), expected["adapter_all_top2"], atol=ATOL, rtol=0)


def test_weights_are_really_used(tmp_path, inputs, expected):
    dst = tmp_path / "w"
    shutil.copytree(FIXTURE / "adapter_all_top2", dst)
    _, weights = read_official_adapter(dst)
    weights["mixlora.layers.1.mlp.down_proj.experts.2.lora_B.weight"] += 0.5
    torch.save(weights, dst / "adapter_model.bin")
    out = logits(load_official_mixlora(base_model(), dst), inputs)
    assert (out - expected["adapter_all_top2"]).abs().max() > 1e-3


# --- tampered configs / weights fail naming the culprit ---------------------------------------------
@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"routing_strategy": "mixlora-switch"}, "'routing_strategy'"),
        ({"peft_type": "LORA"}, "'peft_type'"),
        ({"use_dora": True}, "'use_dora'"),
        ({"act_fn": "gelu"}, "'act_fn'"),
        ({"act_fn": "no_such_act"}, "'act_fn'"),
        ({"lora_dropout": 1.5}, "'lora_dropout'"),
        ({"lora_alpha": "16"}, "'lora_alpha'"),
        ({"bias": "all"}, "'bias'"),
        ({"top_k": 5}, "'top_k'"),
        ({"task_type": "SEQ_CLS"}, "'task_type'"),
        ({"some_new_option": 1}, "'some_new_option'"),
        ({"expert_lora": {"lora_alpha": 16}}, "'expert_lora.lora_alpha'"),
        ({"expert_lora": {"use_dora": True}}, "'expert_lora.use_dora'"),
        ({"target_modules": ["q_proj", "up_proj", "lm_head"]}, "'target_modules'"),
        ({"r": 8}, "shape"),
        ({"num_experts": 5}, r"moe_gate.weight has shape \(4, 64\)"),
    ],
)
def test_tampered_config_fails_clearly(tmp_path, changes, match):
    adapter = tampered_copy(tmp_path, "adapter_all_top2", **changes)
    with pytest.raises(OfficialMixLoraError, match=match):
        load_official_mixlora(base_model(), adapter)


def test_missing_tensor_is_named(tmp_path):
    dst = tmp_path / "w"
    shutil.copytree(FIXTURE / "adapter_rslora_top1", dst)
    _, weights = read_official_adapter(dst)
    del weights["mixlora.layers.1.self_attn.o_proj.lora_B.weight"]
    torch.save(weights, dst / "adapter_model.bin")
    with pytest.raises(OfficialMixLoraError, match=r"mixlora\.layers\.1\.self_attn\.o_proj\.lora_B\.weight"):
        load_official_mixlora(base_model(), dst)


def test_non_strict_ignores_what_mixlora_ignores(tmp_path, inputs, expected):
    # fewer targets than tensors + an unknown key: mixlora skips both, strict=False warns and does the same
    adapter = tampered_copy(
        tmp_path, "adapter_all_top2", some_new_option=1,
        target_modules=[*ALL_PROJ, "lm_head"],
    )  # fmt: skip
    with pytest.warns(UserWarning):
        model = load_official_mixlora(base_model(), adapter, strict=False)
    torch.testing.assert_close(logits(model, inputs), expected["adapter_all_top2"], atol=ATOL, rtol=0)


def test_expert_lora_block(tmp_path, inputs, expected):
    same = tampered_copy(
        tmp_path / "a", "adapter_all_top2", expert_lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.2}
    )
    model = load_official_mixlora(base_model(), same)  # equal r/alpha: no ambiguity, official logits
    torch.testing.assert_close(logits(model, inputs), expected["adapter_all_top2"], atol=ATOL, rtol=0)
    other = tampered_copy(tmp_path / "b", "adapter_all_top2", expert_lora={"lora_alpha": 16})
    model = load_official_mixlora(base_model(), other, honor_expert_lora=True)  # MoE-PEFT semantics
    cfg = loramix.get_config(model)
    assert (cfg.alpha, cfg.attn_alpha) == (16.0, 8.0)
    assert (logits(model, inputs) - expected["adapter_all_top2"]).abs().max() > 1e-3


# --- live comparison with the official package (skipped unless `mixlora` is importable) --------------
def _tiny(arch: str) -> torch.nn.Module:
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}.get(arch)
    cfg = cfg(**common) if cfg else GemmaConfig(**common, head_dim=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _official_files(tmp_path: Path, model: torch.nn.Module, raw: dict, seed: int) -> Path:
    """Write an official adapter (config via mixlora's own export) with random non-zero weights."""
    import mixlora

    cfg = mixlora.MixLoraConfig.from_config(raw)
    cfg.adapter_name_, cfg.dtype_ = "default", torch.float32
    exported = cfg.check().export()
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i, layer in enumerate(model.model.layers):
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = torch.randn(raw["num_experts"], 32, generator=g)
        for t in exported["target_modules"]:
            for part, n in (("self_attn", 0), ("mlp", raw["num_experts"])):
                mod = getattr(getattr(layer, part), t, None)
                if mod is None:
                    continue
                out_f, in_f = mod.weight.shape
                for e in range(max(n, 1)):
                    p = f"mixlora.layers.{i}.{part}.{t}" + (f".experts.{e}" if n else "")
                    weights[f"{p}.lora_A.weight"] = torch.randn(raw["r"], in_f, generator=g) / in_f**0.5
                    weights[f"{p}.lora_B.weight"] = torch.randn(out_f, raw["r"], generator=g) * 0.1
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(exported))
    torch.save(weights, tmp_path / "adapter_model.bin")
    return tmp_path


def _official_logits(model: torch.nn.Module, adapter: Path, input_ids, attention_mask) -> torch.Tensor:
    import mixlora
    from mixlora.lora_linear import LoraLinear

    config, weights = mixlora.load_adapter_weights(str(adapter), device="cpu")
    mixlora.inject_adapter_in_model(model, config, weights)
    model.eval()  # expert LoraLinears sit in plain dicts: model.eval() misses them (dropout stays on)
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            for lora in moe.experts_.values():
                lora.eval()
    assert all(not m.training for m in model.modules() if isinstance(m, LoraLinear))
    return logits(model, input_ids, attention_mask=attention_mask)


LIVE_CASES = {
    "llama_all_top2": ("llama", {"target_modules": ALL_PROJ, "num_experts": 4, "top_k": 2, "act_fn": "silu"}),
    "qwen2_rslora_top3": (
        "qwen2",
        {"target_modules": ["v_proj", "gate_proj", "down_proj"], "num_experts": 5, "top_k": 3,
         "use_rslora": True, "act_fn": "silu"},
    ),
    "gemma_gelu_top1": (
        "gemma",
        {"target_modules": ["q_proj", "up_proj"], "num_experts": 3, "top_k": 1,
         "act_fn": "gelu_pytorch_tanh"},
    ),
    "llama_attention_only": (
        "llama", {"target_modules": ["q_proj", "v_proj"], "num_experts": 4, "top_k": 2, "act_fn": "silu"}
    ),
}  # fmt: skip


@pytest.mark.skipif(
    importlib.util.find_spec("mixlora") is None, reason="official `mixlora` package not importable"
)
@pytest.mark.parametrize("case", list(LIVE_CASES))
def test_live_against_official_package(case, tmp_path):
    arch, extra = LIVE_CASES[case]
    raw = {"base_model_name_or_path": "tiny", "task_type": "CAUSAL_LM", "peft_type": "MIXLORA",
           "routing_strategy": "mixlora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, **extra}  # fmt: skip
    adapter = _official_files(tmp_path, _tiny(arch), raw, seed=len(case))
    input_ids = torch.randint(0, 96, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    mask[1, :4] = 0  # left padding: real tokens never attend to it
    mask[2, :1] = 0
    want = _official_logits(_tiny(arch), adapter, input_ids, mask)
    got = logits(load_official_mixlora(_tiny(arch), adapter), input_ids, attention_mask=mask)
    real = mask.bool()
    assert (want - logits(_tiny(arch), input_ids, attention_mask=mask))[real].abs().max() > 1e-2
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)


def test_load_adapter_dispatches_official_format():
    """loramix.load_adapter recognises an official MixLoRA directory and gives the official logits."""
    fixture = Path(__file__).parent / "fixtures" / "official_mixlora"
    base = AutoModelForCausalLM.from_pretrained(fixture / "base").eval()
    model = loramix.load_adapter(base, fixture / "adapter_all_top2")
    ids = load_file(fixture / "inputs.safetensors")["input_ids"]
    expected = load_file(fixture / "expected_logits.safetensors")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, expected["adapter_all_top2"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, expected["base"], atol=1e-3)  # the adapter really changes the output


def _pickle_with_an_object(path: Path, tensors: dict) -> None:
    """A pickled adapter_model.bin that holds a Python object besides the tensors (not loadable safely)."""
    import datetime

    torch.save({**tensors, "saved_on": datetime.date(2024, 1, 1)}, path)


def test_pickle_holding_objects_is_refused_without_unsafe_advice(tmp_path):
    """An official adapter_model.bin that weights-only loading refuses fails naming the file and the object,
    and the message never suggests turning the safety off."""
    adapter = tampered_copy(tmp_path, "adapter_all_top2")
    _pickle_with_an_object(adapter / "adapter_model.bin", torch.load(adapter / "adapter_model.bin", weights_only=True))
    with pytest.raises(loramix.AdapterLoadError) as e:
        loramix.load_adapter(base_model(), adapter)
    msg = str(e.value)
    assert "adapter_model.bin" in msg and "datetime.date" in msg and "safetensors" in msg
    assert "weights_only" not in msg and e.value.__cause__ is None and e.value.__suppress_context__


def test_peft_adapter_pickle_is_refused_by_the_cli_in_one_line(tmp_path, capsys):
    """`loramix generate --adapter <PEFT dir with such a pickle>` exits 2 with one line naming the file."""
    from peft import LoraConfig, get_peft_model

    from helpers.tiny_lm import save_tiny_lm
    from loramix.cli import main

    model_dir = save_tiny_lm(tmp_path / "m")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "peft", safe_serialization=False)
    weights = tmp_path / "peft" / "adapter_model.bin"
    _pickle_with_an_object(weights, torch.load(weights, weights_only=True))
    rc = main(["generate", "--prompt", "hi", "--model", model_dir, "--adapter", str(tmp_path / "peft"),
               "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err  # progress bars of the model loading come first
    assert rc == 2 and "Traceback" not in err and "weights_only" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("loramix: error: ") and "adapter_model.bin" in last and "refused" in last, last


def test_checkpoint_load_adapter_reads_the_official_format_in_a_fresh_process():
    """load_adapter imports the modules that register formats itself: a process that imports only
    loramix.checkpoint (never loramix.interop) still loads an official directory."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from loramix.checkpoint import load_adapter\n"
        f"base = AutoModelForCausalLM.from_pretrained({str(FIXTURE / 'base')!r}).eval()\n"
        f"model = load_adapter(base, {str(FIXTURE / 'adapter_all_top2')!r})\n"
        "print(sum(1 for n, _ in model.named_parameters() if 'mixlora_' in n))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 0


def test_a_registered_format_is_dispatched_before_the_loramix_format(tmp_path):
    from loramix.checkpoint import ADAPTER_FORMATS, AdapterFormat, load_adapter, register_adapter_format

    seen = []
    fmt = AdapterFormat("test_format", lambda d: (Path(d) / "test.marker").is_file(),
                        lambda base, d: seen.append(Path(d)) or base)
    (tmp_path / "test.marker").write_text("x")
    saved = list(ADAPTER_FORMATS)
    try:
        register_adapter_format(fmt)
        register_adapter_format(fmt)  # registering again replaces, never duplicates
        assert [f.name for f in ADAPTER_FORMATS].count("test_format") == 1
        base = base_model().train()
        model = load_adapter(base, tmp_path)  # trainable=False: the loaded model comes back frozen
        assert model is base and seen == [tmp_path] and not any(p.requires_grad for p in model.parameters())
    finally:
        ADAPTER_FORMATS[:] = saved
