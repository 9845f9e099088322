"""4-bit (NF4) and 8-bit (LLM.int8()) bases through bitsandbytes, on this CPU.

A tiny Llama written to disk is loaded with ``quantize``: its frozen projections (attention and the FFN ones the
experts adapt) really are bitsandbytes layers with integer weights while every adapter weight is float32; a few
steps lower the loss; the saved adapter reloads onto a fresh quantized base with the same logits and onto the
unquantized base; gradients through 4-bit layers equal those of a dense model holding the dequantized weights,
also after an evaluation pass; merging refuses clearly; ``loramix.train.train(quantize="4bit")`` runs end to end.
Without bitsandbytes (or where it cannot run) these tests are skipped; the error a user then gets is tested here
without it.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from torch import nn

import loramix
from helpers.tiny_lm import save_tiny_lm
from loramix.models import check_bitsandbytes, load_base_model


def _bitsandbytes_problem() -> str | None:
    try:
        check_bitsandbytes("4bit", "cpu")
    except (ImportError, ValueError) as err:
        return str(err)
    return None


_PROBLEM = _bitsandbytes_problem()
needs_bnb = pytest.mark.skipif(_PROBLEM is not None, reason=f"bitsandbytes cannot quantize on CPU here: {_PROBLEM}")
# 64 wide: bitsandbytes quantizes 4-bit weights in blocks of 64 values along the input dimension
SHAPE = dict(hidden_size=64, intermediate_size=128)
INT_DTYPES = {"4bit": torch.uint8, "8bit": torch.int8}
CLASSES = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}
ROWS = [{"Context": f"question {i}: how do I cope with stress at work?",
         "Response": f"answer {i}: breathe, rest and talk to someone you trust."} for i in range(48)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("quant") / "model", **SHAPE)


def config(**kw) -> loramix.MixLoraConfig:
    opts = dict(num_experts=4, top_k=2, r=4, attn_r=4, dropout=0.0, attn_dropout=0.0)
    opts.update(kw)
    return loramix.MixLoraConfig(**opts)


def batch(seed: int = 0, n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 250, (n, length), generator=torch.Generator().manual_seed(seed))


def load(model_dir, quantize, dtype="float32"):
    model, _ = load_base_model(model_dir, quantize=quantize, dtype=dtype, device="cpu")
    return model


def perturb(model: nn.Module, seed: int = 3) -> None:
    """Non-zero LoRA B (zero at init, which would leave A's gradients zero), the same for equal names."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def is_bnb(module: nn.Module, quantize: str) -> bool:
    return type(module).__module__.startswith("bitsandbytes.") and type(module).__name__ == CLASSES[quantize]


# --- without bitsandbytes ---------------------------------------------------------------------------
def test_missing_bitsandbytes_is_a_clear_error(model_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    for q in ("4bit", "8bit"):
        with pytest.raises(ImportError, match=r"bitsandbytes package, which is not installed.*loramix\[quant\]"):
            load_base_model(model_dir, quantize=q, device="cpu")


def test_bitsandbytes_that_does_not_import_is_a_clear_error(model_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ImportError, match="bitsandbytes is installed but does not import on this platform"):
        load_base_model(model_dir, quantize="4bit", device="cpu")


@needs_bnb
def test_device_without_a_bitsandbytes_backend_is_a_clear_error(model_dir):
    with pytest.raises(ValueError, match=r"no backend for device='meta' \(it supports .*'cpu'"):
        load_base_model(model_dir, quantize="4bit", device="meta")


# --- what gets quantized ----------------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_frozen_projections_are_quantized_and_adapters_float32(model_dir, quantize):
    model = loramix.inject(load(model_dir, quantize), config())
    layers = model.model.layers
    for layer in layers:
        mlp = layer.mlp
        assert isinstance(mlp, loramix.moe_layer.MixLoraFFN)
        for role in ("gate", "up", "down"):
            proj = mlp.proj(role)
            assert is_bnb(proj, quantize), f"{role}: {type(proj)}"
            assert proj.weight.dtype == INT_DTYPES[quantize]
            lora = mlp.mixlora_experts[role]  # shapes from in/out_features, not from the packed weight
            assert lora.lora_A.shape == (4, 4, proj.in_features) and lora.lora_B.shape == (4, proj.out_features, 4)
        assert (mlp.proj("up").in_features, mlp.proj("up").out_features) == (64, 128)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            wrapper = getattr(layer.self_attn, name)
            assert type(wrapper).__module__.startswith("peft.tuners.lora.bnb")
            assert is_bnb(wrapper.get_base_layer(), quantize)
    quantized = {n for n, m in model.named_modules() if is_bnb(m, quantize)}
    assert len(quantized) == 7 * len(layers)  # every decoder linear, nothing else
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "norm" in n)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert any("mixlora_router" in n for n in trainable) and any("lora_A.default" in n for n in trainable)


# --- training, saving, loading ----------------------------------------------------------------------
@needs_bnb
@pytest.mark.parametrize(("quantize", "dtype"), [("4bit", "float32"), ("4bit", "bfloat16"), ("8bit", "float32")])
def test_train_save_load_on_a_quantized_base(model_dir, tmp_path, quantize, dtype):
    """A few steps lower the loss; the adapter reloads onto a fresh quantized base with the same logits."""
    torch.manual_seed(0)
    model = loramix.inject(load(model_dir, quantize, dtype), config()).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = batch()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] - 0.05, losses
    loramix.save_adapter(model, tmp_path / "adapter")
    probe = batch(seed=9, n=2)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=probe).logits
    reloaded = loramix.load_adapter(load(model_dir, quantize, dtype), tmp_path / "adapter").eval()
    assert is_bnb(reloaded.model.layers[0].mlp.proj("gate"), quantize)
    with torch.no_grad():
        again = reloaded(input_ids=probe).logits
    torch.testing.assert_close(again, trained, rtol=0, atol=1e-6)
    base = load(model_dir, quantize, dtype).eval()
    with torch.no_grad():
        assert (base(input_ids=probe).logits - trained).abs().max() > 1e-3  # the adapter does change the model


