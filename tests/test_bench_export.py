"""The bench's exported-model rows (``export_decode``): the exported checkpoint decoded with transformers, and
with vLLM (plumbing with a stand-in interpreter here; the real vLLM run is slow)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

from bench import harness as bench
from helpers.serving import vllm_python
from helpers.tiny_models import tiny_model

SMALL = dict(batch_size=2, seq_len=12, steps=2, warmup=1, decode_tokens=5, prompt_len=3, num_experts=4, r=4,
             alpha=8, device="cpu", log=None, include_official=False, compile_decode=False)


def fake_vllm(tmp_path: Path, seconds: dict[str, float]) -> str:
    """An executable standing in for vLLM's python: prints the result line bench/vllm_decode.py prints, with
    fixed times, and records the job it was given."""
    script = tmp_path / "fake_python"
    result = {name: {"decode_s_all": [t, t], "decode_new_tokens": 5, "vllm_version": "fake"}
              for name, t in seconds.items()}
    script.write_text(f"#!/bin/sh\necho \"$2\" > {tmp_path / 'job.json'}\n"
                      f"echo '{bench.VLLM_MARK}{json.dumps(result)}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fake_vllm")
    python = fake_vllm(tmp, {"vllm_base": 0.5, "vllm_exported_topk": 1.0})
    out = bench.run_benchmark(tiny_model("llama"), routers=("topk", "top_p"), export_decode=True,
                              vllm_python=python, **SMALL)
    out["_job"] = json.loads((tmp / "job.json").read_text())
    return out


def test_exported_rows_decode_with_transformers(result):
    f, base = result["variants"]["exported_topk"], result["variants"]["base"]
    assert f["decode_new_tokens"] == 5 and f["decode_tokens_per_s"] > 0 and f["infer_step_s"] > 0
    assert f["train_step_s"] is None and f["trainable_params"] == 0  # decode only
    assert result["ratios"]["exported_topk"]["decode_vs_base"] == pytest.approx(
        f["decode_tokens_per_s"] / base["decode_tokens_per_s"])
    info = result["exported"]["exported_topk"]
    assert info["architecture"] == "MixtralForCausalLM" and info["num_experts"] == 4 and info["experts_per_token"] == 2
    assert "exported_top_p" not in result["variants"] and "top_p" in result["skipped"]["exported_top_p"]
    assert result["variants"]["mixlora_top_p"]["decode_tokens_per_s"] > 0  # the loramix row is still measured
    table = bench.format_table(result)
    assert "| exported_topk |" in table and "| vllm_exported_topk |" in table
    assert result["config"]["export_decode"] is True


def test_vllm_rows_are_relative_to_vllm_base_of_the_same_run(result):
    v = result["variants"]
    assert v["vllm_base"]["decode_tokens_per_s"] == pytest.approx(10.0)  # 5 tokens / 0.5 s
    assert v["vllm_exported_topk"]["decode_tokens_per_s"] == pytest.approx(5.0)
    assert result["ratios"]["vllm_exported_topk"]["decode_vs_base"] == pytest.approx(0.5)
    assert result["ratios"]["vllm_base"]["decode_vs_base"] == pytest.approx(1.0)
    job = result["_job"]
    assert set(job["models"]) == {"vllm_base", "vllm_exported_topk", "vllm_native_topk", "vllm_native_top_p"}
    assert job["decode_tokens"] == 5
    assert job["prompt"] == bench.bench_prompt(128, 2, 12, 3, 0)
    assert Path(job["models"]["vllm_exported_topk"]).name == "exported_topk"
    native = result["exported"]["native_topk"]  # --format vllm: the base's weights once plus the adapter
    assert native["architecture"] == "MixLoraLlamaForCausalLM"
    assert native["exported_bytes"] < result["exported"]["exported_topk"]["exported_bytes"]


def test_bench_prompt_is_the_runners_prompt():
    runner = bench.VariantRunner("x", tiny_model("llama"), [], batch_size=2, seq_len=12, decode_tokens=5,
                                 prompt_len=3, device=torch.device("cpu"), vocab_size=128, train=False, seed=7)
    assert runner.prompt[0].tolist() == bench.bench_prompt(128, 2, 12, 3, 7)


def test_export_for_bench_writes_the_exported_architecture(tmp_path):
    """The timed checkpoint is the MoE export of the mixlora row's model: its logits equal that model's."""
    base = tiny_model("llama")
    base.requires_grad_(False)
    info = bench.export_for_bench(base, tmp_path / "exp", seed=3, router="topk", num_experts=4, top_k=2, r=4,
                                  alpha=8, dropout=0.0)
    model = bench.load_exported(tmp_path / "exp", torch.device("cpu"))
    assert type(model).__name__ == "MixtralForCausalLM" and info["exported_params"] > 0
    torch.manual_seed(3)
    mix, _ = bench.make_loramix(bench.fresh_copy(base), router="topk", num_experts=4, top_k=2, r=4, alpha=8,
                                dropout=0.0)
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, mix.eval()(input_ids=ids).logits, rtol=0, atol=1e-4)
    refused = bench.export_for_bench(base, tmp_path / "p", seed=0, router="top_p", num_experts=4, top_k=2, r=4,
                                     alpha=8, dropout=0.0)
    assert isinstance(refused, str) and "top_p" in refused and not (tmp_path / "p").exists()


def test_vllm_not_found_is_a_skip_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAMIX_VLLM_PYTHON", raising=False)
    python, why = bench.find_vllm_python(str(tmp_path / "nope"))
    assert python is None and "nope" in why
    monkeypatch.setenv("LORAMIX_VLLM_PYTHON", str(tmp_path / "nope2"))
    assert "LORAMIX_VLLM_PYTHON" in bench.find_vllm_python()[1]


def test_run_bench_flags(tmp_path):
    from bench.run_bench import parse_args

    args = parse_args(["--export-decode", "--vllm-python", "/x/python"])
    assert args.export_decode and args.vllm_python == "/x/python"
    assert not parse_args([]).export_decode


@pytest.mark.slow
def test_vllm_decodes_the_exported_checkpoint(tmp_path):
    """Real vLLM (CPU): the base, the exported Mixtral and the native export (loramix's plugin, loaded from this
    loramix through the bench's entry-point shim) decode exactly decode_tokens tokens each."""
    python = vllm_python()
    model = tiny_model("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128)  # vLLM's CPU attention: head_dim >= 32
    out = bench.run_benchmark(model, routers=("topk",), export_decode=True, vllm_python=str(python),
                              **{**SMALL, "steps": 2, "warmup": 1})
    assert "vllm" not in out["skipped"], out["skipped"]
    for name in ("vllm_base", "vllm_exported_topk", "vllm_native_topk"):
        f = out["variants"][name]
        assert f["decode_new_tokens"] == 5 and f["decode_tokens_per_s"] > 0 and len(f["decode_s_all"]) == 2
        assert f["engine"].startswith("vllm ")
    assert out["ratios"]["vllm_exported_topk"]["decode_vs_base"] > 0
