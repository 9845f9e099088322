"""Expert shares of a trained adapter on its run's validation split (eval mode), one row per MoE layer.

    python -m bench.probes.val_expert_shares runs/counsel_chat_bias [--adapter runs/counsel_chat_bias/checkpoint-50]

Reads ``resolved_config.yaml`` of the run to rebuild exactly the validation rows it held out and pads them as
training does. ``loramix train`` reports the same figure for the final adapter as ``val_expert_share`` in
``summary.json``; this probe also serves intermediate checkpoints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from loramix.data import DataCollator, DataConfig, build_datasets
from loramix.generation import load_for_inference
from loramix.injection import get_state
from loramix.train import expert_shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--adapter", type=Path, default=None, help="default: <run_dir>/adapter")
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    resolved = yaml.safe_load((args.run_dir / "resolved_config.yaml").read_text())
    model, tok = load_for_inference(resolved["train"].get("model"), args.adapter or args.run_dir / "adapter",
                                    dtype="float32", device="cpu")
    _, val, _ = build_datasets(DataConfig(**resolved["data"]), tok)
    if val is None:
        raise SystemExit(f"{args.run_dir}: the run had no validation split")
    collate = DataCollator(tok)  # the collator loramix.train uses
    counts = None
    with torch.no_grad():
        for start in range(0, len(val), args.batch_size):
            batch = collate([val[i] for i in range(start, min(start + args.batch_size, len(val)))])
            out = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")})
            c = out["routing_stats"]["tokens_per_expert"].cpu()  # (L, E)
            counts = c if counts is None else counts + c
    widths = [layer.num_experts for layer in get_state(model).moe_layers.values()]
    shares, smallest = expert_shares(counts, widths)
    print(json.dumps({"val_expert_share_min": smallest, "val_expert_share": shares}))


if __name__ == "__main__":
    main()
