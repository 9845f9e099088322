"""lm-evaluation-harness tasks on a loramix adapter: any harness task, local task YAMLs included.

:func:`lm_eval_model` loads a base model with an adapter (a loramix adapter, an official ``mixlora`` adapter or
a PEFT LoRA adapter: whatever ``loramix eval --adapter`` reads) and wraps it in lm-eval's ``HFLM``, which takes
an instantiated model. The result is an lm-eval ``LM`` for ``lm_eval.simple_evaluate``; :func:`run_harness`
runs it on a list of tasks, with ``include_path`` for task YAMLs of your own. Needs the ``lmeval`` extra
(``pip install 'loramix[lmeval]'``).

The routers see the model input exactly as the harness builds it: lm-eval pads its batches on the right and
scores the real tokens only, so padding changes no score (except with the ``switch`` router, whose capacity
counts every token of a batch: use ``batch_size=1`` there for scores that do not depend on the batch).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

LMEVAL_EXTRA = "lmeval"


def require_lm_eval() -> None:
    """Raise an ImportError naming the ``lmeval`` extra when lm-evaluation-harness is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError(
            "harness tasks need lm-evaluation-harness: install the lmeval extra with "
            f"`pip install 'loramix[{LMEVAL_EXTRA}]'` (or `pip install lm-eval`)"
        )


def lm_eval_model(
    adapter: str | os.PathLike[str] | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 8,
    max_length: int | None = None,
    strict_base: bool = False,
    **hflm_options: Any,
) -> Any:
    """An lm-eval ``LM`` (``HFLM``) scoring a base model with ``adapter``.

    Args:
        adapter: a loramix, official mixlora or PEFT LoRA adapter directory; None = the base model alone.
        model: the base model: anything ``loramix.models.load_base_model`` reads (hub id, directory, ``.gguf``;
            None = the default model), or a model already loaded (then ``tokenizer`` is required and
            ``adapter`` must be None: load the adapter onto it first with ``loramix.load_adapter``).
        tokenizer: the tokenizer of an already loaded ``model``.
        device: where a loaded-here model goes (default: CUDA when available).
        dtype: dtype of a loaded-here model's weights (``auto``, ``float32``, ``bfloat16``...).
        batch_size: requests per forward (lm-eval's ``batch_size``).
        max_length: the longest input in tokens (default: lm-eval reads it from the model's config).
        strict_base: refuse an adapter trained on a base with other weights (default: a warning).
        hflm_options: further ``HFLM`` keyword arguments (``add_bos_token``, ``truncation``...).
    """
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if model is None or isinstance(model, str | os.PathLike):
        from .generation import load_for_inference

        model, tokenizer = load_for_inference(model, adapter, device=device, dtype=dtype, strict_base=strict_base)
    else:
        if adapter is not None:
            raise ValueError("adapter: give it with a model spec, or load it onto the model object first "
                             "(loramix.load_adapter)")
        if tokenizer is None:
            raise ValueError("tokenizer: required with an already loaded model")
    model.eval()
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                backend="causal", **hflm_options)


def harness_task_manager(tasks: Sequence[str], include_path: str | os.PathLike[str] | None = None) -> Any:
    """lm-eval's ``TaskManager`` (its built-in tasks plus those under ``include_path``), after checking that
    every name in ``tasks`` is one of them: call it before loading a model to fail early on a typo."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        raise ValueError(f"harness_tasks: expected a list of task names, got the string {tasks!r}")
    if not tasks:
        raise ValueError("harness_tasks: name at least one lm-eval task")
    if include_path is not None and not os.path.exists(include_path):
        raise FileNotFoundError(f"harness_include: {include_path} does not exist")
    if include_path is not None:  # only your own tasks: no need to index lm-eval's thousands (about 10 s)
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in manager.all_tasks for t in tasks):
            return manager
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path is not None else " (a task of your own: --harness-include)"
        raise ValueError(f"harness_tasks: {unknown} are not lm-eval tasks{where}")
    return manager


def run_harness(
    lm: Any,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike[str] | None = None,
    task_manager: Any = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on ``lm`` (from :func:`lm_eval_model`); returns ``lm_eval.simple_evaluate``'s result.

    ``include_path``: a directory (or YAML file) of task definitions of your own, beside lm-eval's built-in
    tasks (or ``task_manager`` from :func:`harness_task_manager`). ``limit``: at most this many documents per
    task (a float below 1: that share). ``options`` go to ``simple_evaluate`` as they are (``random_seed``,
    ``gen_kwargs``...).
    """
    import lm_eval

    manager = task_manager or harness_task_manager(tasks, include_path)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                   num_fewshot=num_fewshot, apply_chat_template=apply_chat_template,
                                   log_samples=log_samples, **options)


def harness_scores(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from a ``simple_evaluate`` result (lm-eval's ``"acc,none"`` keys read as
    ``acc``; standard errors, aliases and lm-eval's ``sample_len`` left out)."""
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in result["results"].items():
        row = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if name in ("alias", "sample_len") or name.endswith("_stderr") or not isinstance(value, int | float):
                continue
            row[name if filt in ("", "none") else f"{name},{filt}"] = float(value)
        scores[task] = row
    return scores


def harness_table(result: dict[str, Any]) -> str:
    """A markdown table of every task's metrics (with ``n``, the documents scored)."""
    counts = result.get("n-samples", {})
    lines = ["| harness task | metric | n | value |", "|---|---|---|---|"]
    for task, metrics in harness_scores(result).items():
        n = counts.get(task, {}).get("effective", "")
        lines += [f"| {task} | {metric} | {n} | {value:.4f} |" for metric, value in metrics.items()]
    return "\n".join(lines)
