"""One task, one continual expert: train it with a learning budget and score its task's test items.

The learner is the one ``loramix continual`` runs (novelty detection, validation hold-out, and with
``--restore-best`` the best-validation restore), on a stream of a single task; ``--single`` trains one LoRA of
the same form on the first ``train - 4`` examples instead, with no hold-out (the sequential baseline's loop).
Prints one JSON line: the score, the validation losses (one per ``eval_every`` mini-batches), and the
mini-batch after which the kept weights were measured (null: the untrained expert; "last": the last weights).

    LORAMIX_DATA_DIR=/data python -m bench.probes.continual_budget --task sst2 --steps-per-batch 4 --restore-best
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from loramix.continual import ContinualConfig, ContinualLearner, ExpertBank, HybridRouter, NoveltyDetector
from loramix.continual.run import _train_single
from loramix.continual.scoring import prepare_eval, score_task, task_score
from loramix.continual.stream import build_stream, load_tasks
from loramix.embedding import HiddenStateEmbedder
from loramix.models import load_base_model


def main() -> None:
    d = ContinualConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2", help="a built-in task or a data file, as in --tasks")
    p.add_argument("--data-dir", default=os.environ.get("LORAMIX_DATA_DIR"))
    p.add_argument("--train", type=int, default=48, help="training examples (the stream)")
    p.add_argument("--test", type=int, default=30, help="test items")
    p.add_argument("--data-seed", type=int, default=42, help="seed of the train/test subsets")
    p.add_argument("--seed", type=int, default=0, help="seed of the expert initialisation and dropout")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--steps-per-batch", type=int, default=d.steps_per_batch)
    p.add_argument("--val-size", type=int, default=d.val_size)
    p.add_argument("--restore-best", action="store_true", default=d.restore_best,
                   help="keep the weights of the best validation loss, not the last ones (restore_best)")
    p.add_argument("--single", action="store_true", help="one LoRA on the first train - 4 examples, no hold-out")
    a = p.parse_args()

    started = time.perf_counter()
    tasks = load_tasks(a.task, a.data_dir, train_per_task=a.train, test_per_task=a.test, seed=a.data_seed)
    model, tok = load_base_model(None)
    model.eval()
    stream = build_stream(tok, tasks, max_length=d.max_length)
    ev = prepare_eval(tok, tasks[0], task_score(tasks[0].kind, "auto"))
    torch.manual_seed(a.seed)
    bank = ExpertBank(model, r=d.r, alpha=d.alpha, dropout=d.dropout)
    embed = HiddenStateEmbedder(model, tok, disable=bank.disabled)
    info: dict = {}
    if a.single:
        cfg = ContinualConfig(learning_rate=a.learning_rate, batch_size=a.batch_size, steps_per_batch=a.steps_per_batch)
        bank.add_expert()
        opt = torch.optim.AdamW(bank.trainable_parameters(), lr=a.learning_rate)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        _train_single(model, bank, opt, stream.examples[: a.train - 4], cfg, pad)
        weights = torch.ones(len(ev.texts), 1)
    else:
        for ex, e in zip(stream.examples, embed([ex.prompt for ex in stream.examples]), strict=True):
            ex.embedding = e
        learner = ContinualLearner(
            model, tok, bank, embed, NoveltyDetector("auto", d.window), HybridRouter(min_examples=d.min_examples),
            learning_rate=a.learning_rate, batch_size=a.batch_size, steps_per_batch=a.steps_per_batch,
            val_size=a.val_size, train_lag=d.train_lag, auto_temperature=True, restore_best=a.restore_best)
        learner.observe(stream.examples)
        learner.finish()
        weights = learner.routing_weights(embed(ev.texts))
        info = {"val_losses": [round(e["loss"], 3) for e in learner.events if e["event"] == "val_loss"],
                "kept_after_batch": next((e["from_step"] for e in learner.events if e["event"] == "restored"), "last"),
                "batches": learner.step}
    score = score_task(model, tok, ev, bank=bank, weights=weights, batch_size=8)
    print(json.dumps({**vars(a), "score": ev.score, "value": score, **info,
                      "seconds": round(time.perf_counter() - started)}))


if __name__ == "__main__":
    main()
