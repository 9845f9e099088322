"""A training step of an injected model under ``torch.compile(fullgraph=True)`` (inductor on CPU): one graph, no
break, and the same loss and gradients as eager; ``loramix train --compile`` trains. Slow: compiling takes minutes
on a 2-core CPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import loramix
from helpers.tiny_lm import save_tiny_lm
from helpers.tiny_models import perturb_adapters, random_batch, tiny_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs cc"),
]


def _step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


@pytest.mark.parametrize("router", ["topk", "switch"])
def test_training_step_compiles_whole_and_equals_eager(router: str) -> None:
    torch._dynamo.reset()
    model = tiny_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4).train()
    config = loramix.MixLoraConfig(num_experts=4, top_k=2, r=4, attn_r=4, router=router, dropout=0.0,
                                   attn_dropout=0.0, balance_bias_rate=0.0)  # a moving bias would reroute step 2
    model = loramix.inject(model, config)
    perturb_adapters(model, scale=0.1)
    ids, mask = random_batch(2, 16, pad_left=3)
    eager_loss, eager_grads = _step(model, ids, mask)
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    loss, grads = _step(compiled, ids, mask)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(eager_grads) and any("mixlora_experts" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_train_with_compile_flag(tmp_path) -> None:
    from loramix.train import train

    torch._dynamo.reset()
    model_dir = save_tiny_lm(tmp_path / "model")
    rows = [{"Context": f"question {i}: how do I rest?", "Response": f"answer {i}: sleep early."} for i in range(16)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    summary = train(model=model_dir, data=str(data), output_dir=str(tmp_path / "run"), max_steps=4, eval_steps=4,
                    num_experts=4, top_k=2, r=4, attn_r=4, batch_size=4, val_size=4, plots=False, compile=True)
    assert summary["steps"] == 4 and summary["final_val_loss"] is not None
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
