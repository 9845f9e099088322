"""Scores of a continual task, one per kind of data, all routed through the learner's experts.

* ``acc`` / ``acc_norm``: multiple-choice accuracy (:func:`routed_multiple_choice`);
* ``loss``: mean cross-entropy per response token (natural log; ``exp(loss)`` is the perplexity) of the
  task's test responses, the tokens training optimises (response + EOS). **Lower is better**;
* ``pass@1``: greedy completion of each test prompt, the first code block (or the whole completion) run with
  the row's tests in a separate Python process (:func:`run_tests`); the share of prompts whose tests pass.

``SCORE_HIGHER_IS_BETTER`` says which way each score points; the continual metrics use it (see
``loramix.continual.metrics.summarize``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..evaluation import _pad_id, encode_pair, scoring_limit
from ..generation import generation_config, render_chat
from ..models import model_device
from .experts import ExpertBank
from .stream import Example, Task, mc_items, response_pair

SCORES = ("acc", "acc_norm", "loss", "pass@1")
SCORE_HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "loss": False, "pass@1": True}
METRIC_CHOICES = ("auto", "acc", "acc_norm", "loss")
_CODE_BLOCK = re.compile(r"```(?:[Pp]ython3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def task_score(kind: str, metric: str = "auto") -> str:
    """The score of a task of ``kind`` (mc, tests, text) under the run's ``metric`` option.

    ``auto``: accuracy for multiple choice, pass@1 with tests, response loss otherwise; ``acc`` /
    ``acc_norm``: that accuracy for multiple-choice tasks (other tasks keep their automatic score);
    ``loss``: the response loss for every task."""
    if metric not in METRIC_CHOICES:
        raise ValueError(f"metric must be one of {METRIC_CHOICES}, got {metric!r}")
    if metric == "loss":
        return "loss"
    if kind == "mc":
        return "acc" if metric == "auto" else metric
    return "pass@1" if kind == "tests" else "loss"


@dataclass
class TaskEval:
    """A task's test set prepared for scoring (token ids and prompts computed once)."""

    name: str
    score: str
    items: list[dict[str, Any]] = field(default_factory=list)  # mc items (score_multiple_choice's layout)
    pairs: list[tuple[list[int], list[int]]] = field(default_factory=list)  # (context, response + EOS) ids
    prompts: list[list[int]] = field(default_factory=list)  # generation prompts (pass@1)
    tests: list[tuple[list[str], str]] = field(default_factory=list)  # (asserts, setup) per prompt
    texts: list[str] = field(default_factory=list)  # what the router embeds, one per test example


def prepare_eval(tokenizer: Any, task: Task, score: str, *, chat_template: bool = True) -> TaskEval:
    """Tokenize a task's test examples for ``score``."""
    ev = TaskEval(task.name, score, texts=[ex.prompt for ex in task.test])
    if score in ("acc", "acc_norm"):
        if task.kind != "mc":
            raise ValueError(f"task {task.name!r}: {score} needs multiple-choice data, its rows are {task.kind} rows")
        ev.items = mc_items(tokenizer, task.test, chat_template=chat_template)
    elif score == "loss":
        ev.pairs = [_loss_pair(tokenizer, ex, chat_template) for ex in task.test]
    elif score == "pass@1":
        for ex in task.test:
            text, add_special = render_chat(tokenizer, ex.messages or [{"role": "user", "content": ex.prompt}],
                                            chat_template=chat_template)
            ev.prompts.append(tokenizer(text, add_special_tokens=add_special)["input_ids"])
            ev.tests.append((list(ex.tests or []), ex.setup))
    else:
        raise ValueError(f"unknown score {score!r}; one of {SCORES}")
    return ev


def _loss_pair(tokenizer: Any, ex: Example, chat_template: bool) -> tuple[list[int], list[int]]:
    if ex.kind == "mc":  # the gold answer after the scoring context
        item = mc_items(tokenizer, [ex], chat_template=chat_template)[0]
        return encode_pair(tokenizer, item["context"], " " + ex.choices[ex.gold],
                           add_special_tokens=item["add_special_tokens"])
    return response_pair(tokenizer, ex, chat_template=chat_template)