@needs_bnb
def test_gradients_through_4bit_layers_match_the_dequantized_dense_model(model_dir):
    """The quantized model's outputs and adapter gradients equal those of a float32 model whose frozen
    linears hold the dequantized 4-bit weights, also after an eval pass (as the Trainer's first evaluation):
    on CPUs with AVX512-BF16 bitsandbytes would otherwise switch a 4-bit layer to an inference-only layout."""
    from bitsandbytes.functional import dequantize_4bit

    quant = load(model_dir, "4bit")
    dense = load(model_dir, None)
    with torch.no_grad():
        for name, module in quant.named_modules():
            if is_bnb(module, "4bit"):
                w = module.weight
                dense.get_submodule(name).weight.copy_(dequantize_4bit(w.data, w.quant_state).float())
    models = []
    for m in (quant, dense):
        m = loramix.inject(m, config())
        perturb(m)
        m.eval()
        with torch.no_grad():
            m(input_ids=batch(seed=5))  # evaluation before training
        models.append(m.train())
    ids = batch()
    results = []
    for m in models:
        out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (q_logits, q_grads), (d_logits, d_grads) = results
    torch.testing.assert_close(q_logits, d_logits, rtol=1e-4, atol=1e-4)
    assert q_grads.keys() == d_grads.keys()
    for name in q_grads:
        scale = float(d_grads[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(q_grads[name], d_grads[name], rtol=0, atol=1e-3 * scale, msg=name)


@needs_bnb
def test_adapter_from_a_4bit_base_loads_onto_the_unquantized_base_and_merges_there(model_dir, tmp_path):
    model = loramix.inject(load(model_dir, "4bit"), config(num_experts=1, router="dense"))
    perturb(model)
    loramix.save_adapter(model, tmp_path / "adapter")
    dense = loramix.load_adapter(load(model_dir, None), tmp_path / "adapter").eval()
    probe = batch(seed=2, n=2)
    with torch.no_grad():
        adapted = dense(input_ids=probe).logits
        quantized = model.eval()(input_ids=probe).logits
    assert (adapted - quantized).abs().max() < 0.5  # the same adapter, up to the 4-bit rounding of the base
    merged = loramix.merge_and_unload(dense)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, adapted, rtol=1e-4, atol=1e-4)


@needs_bnb
@pytest.mark.parametrize("quantize", ["4bit", "8bit"])
def test_merge_on_a_quantized_base_refuses_and_unload_restores_it(model_dir, tmp_path, quantize):
    from loramix.export import export_adapted

    base = load(model_dir, quantize).eval()
    probe = batch(seed=4, n=2)
    with torch.no_grad():
        before = base(input_ids=probe).logits
    model = loramix.inject(base, config(num_experts=1, router="dense"))
    perturb(model)
    with torch.no_grad():
        adapted = model(input_ids=probe).logits
    for merge in (loramix.merge_and_unload, loramix.merge_attention, lambda m: export_adapted(m, tmp_path / "x"),
                  lambda m: export_adapted(m, tmp_path / "y", format="vllm")):
        with pytest.raises(ValueError, match=f"is a bitsandbytes {CLASSES[quantize]} layer.*without quantize"):
            merge(model)
    with torch.no_grad():  # nothing was changed by the refused merges
        torch.testing.assert_close(model(input_ids=probe).logits, adapted, rtol=0, atol=0)
    plain = loramix.unload(model)
    assert is_bnb(plain.model.layers[0].mlp.gate_proj, quantize)
    assert is_bnb(plain.model.layers[0].self_attn.q_proj, quantize)
    assert not getattr(plain, "_hf_peft_config_loaded", False)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=probe).logits, before, rtol=0, atol=1e-6)


# --- the training recipe ----------------------------------------------------------------------------
@needs_bnb
def test_train_recipe_with_quantize_4bit(model_dir, tmp_path):
    """`loramix train --quantize 4bit` (HF Trainer, evaluation before and after) trains and saves an adapter
    that loads back onto the 4-bit base."""
    from loramix.train import train

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    out = tmp_path / "run"
    s = train(model=model_dir, data=str(data), output_dir=str(out), quantize="4bit", max_steps=8, eval_steps=4,
              num_experts=4, top_k=2, r=4, attn_r=4, learning_rate=5e-3, batch_size=4, val_size=8, plots=False,
              seed=1)
    assert s["steps"] == 8 and s["diverged"] is None
    assert s["final_val_loss"] < s["base_val_loss"]
    model = loramix.load_adapter(load(model_dir, "4bit"), out / "adapter")
    assert is_bnb(model.model.layers[1].mlp.proj("down"), "4bit")
