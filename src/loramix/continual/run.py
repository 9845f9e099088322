"""`loramix continual`: run the continual learner on a task stream, with baselines, and report.

Steps: (1) load the base model and the tasks; (2) embed every prompt once with the frozen base (the
embedder never sees experts, so this equals embedding on arrival); (3) score the base model on every
task (``b_i``); (4) feed the stream to the :class:`ContinualLearner` task after task -- it gets no
task labels -- and after each task score all tasks: row ``j`` of ``R``; (5) the same with one
sequentially fine-tuned LoRA, and a multi-task LoRA trained on everything (upper bound); (6) write
the decision log, metrics, accuracy matrices (JSON + PNG) and a summary.

Task labels are used only here, for scoring and for the detection metrics.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import ContinualConfig, resolve_config
from .experts import ExpertBank
from .learner import ContinualLearner, batch_tensors, target_loss, write_jsonl
from .metrics import boundary_detection, plot_accuracy_matrix, save_json, summarize, summarize_by_score
from .novelty import NoveltyDetector, build_embedder
from .routing import HybridRouter
from .scoring import (
    SCORE_HIGHER_IS_BETTER,
    TaskEval,
    prepare_eval,
    routed_multiple_choice,
    score_task,
    task_score,
)
from .scoring import (
    routed_loglikelihoods as routed_loglikelihoods,  # importable from here as before
)
from .stream import EncodedExample, Stream, Task, build_stream, load_tasks

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------
def score_routed(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    *,
    bank: ExpertBank | None = None,
    weights: torch.Tensor | None = None,
    metric: str = "acc",
    batch_size: int = 8,
) -> float:
    """Multiple-choice score of ``items`` with per-item routing ``weights`` ``(N, E)``; without weights
    (or bank) the model as it is -- the base model when ``bank`` is given."""
    if not items:
        raise ValueError("no items to score")
    if weights is None or bank is None:
        with bank.disabled() if bank is not None else contextlib.nullcontext():
            return float(routed_multiple_choice(model, tokenizer, items, None, None, batch_size=batch_size)[metric])
    return float(routed_multiple_choice(model, tokenizer, items, weights, bank, batch_size=batch_size)[metric])


# --------------------------------------------------------------------------------------------------
# baselines: one LoRA (the same expert form, always weight 1)
# --------------------------------------------------------------------------------------------------
def _bank(model: Any, cfg: ContinualConfig) -> ExpertBank:
    return ExpertBank(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.expert_targets)


def _train_single(model: Any, bank: ExpertBank, optimizer: torch.optim.Optimizer, examples: Sequence[EncodedExample],
                  cfg: ContinualConfig, pad_id: int) -> list[float]:
    device = next(model.parameters()).device
    params = bank.trainable_parameters()
    losses = []
    model.train()
    with bank.route(torch.ones(1)):
        for start in range(0, len(examples), cfg.batch_size):
            batch = batch_tensors(examples[start : start + cfg.batch_size], pad_id, device)
            for _ in range(cfg.steps_per_batch):
                loss = target_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                losses.append(float(loss.detach()))
    model.eval()
    return losses


def run_baselines(model: Any, tokenizer: Any, stream: Stream, evals: list[TaskEval],
                  cfg: ContinualConfig, pad_id: int, lap: Any = None, record: Any = None,
                  aux_record: Any = None) -> dict[str, Any]:
    """Sequential fine-tuning of one LoRA (rows after each task) and multi-task LoRA (one final row);
    ``lap(name)``, when given, is called after each phase (timings), ``record(key, scores)`` after each
    evaluation (key ``sequential`` or ``multitask``), ``aux_record(key, bank)`` after each sequential
    evaluation (extra scores of the same model)."""
    lap = lap or (lambda name: None)
    record = record or (lambda key, scores: None)
    T = len(evals)
    per_task: list[list[EncodedExample]] = [[] for _ in range(T)]
    for ex in stream.examples:
        per_task[ex.task].append(ex)

    def score_all(bank: ExpertBank) -> list[float]:
        with bank.route(torch.ones(1)):
            return [score_task(model, tokenizer, ev, batch_size=cfg.eval_batch_size,
                               max_new_tokens=cfg.max_new_tokens, timeout=cfg.code_timeout) for ev in evals]

    out: dict[str, Any] = {}
    torch.manual_seed(cfg.seed)  # the same expert initialisation as the continual learner's first expert
    bank = _bank(model, cfg)
    bank.add_expert()
    opt = torch.optim.AdamW(bank.trainable_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    R, losses = [], []
    for t in range(T):
        losses += _train_single(model, bank, opt, per_task[t], cfg, pad_id)
        lap(f"sequential_train_{t}")
        R.append(score_all(bank))
        record("sequential", R[-1])
        if aux_record is not None:
            aux_record("sequential", bank)
        logger.info("sequential after task %d: %s", t, R[-1])
        lap(f"sequential_eval_{t}")
    bank.detach()
    out["sequential"] = {"R": R, "steps": len(losses), "final_loss": losses[-1] if losses else None}

    torch.manual_seed(cfg.seed)
    bank = _bank(model, cfg)
    bank.add_expert()
    opt = torch.optim.AdamW(bank.trainable_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    mixed = list(stream.examples)
    random.Random(cfg.seed).shuffle(mixed)
    losses = _train_single(model, bank, opt, mixed, cfg, pad_id)
    lap("multitask_train")
    scores = score_all(bank)
    record("multitask", scores)
    logger.info("multitask: %s", scores)
    lap("multitask_eval")
    bank.detach()
    out["multitask"] = {"scores": scores, "acc": sum(scores) / T, "steps": len(losses),
                        "final_loss": losses[-1] if losses else None}
    return out


# --------------------------------------------------------------------------------------------------
# diagnostics
# --------------------------------------------------------------------------------------------------
def similarity_report(embeddings: torch.Tensor, labels: Sequence[int], threshold: float | str) -> dict[str, Any]:
    """How separable the tasks are for this embedder (uses the true labels: diagnostics only).

    For every example: cosine similarity to its own task's mean embedding and the best other task's.
    Reports means/quantiles and, for a fixed threshold, the share of examples it would call known
    (own >= threshold) and novel w.r.t. the other tasks (other < threshold).
    """
    fixed = threshold != "auto"
    emb = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    lab = torch.tensor(list(labels))
    tasks = sorted(set(lab.tolist()))
    protos = torch.nn.functional.normalize(torch.stack([emb[lab == t].mean(0) for t in tasks]), dim=-1)
    sims = emb @ protos.t()  # (N, T)
    col = torch.tensor([tasks.index(t) for t in lab.tolist()])
    own = sims[torch.arange(len(lab)), col]
    other = sims.scatter(1, col[:, None], float("-inf")).max(dim=1).values if len(tasks) > 1 else None

    def q(x: torch.Tensor, p: float) -> float:
        return float(torch.quantile(x, p))

    rep: dict[str, Any] = {"threshold": threshold, "own_mean": float(own.mean()), "own_p05": q(own, 0.05),
                           "own_min": float(own.min())}
    if fixed:
        rep["own_above_threshold"] = float((own >= float(threshold)).float().mean())
    if other is not None:
        rep.update(other_mean=float(other.mean()), other_p95=q(other, 0.95), other_max=float(other.max()))
        if fixed:
            rep["other_below_threshold"] = float((other < float(threshold)).float().mean())
    return rep


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------
def run_continual(config: str | Path | ContinualConfig | None = None, **options: Any) -> dict[str, Any]:
    """Continual learning on a task stream: novelty detection, growing experts, maturity routing.

    ``config`` is an optional YAML/JSON options file (or a ContinualConfig); keyword ``options`` (the
    ContinualConfig fields) override it. Writes to ``output_dir``: ``decisions.jsonl``,
    ``events.jsonl``, ``accuracy_matrix.json``, ``accuracy_matrix.png`` (and ``_sequential.png``),
    ``summary.json`` and ``continual_model/``; ``progress.json`` is rewritten after every evaluation (the
    rows measured so far, ``complete`` false until the end), so a run that is stopped keeps its scores.
    Returns the summary.
    """
    from ..models import load_base_model

    cfg = resolve_config(config, **options)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    clock = [started]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 1)
        clock[0] = now
        logger.info("%s done in %.1f s", name, timings[name])
    torch.manual_seed(cfg.seed)

    # 1. tasks (checked before the model loads), their scores, and the model
    tasks: list[Task] = load_tasks(cfg.tasks, cfg.data_dir, train_per_task=cfg.train_per_task,
                                   test_per_task=cfg.test_per_task, seed=cfg.seed, test_data=cfg.test_data,
                                   min_train=2 * cfg.window)
    names = [t.name for t in tasks]
    scores = [task_score(t.kind, cfg.metric) for t in tasks]
    higher = {k: SCORE_HIGHER_IS_BETTER[k] for k in scores}
    logger.info("tasks %s scored by %s", names, scores)
    model, tokenizer = load_base_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    model.eval()
    stream = build_stream(tokenizer, tasks, chat_template=cfg.chat_template, max_length=cfg.max_length)
    evals = [prepare_eval(tokenizer, t, sc, chat_template=cfg.chat_template)
             for t, sc in zip(tasks, scores, strict=True)]
    # pass@1 of a small model is often 0 everywhere: those tasks also get the response loss (aux matrix)
    aux = {i: prepare_eval(tokenizer, t, "loss", chat_template=cfg.chat_template)
           for i, (t, sc) in enumerate(zip(tasks, scores, strict=True)) if sc == "pass@1"}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    lap("load")

    # 2. embeddings of every prompt (frozen base, no experts attached yet)
    embedder = build_embedder(cfg.embedder, model, tokenizer, layer=cfg.embed_layer,
                              batch_size=cfg.eval_batch_size, max_length=cfg.max_length)
    train_emb = embedder([ex.prompt for ex in stream.examples])
    for ex, e in zip(stream.examples, train_emb, strict=True):
        ex.embedding = e
    test_emb = [embedder(ev.texts) for ev in evals]
    sim_report = similarity_report(train_emb, [ex.task for ex in stream.examples], cfg.threshold)
    lap("embed")

    # 3. base scores
    def score_all(bank: ExpertBank | None = None, weights: list[torch.Tensor | None] | None = None,
                  which: dict[int, TaskEval] | None = None) -> list[float]:
        chosen = which if which is not None else dict(enumerate(evals))
        return [score_task(model, tokenizer, ev, bank=bank, weights=weights[i] if weights else None,
                           batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                           timeout=cfg.code_timeout) for i, ev in chosen.items()]

    base = score_all()
    aux_rows: dict[str, Any] = {"tasks": [names[i] for i in aux], "base": score_all(which=aux) if aux else [],
                                "continual": [], "sequential": []}
    progress: dict[str, Any] = {"tasks": names, "metric": cfg.metric, "scores": scores, "base": base,
                                "continual": [], "sequential": [], "multitask": None, "complete": False}

    def record(key: str, row: list[float]) -> None:
        if key == "multitask":
            progress[key] = row
        else:
            progress[key].append(row)
        save_json(progress, out / "progress.json")

    save_json(progress, out / "progress.json")
    logger.info("base scores: %s", base)
    lap("base_eval")

    # 4. the continual learner, task after task
    torch.manual_seed(cfg.seed)
    bank = ExpertBank(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.expert_targets)
    embedder_c = build_embedder(cfg.embedder, model, tokenizer, layer=cfg.embed_layer,
                                batch_size=cfg.eval_batch_size, max_length=cfg.max_length, disable=bank.disabled)
    learner = ContinualLearner(
        model, tokenizer, bank, embedder_c,
        NoveltyDetector(cfg.threshold, cfg.window, shift=cfg.shift),
        HybridRouter(cfg.routing, temperature=0.05 if cfg.temperature == "auto" else float(cfg.temperature),
                     top_k=cfg.top_k, min_examples=cfg.min_examples, patience=cfg.patience, min_delta=cfg.min_delta),
        guard=cfg.guard, l2_coef=cfg.l2_coef, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, batch_size=cfg.batch_size, steps_per_batch=cfg.steps_per_batch,
        val_size=cfg.val_size, val_every=cfg.val_every, eval_every=cfg.eval_every, train_lag=cfg.train_lag,
        quarantine=cfg.quarantine, auto_temperature=cfg.temperature == "auto", restore_best=cfg.restore_best,
    )
    R: list[list[float]] = []
    stages: list[dict[str, Any]] = []
    bounds = [*stream.boundaries, len(stream.examples)]
    for t in range(len(tasks)):
        learner.observe(stream.examples[bounds[t] : bounds[t + 1]])
        learner.flush()
        lap(f"continual_train_{t}")
        weights = [learner.routing_weights(emb) for emb in test_emb]
        with learner.best_weights():  # the weights the experts keep if the stream ends here
            row = score_all(bank, weights)
            if aux:
                aux_rows["continual"].append(score_all(bank, weights, which=aux))
        R.append(row)
        record("continual", row)
        stages.append({"after_task": names[t], "experts": bank.num_experts, "mode": learner.mode,
                       "temperature": learner.router.temperature, "steps": learner.step, "scores": row})
        logger.info("continual after %s: experts=%d mode=%s scores=%s", names[t], bank.num_experts, learner.mode, row)
        lap(f"continual_eval_{t}")
    learner.finish()
    if cfg.save_model:
        learner.save(out / "continual_model")

    # decisions and detection quality (labels used here only)
    task_of = {ex.index: ex.task for ex in stream.examples}
    write_jsonl([{**d.to_dict(), "true_task": task_of[d.index]} for d in learner.detector.log], out / "decisions.jsonl")
    write_jsonl(learner.events, out / "events.jsonl")
    detection = boundary_detection(learner.detector.created_at, stream.boundaries, cfg.tolerance)
    skill_tasks: dict[int, Counter] = defaultdict(Counter)
    for d in learner.detector.log:
        if d.decision == "new_skill":
            for j in d.members:
                skill_tasks[d.skill][names[task_of[j]]] += 1
            if d.index not in d.members and d.matched_skill is not None:  # auto: it stayed with its old skill
                skill_tasks[d.matched_skill][names[task_of[d.index]]] += 1
        elif d.decision in ("known", "outlier"):
            skill_tasks[d.skill][names[task_of[d.index]]] += 1
    pending = len(learner.detector.pending)
    bank.detach()

    # 5. baselines
    aux_record = None
    if aux:
        def aux_record(key: str, bank: ExpertBank) -> None:
            if key == "sequential":
                with bank.route(torch.ones(1)):
                    aux_rows["sequential"].append(score_all(which=aux))
    baselines = (run_baselines(model, tokenizer, stream, evals, cfg, pad, lap=lap, record=record,
                               aux_record=aux_record) if cfg.baselines else {})

    # 6. report
    def metrics_of(rows: list[list[float]]) -> dict[str, Any]:
        by = summarize_by_score(rows, base, scores, higher)
        if len(higher) == 1:
            return {**summarize(rows, base, higher_is_better=higher[scores[0]]), "by_score": by}
        return {"acc": None, "bwt": None, "fwt": None, "forgetting": None, "by_score": by}

    score_label = scores[0] if len(higher) == 1 else "mixed: " + ", ".join(
        f"{n} {sc}" for n, sc in zip(names, scores, strict=True))
    continual = {"R": R, **metrics_of(R), "stages": stages}
    matrix = {"tasks": names, "metric": cfg.metric, "scores": scores, "higher_is_better": higher, "base": base,
              "continual": continual}
    if baselines:
        matrix["sequential"] = {"R": baselines["sequential"]["R"], **metrics_of(baselines["sequential"]["R"])}
        matrix["multitask"] = baselines["multitask"]
    if aux:
        aux_rows["note"] = "response loss (lower is better) of the pass@1 tasks; columns = aux tasks"
        matrix["aux_loss"] = aux_rows
    save_json(matrix, out / "accuracy_matrix.json")
    if cfg.plots:
        plot_accuracy_matrix(R, names, out / "accuracy_matrix.png", title=f"continual ({score_label})")
        if baselines:
            plot_accuracy_matrix(baselines["sequential"]["R"], names, out / "accuracy_matrix_sequential.png",
                                 title=f"sequential LoRA ({score_label})")
    summary = {
        "output_dir": str(out),
        "tasks": names,
        "stream_length": len(stream.examples),
        "boundaries": stream.boundaries,
        "experts": len(learner.library),
        "expert_created_at": learner.detector.created_at,
        "skill_tasks": {str(k): dict(v) for k, v in sorted(skill_tasks.items())},
        "pending_at_end": pending,
        "detection": detection,
        "similarity": sim_report,
        "final_mode": learner.mode,
        "maturity": [t.state() for t in learner.router.trackers],
        "counts": learner.counts,
        "steps": learner.step,
        "base": base,
        "scores": scores,
        "score": score_label,
        "continual": {k: continual[k] for k in ("acc", "bwt", "fwt", "forgetting", "by_score")},
        "sequential": ({k: matrix["sequential"][k] for k in ("acc", "bwt", "fwt", "forgetting", "by_score")}
                       if baselines else None),
        "multitask_acc": baselines["multitask"]["acc"] if baselines else None,
        "multitask_scores": baselines["multitask"]["scores"] if baselines else None,
        "seconds": round(time.perf_counter() - started, 1),
        "timings": timings,
        "split_from_test": [t.name for t in tasks if t.split_from_test],
        "held_out_test": [t.name for t in tasks if t.held_out],
        "train_examples": [len(t.train) for t in tasks],
        "test_examples": [len(t.test) for t in tasks],
        "config": cfg.to_dict(),
    }
    save_json(summary, out / "summary.json")
    progress["complete"] = True
    save_json(progress, out / "progress.json")
    return summary


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------
def format_report(summary: dict[str, Any], matrix: dict[str, Any] | None = None) -> str:
    """A short human-readable report of a run (the CLI prints it): detection, then ACC / BWT / FWT /
    forgetting per score (a stream of one score has one table row per method)."""
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:+.3f}" if isinstance(v, float) and v < 0 else (
            f"{v:.3f}" if isinstance(v, float) else str(v))

    det = summary["detection"]
    scores = summary.get("scores") or ["acc"] * len(summary["tasks"])
    lines = [
        f"tasks: {' -> '.join(summary['tasks'])} ({summary['stream_length']} stream examples)",
        f"score: {summary.get('score', scores[0])}"
        + ("" if all(s != "loss" for s in scores) else " (loss: mean per response token, lower is better; BWT, "
           "FWT and forgetting are signed so that negative BWT is forgetting)"),
        f"experts created: {summary['experts']} at {summary['expert_created_at']} (boundaries {summary['boundaries']});"
        f" detection precision {f(det['precision'])} recall {f(det['recall'])}",
        f"skill -> true task counts: {summary['skill_tasks']}",
        f"final routing mode: {summary['final_mode']}",
        "",
        "| method | score | ACC | BWT | FWT | forgetting |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("continual", "sequential"):
        m = summary.get(name)
        if not m:
            continue
        groups = m.get("by_score") or {scores[0]: m}
        for score, g in groups.items():
            lines.append(f"| {name} | {score} | {f(g['acc'])} | {f(g['bwt'])} | {f(g['fwt'])} | {f(g['forgetting'])} |")
    base = summary["base"]
    if summary.get("multitask_scores") is not None:
        final = summary["multitask_scores"]
        for score in dict.fromkeys(scores):
            cols = [i for i, s in enumerate(scores) if s == score]
            lines.append(f"| multitask | {score} | {f(sum(final[i] for i in cols) / len(cols))} | - | - | - |")
    elif summary.get("multitask_acc") is not None:
        lines.append(f"| multitask | {scores[0]} | {f(summary['multitask_acc'])} | - | - | - |")
    for score in dict.fromkeys(scores):
        cols = [i for i, s in enumerate(scores) if s == score]
        lines.append(f"| base model | {score} | {f(sum(base[i] for i in cols) / len(cols))} | - | - | - |")
    lines.append(f"\noutputs in {summary['output_dir']} ({summary['seconds']} s)")
    return "\n".join(lines)