# --------------------------------------------------------------------------------------------------
# routed log-likelihoods and multiple choice
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def routed_loglikelihoods(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[list[int], list[int]]],
    weights: torch.Tensor | None,
    bank: ExpertBank | None,
    *,
    batch_size: int = 8,
) -> list[float]:
    """Summed log-probability of each ``(context_ids, continuation_ids)`` request, request ``i`` routed
    with ``weights[i]`` (``weights=None``: the model as it is); batched like
    ``loramix.evaluation.loglikelihoods``: longest first, right padded, left-truncated to the model's
    context size.

    Requests whose model input is the same -- ``(context + continuation)[:-1]`` after truncation, with
    continuations of the same length and the same routing -- share one forward: the logits that score a
    continuation never see its last token, so the choices of a multiple-choice item that differ only in
    their last token (``answer1`` / ``answer2``, ``true`` / ``false``) cost one forward instead of one each.
    """
    if weights is not None and bank is None:
        raise ValueError("routing weights need the ExpertBank they route")
    limit = scoring_limit(model)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    keys: dict[tuple, int] = {}
    uniq: list[tuple[list[int], int, int]] = []  # (input row, continuation length, a request with it)
    owner: list[int] = []  # request -> its unique input
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {i}: the continuation is empty after tokenization")
        row = (list(ctx) + list(cont))[-(limit + 1) :][:-1]
        route = tuple(weights[i].tolist()) if weights is not None else None
        key = (tuple(row), len(cont), route)
        if key not in keys:
            keys[key] = len(uniq)
            uniq.append((row, len(cont), i))
        owner.append(keys[key])
    members: list[list[int]] = [[] for _ in uniq]
    for i, u in enumerate(owner):
        members[u].append(i)
    order = sorted(range(len(uniq)), key=lambda u: -(len(uniq[u][0]) + 1))
    out = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            rows = [uniq[u][0] for u in idx]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                input_ids[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = 1
            route = (bank.route(weights[[uniq[u][2] for u in idx]]) if weights is not None and bank is not None
                     else contextlib.nullcontext())
            with route:
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            for j, u in enumerate(idx):
                r, n = rows[j], uniq[u][1]
                logp = torch.log_softmax(logits[j, len(r) - n : len(r)].float(), dim=-1)  # (n, V)
                for i in members[u]:
                    cont = torch.tensor(list(requests[i][1]), device=logp.device)
                    out[i] = float(logp.gather(1, cont[:, None]).sum())
    finally:
        model.train(was_training)
    return out


def routed_multiple_choice(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    weights: torch.Tensor | None,
    bank: ExpertBank | None,
    *,
    batch_size: int = 8,
) -> dict[str, Any]:
    """``loramix.evaluation.score_multiple_choice`` with item ``k`` routed by ``weights[k]`` (``None``: the
    model as it is): the same requests (``encode_pair``, `` `` + choice) and the same ``acc`` /
    ``acc_norm`` definitions; choices that share the model input share its forward."""
    requests, owner = [], []
    for k, item in enumerate(items):
        for c, choice in enumerate(item["choices"]):
            requests.append(encode_pair(tokenizer, item["context"], " " + choice,
                                        add_special_tokens=item.get("add_special_tokens", False)))
            owner.append((k, c))
    per_request = weights[[k for k, _ in owner]] if weights is not None else None
    scores = routed_loglikelihoods(model, tokenizer, requests, per_request, bank, batch_size=batch_size)
    per_item: list[list[float]] = [[0.0] * len(it["choices"]) for it in items]
    for (k, c), ll in zip(owner, scores, strict=True):
        per_item[k][c] = ll
    correct = correct_norm = 0
    for item, lls in zip(items, per_item, strict=True):
        norm = [ll / max(len(ch), 1) for ll, ch in zip(lls, item["choices"], strict=True)]
        correct += max(range(len(lls)), key=lambda c: lls[c]) == item["gold"]
        correct_norm += max(range(len(norm)), key=lambda c: norm[c]) == item["gold"]
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n, "loglikelihoods": per_item}


# --------------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------------
def routed_response_loss(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[list[int], list[int]]],
    weights: torch.Tensor | None,
    bank: ExpertBank | None,
    *,
    batch_size: int = 8,
) -> float:
    """Mean negative log-likelihood per target token over all ``(context, target)`` pairs, pair ``i`` routed
    with ``weights[i]`` (``None``: the model as it is). Long pairs lose the start of their context."""
    limit = scoring_limit(model)
    pairs = [(ctx, tgt[:limit]) for ctx, tgt in pairs]
    lls = routed_loglikelihoods(model, tokenizer, pairs, weights, bank, batch_size=batch_size)
    tokens = sum(len(t) for _, t in pairs)
    return -sum(lls) / max(tokens, 1)


