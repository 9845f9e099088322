"""Where each task's test prompts route with a finished ``loramix continual`` run's skill prototypes, and
(``--score``) each task's final score routed as the run routes it vs with every prompt forced to the
task's majority expert.

Embeds the test prompts of every task the way the run did (same tasks, sizes, seed, embedder and template,
read from ``summary.json``)::

    LORAMIX_DATA_DIR=/path/to/data python -m bench.probes.continual_routing_check runs/continual_demo2 --score
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from loramix.continual.learner import load_continual
from loramix.continual.novelty import build_embedder
from loramix.continual.run import routed_multiple_choice
from loramix.continual.stream import load_tasks, mc_items
from loramix.models import load_base_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default="runs/continual_demo2")
    p.add_argument("--score", action="store_true", help="also score every task, routed and forced")
    args = p.parse_args()
    run = Path(args.run)
    cfg = json.loads((run / "summary.json").read_text())["config"]
    torch.set_num_threads(1)
    model, tokenizer = load_base_model(cfg["model"], dtype=cfg["dtype"])
    data_dir = cfg.get("data_dir") or os.environ.get("LORAMIX_DATA_DIR")
    tasks = load_tasks(cfg["tasks"], data_dir, train_per_task=cfg["train_per_task"],
                       test_per_task=cfg["test_per_task"], seed=cfg["seed"])
    items = [mc_items(tokenizer, t.test, chat_template=cfg["chat_template"]) for t in tasks]
    embedder = build_embedder(cfg["embedder"], model, tokenizer, layer=cfg["embed_layer"],
                              batch_size=cfg["eval_batch_size"], max_length=cfg["max_length"])
    embeddings = [embedder([it["prompt"] for it in task_items]) for task_items in items]  # frozen base
    bank, library, router = load_continual(model, run / "continual_model")
    for task, task_items, emb in zip(tasks, items, embeddings, strict=True):
        routed = router.weights(library.similarities(emb))  # (N, E) as the run routes at the end
        counts = torch.bincount(routed.argmax(dim=1), minlength=bank.num_experts)  # (E,)
        line = f"{task.name}: test prompts per expert {counts.tolist()}"
        if args.score:
            forced = torch.zeros_like(routed)
            forced[:, int(counts.argmax())] = 1.0  # every prompt to the task's majority expert
            scores = [routed_multiple_choice(model, tokenizer, task_items, w, bank, batch_size=cfg["eval_batch_size"])
                      for w in (routed, forced)]
            scores = [s[cfg["metric"]] for s in scores]
            line += f"; {cfg['metric']} routed {scores[0]:.2f}, all to expert {int(counts.argmax())} {scores[1]:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
