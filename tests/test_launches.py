"""What a step costs on a GPU, counted on the CPU with loramix.profiling.OpCounter: MixLoRA adds no host sync to
a training forward + backward or to a decoding step, for every router and both expert types, on the grouped
path and on its fallback; and a training step dispatches at most twice PEFT LoRA's aten ops."""

from __future__ import annotations

import pytest
import torch

import loramix
import loramix.grouped
from bench.probes.launches import build as _model  # the 4-layer tiny Llama: base, peft_lora or mixlora
from bench.probes.launches import count as _train_step  # one forward + backward (LM + aux loss), counted
from helpers.tiny_models import EXPERT_TYPES, ROUTER_NAMES, random_batch
from loramix.profiling import OpCounter


def _decode_step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> OpCounter:
    """One KV-cache decoding step after a prefill, counted."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        step_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        with OpCounter() as ops:
            model(input_ids=ids[:, -1:], attention_mask=step_mask, past_key_values=out.past_key_values, use_cache=True)
    return ops


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return random_batch(4, 32, pad_left=5)


@pytest.fixture(scope="module")
def base_syncs(batch) -> dict[str, dict[str, int]]:
    """The frozen model's own host syncs (transformers' mask code reads one value), which loramix must not add to."""
    model = _model("base")
    return {"train": _train_step(model, *batch).syncs, "decode": _decode_step(model, *batch).syncs}


@pytest.mark.parametrize("use_grouped", [True, False])
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_no_host_sync_in_training_or_decoding(router, expert_type, use_grouped, batch, base_syncs, monkeypatch):
    monkeypatch.setattr(loramix.grouped, "USE_GROUPED_MM", use_grouped)
    model = _model("mixlora", router, expert_type)
    train = _train_step(model, *batch)
    assert train.syncs == base_syncs["train"], f"training step: {train.syncs} vs the base model's {base_syncs['train']}"
    assert train.counts["_grouped_mm"] > 0 if use_grouped else "_grouped_mm" not in train.counts
    decode = _decode_step(model, *batch)
    assert decode.syncs == base_syncs["decode"], f"decoding step: {decode.syncs} vs {base_syncs['decode']}"


def test_balance_bias_update_has_no_host_sync(batch) -> None:
    """The balance bias moves before the next training forward without reading the counts on the host."""
    model = _model("mixlora")
    _train_step(model, *batch)
    layer = next(iter(loramix.injection.get_state(model).moe_layers.values()))
    before = layer.mixlora_router.balance_bias.clone()
    with OpCounter() as ops:
        loramix.routers.update_balance_biases(list(loramix.injection.get_state(model).moe_layers.values()))
    assert ops.syncs == {}
    assert not torch.equal(layer.mixlora_router.balance_bias, before)  # it did move


def test_training_step_launches_at_most_twice_peft_lora(batch) -> None:
    """aten ops of one forward + backward (4 layers, hidden 64, 8 experts, top-2, r 4, batch 4 x 32) against PEFT
    LoRA r 4 on all seven projections; both counted the same way in this test."""
    peft_ops = _train_step(_model("peft_lora"), *batch).total
    mix_ops = _train_step(_model("mixlora"), *batch).total
    assert mix_ops <= 2 * peft_ops, f"MixLoRA {mix_ops} aten ops vs PEFT LoRA {peft_ops} ({mix_ops / peft_ops:.2f}x)"
