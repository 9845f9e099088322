"""The bench harness (loramix.benchmark.harness) on a tiny model: every variant and key is produced, ratios are
consistent, table renders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import harness as bench
from helpers.tiny_models import tiny_model
from helpers.tiny_tokenizer import tiny_tokenizer

FIGURES = {
    "trainable_params",
    "train_step_s",
    "train_tokens_per_s",
    "peak_memory_mb",
    "infer_step_s",
    "infer_tokens_per_s",
    "decode_s",
    "decode_new_tokens",
    "decode_tokens_per_s",
}
SMALL = dict(
    batch_size=2,
    seq_len=12,
    steps=2,
    warmup=1,
    decode_tokens=5,
    prompt_len=3,
    num_experts=4,
    r=4,
    alpha=8,
    device="cpu",
    log=None,
)


@pytest.fixture(scope="module")
def result():
    return bench.run_benchmark(tiny_model("llama"), routers=("topk", "switch"), include_official=True, **SMALL)


def test_all_variants_and_keys(result):
    assert {"base", "peft_lora", "mixlora_topk", "mixlora_switch"} <= set(result["variants"])
    assert ("official_mixlora" in result["variants"]) != ("official_mixlora" in result["skipped"])
    for name, f in result["variants"].items():
        assert set(f) >= FIGURES, name
        assert f["decode_new_tokens"] == 5  # exactly the requested tokens (EOS suppressed)
        assert f["decode_tokens_per_s"] > 0 and f["infer_step_s"] > 0
        if name == "base":  # its step is the frozen forward + backward floor
            assert f["trainable_params"] == 0
        assert f["train_step_s"] > 0 and len(f["train_step_s_all"]) == 2
        assert f["train_tokens_per_s"] == pytest.approx(2 * 12 / f["train_step_s"])
    for name in ("peft_lora", "mixlora_topk", "mixlora_switch"):  # decoding after merging what merges
        f = result["variants"][name]
        assert f["decode_merged_tokens_per_s"] > 0 and len(f["decode_s_all"]) == 2, name
        assert result["ratios"][name]["decode_merged_vs_base"] == pytest.approx(
            f["decode_merged_tokens_per_s"] / result["variants"]["base"]["decode_tokens_per_s"]
        )
    assert result["variants"]["base"]["decode_merged_tokens_per_s"] is None
    assert "merged decode / base" in bench.format_table(result)
    for name in ("mixlora_topk", "mixlora_switch"):  # merged + compiled decoding, every layer compiled
        f, t = result["variants"][name], result["targets"][name]
        assert f["decode_compiled_tokens_per_s"] > 0 and f["decode_compiled_layers"] == 2, name
        assert t["decode_compiled_vs_base"] == pytest.approx(
            f["decode_compiled_tokens_per_s"] / result["variants"]["base"]["decode_tokens_per_s"]
        )
        assert t["decode_compiled_target_met"] == (t["decode_compiled_vs_base"] >= bench.TARGET_DECODE_RATIO)
    assert result["variants"]["peft_lora"]["decode_compiled_tokens_per_s"] is None
    assert "merged+compiled decode / base" in bench.format_table(result)
    assert result["machine"]["malloc_tuned"] in (True, False)
    assert result["memory_metric"] == "cpu_peak_rss_delta"
    assert set(result["config"]) >= {"batch_size", "seq_len", "steps", "warmup", "routers"}
    assert result["machine"]["device"] == "cpu" and result["machine"]["torch"] == torch.__version__
    json.dumps(result)  # serialisable


def test_trainable_parameter_counts_are_exact(result):
    m = tiny_model("llama")
    h, i, layers, e, r = 32, 64, 2, 4, 4
    kv = m.config.num_key_value_heads * (h // m.config.num_attention_heads)
    attn = r * ((h + h) + (h + kv) + (h + kv) + (h + h))  # q, k, v, o: r * (in + out)
    ffn = r * ((h + i) * 2 + (i + h))  # gate, up, down
    assert result["variants"]["peft_lora"]["trainable_params"] == layers * (attn + ffn)
    router = e * h
    assert result["variants"]["mixlora_topk"]["trainable_params"] == layers * (attn + e * ffn + router)
    if "official_mixlora" in result["variants"]:  # same adapter, other implementation
        assert result["variants"]["official_mixlora"]["trainable_params"] == layers * (attn + e * ffn + router)


def test_ratios_and_targets(result):
    v, rt = result["variants"], result["ratios"]
    assert rt["peft_lora"]["step_vs_lora"] == pytest.approx(1.0)
    assert rt["base"]["decode_vs_base"] == pytest.approx(1.0)
    assert rt["mixlora_topk"]["step_vs_lora"] == pytest.approx(
        v["mixlora_topk"]["train_step_s"] / v["peft_lora"]["train_step_s"]
    )
    t = result["targets"]["mixlora_topk"]
    assert t["step_target_met"] == (t["step_vs_lora"] <= bench.TARGET_STEP_RATIO)
    assert t["decode_target_met"] == (t["decode_vs_base"] >= bench.TARGET_DECODE_RATIO)
    official = v.get("official_mixlora")
    if official is not None:
        assert t["step_vs_official"] == pytest.approx(v["mixlora_topk"]["train_step_s"] / official["train_step_s"])
        assert t["official_target_met"] == (t["step_vs_official"] <= bench.TARGET_OFFICIAL_RATIO)
        assert t["floor_vs_official"] == pytest.approx(v["base"]["train_step_s"] / official["train_step_s"])
    else:
        assert t["official_target_met"] is None and t["floor_vs_official"] is None
    floor, lora = v["base"]["train_step_s"], v["peft_lora"]["train_step_s"]
    assert t["overhead_vs_lora_overhead"] == pytest.approx((v["mixlora_topk"]["train_step_s"] - floor) / (lora - floor))
    table = bench.format_table(result)
    assert table.count("\n") >= 4 and "| mixlora_switch |" in table and "step / official" in table


def test_floor_step_backpropagates_through_the_frozen_model_only():
    """The base variant's step computes gradients through every layer but for no weight."""
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    runner = bench.VariantRunner("base", model, [], batch_size=2, seq_len=6, decode_tokens=2, prompt_len=2,
                                 device=torch.device("cpu"), vocab_size=model.config.vocab_size)
    seen = []
    hook = model.model.layers[0].register_full_backward_hook(lambda mod, gin, gout: seen.append(gout[0].shape))
    runner.train_step()
    hook.remove()
    assert seen == [torch.Size([2, 6, 32])]  # the backward reached the first layer
    assert all(p.grad is None for p in model.parameters())