# --------------------------------------------------------------------------------------------------
# pass@1
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def routed_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    weights: torch.Tensor | None,
    bank: ExpertBank | None,
    *,
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions (new text only) of tokenized prompts, prompt ``i`` routed with ``weights[i]``;
    batched with left padding, longest prompts first."""
    device = model_device(model)
    pad = _pad_id(tokenizer)
    cfg = generation_config(model, tokenizer, max_new_tokens=max_new_tokens, temperature=0.0)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outs = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)  # (B, L), left padded
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                p = list(prompts[i])
                input_ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            route = (bank.route(weights[idx]) if weights is not None and bank is not None
                     else contextlib.nullcontext())
            with route:
                gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     generation_config=cfg)
            for j, i in enumerate(idx):
                outs[i] = tokenizer.decode(gen[j, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outs


def extract_code(completion: str) -> str:
    """The code of a completion: its first fenced code block (an unclosed one runs to the end), else the
    whole completion."""
    m = _CODE_BLOCK.search(completion)
    return m.group(1) if m else completion


def _limits(timeout: float, memory_bytes: int) -> None:  # runs in the child before exec
    import resource

    cpu = max(int(timeout) + 1, 1)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_tests(code: str, tests: Sequence[str], setup: str = "", *, timeout: float = 5.0,
              memory_bytes: int = 1 << 30) -> bool:
    """True when ``code``, then ``setup``, then every test statement run without error in a fresh Python
    process (``python -I``: no site directories, no environment variables read) within ``timeout``
    seconds (wall clock, and as a CPU-time limit), in an empty temporary working directory, with an empty
    environment, ``memory_bytes`` of address space and 1 MiB file writes. The process group is killed on
    timeout. This limits accidents; it is not a security sandbox (the code runs as the current user and
    could reach the network or the user's files), so score only code from models you trust to run."""
    program = "\n".join([code, "", setup, "", *tests, ""])
    with tempfile.TemporaryDirectory(prefix="loramix-pass1-") as tmp:
        path = Path(tmp) / "candidate.py"
        path.write_text(program, encoding="utf-8")
        preexec = (lambda: _limits(timeout, memory_bytes)) if os.name == "posix" else None
        proc = subprocess.Popen([sys.executable, "-I", str(path)], cwd=tmp, env={}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=preexec)  # noqa: PLW1509 - resource limits must be set in the child
        try:
            return proc.wait(timeout=timeout) == 0
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False


def pass_at_1(completions: Sequence[str], tests: Sequence[tuple[list[str], str]], *, timeout: float = 5.0) -> float:
    """Share of completions whose extracted code passes its ``(asserts, setup)``."""
    if len(completions) != len(tests):
        raise ValueError(f"{len(completions)} completions for {len(tests)} test lists")
    passed = sum(run_tests(extract_code(c), t, s, timeout=timeout)
                 for c, (t, s) in zip(completions, tests, strict=True))
    return passed / max(len(completions), 1)


# --------------------------------------------------------------------------------------------------
# one entry point
# --------------------------------------------------------------------------------------------------
def score_task(
    model: Any,
    tokenizer: Any,
    ev: TaskEval,
    *,
    bank: ExpertBank | None = None,
    weights: torch.Tensor | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    timeout: float = 5.0,
) -> float:
    """``ev.score`` of the model on one task; routed by ``weights`` ``(N, E)`` (one row per test example);
    without weights (or bank) the model as it is -- the base model when ``bank`` is given."""
    if weights is None or bank is None:
        guard = bank.disabled() if bank is not None else contextlib.nullcontext()
        weights, bank_arg = None, None
    else:
        guard, bank_arg = contextlib.nullcontext(), bank
    with guard:
        if ev.score in ("acc", "acc_norm"):
            if not ev.items:
                raise ValueError(f"task {ev.name!r}: no items to score")
            res = routed_multiple_choice(model, tokenizer, ev.items, weights, bank_arg, batch_size=batch_size)
            return float(res[ev.score])
        if ev.score == "loss":
            return routed_response_loss(model, tokenizer, ev.pairs, weights, bank_arg, batch_size=batch_size)
        completions = routed_generate(model, tokenizer, ev.prompts, weights, bank_arg,
                                      max_new_tokens=max_new_tokens, batch_size=batch_size)
        return pass_at_1(completions, ev.tests, timeout=timeout)
