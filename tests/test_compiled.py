"""Compiled decoding (loramix.compile_decoding): same outputs and tokens as eager, eager fallback on failure."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from helpers.tiny_models import tiny_model
from loramix import MixLoraConfig, compile_decoding, inject
from loramix.compiled import moe_layers

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def _adapted(router: str, arch: str = "llama") -> torch.nn.Module:
    model = inject(tiny_model(arch), MixLoraConfig(num_experts=4, top_k=2, r=4, router=router, dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 would make every expert the base FFN: nothing to compare
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _generate(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                              min_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)


@needs_compiler
@pytest.mark.parametrize("router", ["topk", "switch"])
def test_compiled_decoding_matches_eager(router: str) -> None:
    model = _adapted(router)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    eager_tokens = _generate(model, prompt)
    step = torch.randint(0, model.config.vocab_size, (2, 1))
    with torch.no_grad():
        eager_logits = model(input_ids=step).logits
    assert compile_decoding(model) == len(moe_layers(model)) > 0
    with torch.no_grad():
        compiled_logits = model(input_ids=step).logits  # 2 tokens x 2 slots: the compiled pairwise path
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(_generate(model, prompt), eager_tokens)
    assert all(layer._compiled is not None for layer in moe_layers(model))  # nothing fell back to eager
    assert moe_layers(model)[0].last_routing.indices.shape == (2, 2 if router == "topk" else 1)


def test_failing_compile_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    model = _adapted("topk")
    step = torch.randint(0, model.config.vocab_size, (1, 1))
    with torch.no_grad():
        eager = model(input_ids=step).logits

    def broken(*args, **kwargs):
        raise RuntimeError("no backend here")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    compile_decoding(model)
    with caplog.at_level(logging.WARNING, logger="loramix.moe_layer"), torch.no_grad():
        out = model(input_ids=step).logits
    torch.testing.assert_close(out, eager)
    assert "compiled decoding failed" in caplog.text
    assert all(layer._compiled is None for layer in moe_layers(model))


def test_training_and_long_inputs_never_use_the_compiled_path() -> None:
    model = _adapted("topk")
    calls = []
    compile_decoding(model)
    for layer in moe_layers(model):
        layer._compiled = lambda self, x, mask, calls=calls: calls.append(x.shape[0]) or self.route_pairwise(x, mask)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))  # 12 tokens x 2 slots > 16 pairs
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids[:, :2], labels=ids[:, :2])
    assert calls == []
    model.eval()
    with torch.no_grad():
        model(input_ids=ids[:, :2])
    assert calls == [2] * len(moe_layers(model))


def test_uncompile_and_errors() -> None:
    model = _adapted("topk")
    compile_decoding(model)
    compile_decoding(model, enable=False)
    assert all(layer._compiled is None for layer in moe_layers(model))
    with pytest.raises(ValueError, match="no MixLoRA layers"):
        compile_decoding(tiny_model("llama"))


@needs_compiler
def test_compiled_decoding_under_bf16_autocast_matches_eager() -> None:
    """The compiled decoding path under CPU bf16 autocast gives the eager path's logits, to bf16 precision, and
    does not fall back to eager."""
    model = _adapted("topk")
    step = torch.randint(0, model.config.vocab_size, (2, 1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager_logits = model(input_ids=step).logits.float()
    compile_decoding(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        compiled_logits = model(input_ids=step).logits.float()
    limit = 16 * torch.finfo(torch.bfloat16).eps * eager_logits.abs().max()
    assert (compiled_logits - eager_logits).abs().max() <= limit
    assert all(layer._compiled is not None for layer in moe_layers(model))