def test_training_step_really_updates_the_adapter():
    model = tiny_model("llama")
    model, params = bench.make_loramix(model, num_experts=4, r=4)
    before = [p.detach().clone() for p in params]
    figures = bench.measure_variant(
        model,
        params,
        batch_size=2,
        seq_len=8,
        steps=1,
        warmup=0,
        decode_tokens=2,
        prompt_len=2,
        device=torch.device("cpu"),
        vocab_size=128,
    )
    assert figures["train_step_s"] > 0 and figures["decode_new_tokens"] == 2
    assert any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


def test_official_variant_is_skipped_with_a_reason_when_unsupported():
    res = bench.run_benchmark(tiny_model("gpt2"), routers=("topk",), **SMALL)
    assert "official_mixlora" in res["skipped"] and "official_mixlora" not in res["variants"]
    assert "| official_mixlora | skipped" in bench.format_table(res)


def test_profile_reports_mixlora_parts():
    out = bench.profile_training_step(tiny_model("llama"), batch_size=2, seq_len=8, steps=1, device="cpu")
    assert "mixlora.ffn_total" in out["modules"] and "mixlora.router" in out["modules"]
    assert out["modules"]["bench.backward"] > 0 and "Name" in out["table"]


def test_run_bench_script_writes_json(tmp_path):
    root = Path(__file__).resolve().parents[1]
    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)  # load_base_model loads a tokenizer too
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run_bench",
            "--model",
            str(model_dir),
            "--batch-size",
            "1",
            "--seq-len",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--decode-tokens",
            "2",
            "--routers",
            "topk",
            "--no-official",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["variants"]) == {"base", "peft_lora", "mixlora_topk"}
    assert "| peft_lora |" in proc.stdout


def test_sequential_mode_gives_the_same_keys():
    threads = torch.get_num_threads()
    res = bench.run_benchmark(
        tiny_model("llama"), routers=("topk",), include_official=False, interleave=False, threads=1, **SMALL
    )
    assert set(res["variants"]) == {"base", "peft_lora", "mixlora_topk"}
    assert res["config"]["interleaved"] is False
    assert all(set(f) >= FIGURES for f in res["variants"].values())
    assert res["machine"]["torch_threads"] == 1
    assert torch.get_num_threads() == threads  # restored


def test_library_never_imports_the_bench():
    """Importing every loramix module (the packaged harness included) loads nothing from the checkout's bench/."""
    code = (
        "import importlib, pkgutil, sys, loramix\n"
        "for m in pkgutil.walk_packages(loramix.__path__, 'loramix.'):\n"
        "    try:\n"
        "        importlib.import_module(m.name)\n"
        "    except ModuleNotFoundError as e:  # the vLLM plugin's model needs vLLM (its own environment)\n"
        "        if e.name.split('.')[0] != 'vllm':\n"
        "            raise\n"
        "print(sorted(n for n in sys.modules if n == 'bench' or n.startswith('bench.')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_cli_bench_runs_the_packaged_harness():
    """`loramix bench` runs the harness shipped in the package, and the checkout's `bench.harness` is that module."""
    from loramix.benchmark import harness
    from loramix.cli.commands import bench_harness

    assert bench_harness() is harness
    assert bench is harness


def test_cli_bench_harness_ignores_a_bench_folder_in_the_working_directory(tmp_path):
    """`loramix bench` run from a folder that holds some other `bench` package still loads the packaged harness."""
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")
    code = "from loramix.cli.commands import bench_harness; print(bench_harness().__file__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip().splitlines()[-1]) == Path(bench.__file__).resolve()
