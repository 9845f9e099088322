"""Where each task's test prompts route with a finished ``loramix continual`` run's skill prototypes.

Embeds the test prompts of every task the way the run did (same tasks, sizes, seed, embedder and template,
read from ``summary.json``) and prints, per task, how many go to each skill's expert by nearest prototype::

    LORAMIX_DATA_DIR=../shared/data python scripts/continual_routing_check.py runs/continual_demo2
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from loramix.continual.learner import load_continual
from loramix.continual.novelty import build_embedder
from loramix.continual.stream import load_tasks, mc_items
from loramix.models import load_base_model


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/continual_demo2")
    cfg = json.loads((run / "summary.json").read_text())["config"]
    torch.set_num_threads(1)
    model, tokenizer = load_base_model(cfg["model"], dtype=cfg["dtype"])
    data_dir = cfg.get("data_dir") or os.environ.get("LORAMIX_DATA_DIR")
    names = cfg["tasks"].split(",") if isinstance(cfg["tasks"], str) else cfg["tasks"]
    tasks = load_tasks(names, data_dir, train_per_task=cfg["train_per_task"],
                       test_per_task=cfg["test_per_task"], seed=cfg["seed"])
    embedder = build_embedder(cfg["embedder"], model, tokenizer, layer=cfg["embed_layer"],
                              batch_size=cfg["eval_batch_size"], max_length=cfg["max_length"])
    embeddings = [embedder([it["prompt"] for it in mc_items(tokenizer, t.test, chat_template=cfg["chat_template"])])
                  for t in tasks]  # before the experts are attached: the run embeds with the frozen base
    bank, library, _ = load_continual(model, run / "continual_model")
    for task, emb in zip(tasks, embeddings, strict=True):
        sims = library.similarities(emb)  # (N, skills)
        counts = torch.bincount(sims.argmax(dim=1), minlength=bank.num_experts).tolist()
        print(f"{task.name}: test prompts per expert {counts}")


if __name__ == "__main__":
    main()
