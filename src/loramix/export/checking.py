"""The export's self-check: the loramix model's logits as exported, and how far an approximation moves them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..injection import get_state
from .target import ExportError, ExportPlan

DEFAULT_CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1969, two astronauts walked on the Moon while a third "
    "orbited above them. Question: What is 12 plus 30? Answer: 42. Water boils at 100 degrees Celsius at sea "
    "level, and photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen. def add(a, b):\n"
    "    return a + b\nThe committee will meet again on Tuesday to review the budget and the schedule."
)


def check_batch(tokenizer: Any, vocab_size: int, check_text: str | None = None, tokens: int = 128,
                row: int = 64) -> torch.Tensor:
    """(rows, len) token ids: the tokenised check text, or fixed pseudo-random ids without a tokenizer."""
    if check_text is not None and os.path.isfile(check_text):
        check_text = Path(check_text).read_text(encoding="utf-8")
    if tokenizer is not None:
        text = check_text or DEFAULT_CHECK_TEXT
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [i for i in ids if i < vocab_size][:tokens]
        if len(ids) < 2:
            raise ExportError("the check text gives fewer than 2 tokens; pass a longer check_text")
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab_size, (tokens,), generator=g).tolist()
    row = min(row, len(ids))
    rows = max(1, len(ids) // row)
    return torch.tensor(ids[: rows * row]).view(rows, row)


def nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                   ids[:, 1:].reshape(-1)))


def _expert_sets(model: nn.Module) -> list[torch.Tensor]:
    """Per MoE layer, the (T, K) sorted expert ids of the last forward (-1 for unused or dropped slots)."""
    sets = []
    for layer in get_state(model).moe_layers.values():
        r = layer.last_routing
        sets.append(torch.where(r.mask, r.indices, -1).sort(dim=-1).values)
    return sets


@contextlib.contextmanager
def as_exported(model: nn.Module, plan: ExportPlan) -> Iterator[nn.Module]:
    """Temporarily make the loramix model compute what the export computes: no switch capacity limit and,
    when the plan drops it, no balance bias (:meth:`loramix.routers.Router.serving_rule`). Restored on exit."""
    with contextlib.ExitStack() as stack:
        for layer in get_state(model).moe_layers.values():
            stack.enter_context(layer.router.serving_rule(plan.drop_balance_bias))
        yield model


@torch.no_grad()
def reference_run(model: nn.Module, plan: ExportPlan, ids: torch.Tensor) -> dict[str, Any]:
    """Logits of the loramix model as exported, and (with approximations) how far that is from loramix."""
    model.eval()
    out: dict[str, Any] = {}
    if plan.approximations:
        original = model(input_ids=ids).logits.float()
        original_sets = _expert_sets(model)
        dropped = [
            float((~layer.last_routing.mask.any(dim=-1)).float().mean())
            for layer in get_state(model).moe_layers.values()
        ]
        out.update(original=original, original_sets=original_sets, dropped=sum(dropped) / len(dropped))
    with as_exported(model, plan):
        out["reference"] = model(input_ids=ids).logits.float()
        out["reference_sets"] = _expert_sets(model)
    return out


def measure(ref: dict[str, Any], exported_logits: torch.Tensor, ids: torch.Tensor, plan: ExportPlan) -> dict:
    """The approximations' effect on the check tokens (empty for an exact export)."""
    if not plan.approximations:
        return {}
    pairs = [(a != b).any(dim=-1) for a, b in zip(ref["original_sets"], ref["reference_sets"], strict=True)]
    differs = torch.stack(pairs)  # (layers, T)
    measured = {
        "token_layer_expert_sets_differing": float(differs.float().mean()),
        "tokens_with_any_layer_differing": float(differs.any(dim=0).float().mean()),
        "loss_loramix": nll(ref["original"], ids),
        "loss_exported": nll(exported_logits, ids),
        "max_abs_logit_diff_vs_loramix": float((exported_logits - ref["original"]).abs().max()),
    }
    measured["loss_change"] = measured["loss_exported"] - measured["loss_loramix"]
    if any("switch" in a for a in plan.approximations):
        measured["tokens_dropped_by_capacity"] = ref["dropped"]
    return measured
