"""Evaluation: perplexity, multiple-choice accuracy and math exact match on local data files.

Data lives under a configurable directory (argument ``data_dir`` or the env var ``LORAMIX_DATA_DIR``):

* ``wikitext2/raw/wiki.test.raw.txt`` -- perplexity with a sliding window (the Hugging Face recipe);
* ``llm_adapters_commonsense/<task>/test.json`` -- LLM-Adapters commonsense sets, scored as multiple choice
  by the summed log-likelihood of each candidate answer after the prompt;
* ``llm_adapters_math/<task>/test.json`` -- LLM-Adapters math sets, greedy generation + answer extraction.

Prompts are rendered exactly as training renders them (``loramix.generation.render_chat``), so an adapter
trained on LLM-Adapters data (``output`` = "the correct answer is answer1") is scored in its own format.
Losses are computed from the logits here, never read from ``output.loss``: a loramix model adds the router
aux loss to ``output.loss``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import check_int
from .generation import generation_config, render_chat
from .models import context_limit, model_device

DATA_ENV = "LORAMIX_DATA_DIR"
PERPLEXITY_TASKS: dict[str, str] = {"wikitext2": "wikitext2/raw/wiki.test.raw.txt"}
COMMONSENSE_TASKS = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa", "piqa", "social_i_qa", "winogrande")
MATH_TASKS = ("gsm8k", "AQuA", "SVAMP", "AddSub", "MultiArith", "SingleEq", "mawps", "mathqa")
ANSWER_PREFIX = "the correct answer is"
"""Start of every LLM-Adapters commonsense ``output``; candidates are scored as its continuation."""


# --------------------------------------------------------------------------------------------------
# data location
# --------------------------------------------------------------------------------------------------
def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$LORAMIX_DATA_DIR``; it must exist."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not value:
        raise FileNotFoundError(f"no data directory: pass data_dir=... or set the environment variable {DATA_ENV}")
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} does not exist")
    return path


def task_kind(task: str) -> str:
    """``perplexity``, ``commonsense`` or ``math``; raises ValueError for unknown task names."""
    if task in PERPLEXITY_TASKS:
        return "perplexity"
    if task in COMMONSENSE_TASKS:
        return "commonsense"
    if task in MATH_TASKS:
        return "math"
    known = [*PERPLEXITY_TASKS, *COMMONSENSE_TASKS, *MATH_TASKS]
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(known)}")


def task_path(task: str, data_dir: str | os.PathLike[str] | None = None, split: str = "test") -> Path:
    """File of ``task`` under the data root (raises FileNotFoundError naming the expected path)."""
    root = resolve_data_dir(data_dir)
    kind = task_kind(task)
    if kind == "perplexity":
        path = root / PERPLEXITY_TASKS[task]
    elif kind == "commonsense":
        path = root / "llm_adapters_commonsense" / task / f"{split}.json"
    else:
        path = root / "llm_adapters_math" / task / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{task}: expected data file {path} is missing")
    return path


def read_text_file(path: str | os.PathLike[str]) -> str:
    """Read a text file with normalized line endings (the WikiText-2 raw copy uses CRLF)."""
    return Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")


def load_records(path: str | os.PathLike[str], limit: int | None = None) -> list[dict[str, Any]]:
    """A JSON list (or JSONL) of records, the first ``limit`` (>= 1) of them; errors name the file and line."""
    check_int("limit", limit, 1, optional=True)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text (byte {e.object[e.start]:#04x})") from None
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    if not records:
        raise ValueError(f"{path}: holds no records")
    return records[:limit] if limit is not None else records


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


SCORING_CONTEXT = 2048
"""Tokens a scored input keeps when the model's config states no context size."""


def scoring_limit(model: Any) -> int:
    """The longest input scoring feeds the model: its context size, or :data:`SCORING_CONTEXT`."""
    return context_limit(model) or SCORING_CONTEXT


# --------------------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(
    model: Any,
    tokenizer: Any,
    text: str | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    max_length: int | None = 1024,
    stride: int | None = None,
    limit: int | None = None,
    add_special_tokens: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of a text (or text file) with a sliding window, the Hugging Face recipe.

    Windows of ``max_length`` tokens start every ``stride`` tokens; in each window only the tokens not
    scored by the previous window count (the overlapping context gets label -100), so with
    ``stride < max_length`` every token after the first window is predicted from at least
    ``max_length - stride`` tokens of context. The first token of the text (and of every window that has
    no overlap, i.e. ``stride == max_length``) has no context and is not scored. NLL is summed from the
    logits and divided by the number of scored tokens (exact, unlike averaging per-window means).

    Args:
        max_length: window length, at most the model's context size; ``None`` = the model's context size.
        stride: tokens between window starts, in [1, window]; ``None`` = half the window (512 for the
            default 1024-token window; a model with a shorter context gets a shorter stride).
        limit: score at most this many windows (>= 1; a quick estimate on a prefix of the text).

    Returns ``{"perplexity", "nll", "num_tokens" (scored), "num_windows", "max_length", "stride"}``.
    """
    if (text is None) == (path is None):
        raise ValueError("pass exactly one of text or path")
    check_int("max_length", max_length, 2, optional=True)
    check_int("stride", stride, 1, optional=True)
    check_int("limit", limit, 1, optional=True)
    if text is None:
        text = read_text_file(path)  # type: ignore[arg-type]
    window = min(max_length or scoring_limit(model), scoring_limit(model))
    if stride is None:
        stride = max(window // 2, 1)
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in [1, window={window}] (the window is max_length, at most the "
                         f"model's context size), got {stride}")
    ids = tokenizer(text, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]
    seq = torch.tensor(ids, dtype=torch.long)
    if seq.numel() < 2:
        raise ValueError("the text has fewer than 2 tokens")
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll_sum, n_scored, n_windows, prev_end = 0.0, 0, 0, 0
    starts = list(range(0, seq.numel(), stride))
    total = len(starts) if limit is None else min(limit, len(starts))
    bar = tqdm(total=total, desc="perplexity", disable=not progress, unit="win")
    try:
        for begin in starts:
            end = min(begin + window, seq.numel())
            trg_len = end - prev_end  # tokens this window scores (the rest is context)
            chunk = seq[begin:end].to(device)[None]
            length = chunk.shape[1]
            first = max(length - trg_len, 1)  # first scored position inside the window
            if first < length:
                logits = model(input_ids=chunk).logits[0, first - 1 : length - 1].float()  # (n, V)
                targets = chunk[0, first:length]
                nll_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
                n_scored += length - first
            n_windows += 1
            prev_end = end
            bar.update(1)
            if end == seq.numel() or n_windows >= total:
                break
    finally:
        bar.close()
        model.train(was_training)
    nll = nll_sum / max(n_scored, 1)
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "num_tokens": n_scored,
        "num_windows": n_windows,
        "max_length": window,
        "stride": stride,
        "text_tokens": int(seq.numel()),
    }


# --------------------------------------------------------------------------------------------------
# multiple choice (LLM-Adapters commonsense)
# --------------------------------------------------------------------------------------------------
_FORMAT_RE = re.compile(r"Answer format:\s*([^\n]+?)\s*$", re.IGNORECASE | re.MULTILINE)
_OPTION_RE = re.compile(r"\b(Answer|Solution|Option|Ending)(\d+):\s*", re.IGNORECASE)


def answer_candidates(instruction: str) -> list[str]:
    """Candidate answers named by the instruction's ``Answer format: a/b/...`` line (last one wins).

    Falls back to ``true``/``false`` for yes/no instructions without a format line.
    """
    found = _FORMAT_RE.findall(instruction)
    if found:
        cands = [c.strip() for c in found[-1].split("/") if c.strip()]
        if len(cands) >= 2:
            return cands
    if re.search(r"\btrue or false\b", instruction, re.IGNORECASE):
        return ["true", "false"]
    raise ValueError(f"cannot find the candidate answers in the instruction: {instruction[-200:]!r}")


def option_texts(instruction: str) -> dict[str, str]:
    """Texts of the numbered options (``Answer1: ...``), keyed by lower-cased label (``answer1``)."""
    body = _FORMAT_RE.split(instruction)[0] if _FORMAT_RE.search(instruction) else instruction
    body = re.sub(r"\s*Answer format:.*$", "", body, flags=re.IGNORECASE | re.DOTALL)
    marks = list(_OPTION_RE.finditer(body))
    out = {}
    for i, m in enumerate(marks):
        stop = marks[i + 1].start() if i + 1 < len(marks) else len(body)
        out[f"{m.group(1).lower()}{m.group(2)}"] = body[m.end() : stop].strip()
    return out


def mc_context(
    tokenizer: Any, record: dict[str, Any], *, chat_template: bool = True, answer_prefix: str = ANSWER_PREFIX
) -> tuple[str, bool]:
    """The scoring context of one record: rendered prompt + ``answer_prefix``; and add_special_tokens."""
    user = record["instruction"]
    if str(record.get("input") or "").strip():
        user = f"{user}\n\n{record['input']}"
    text, add_special = render_chat(tokenizer, [{"role": "user", "content": user}], chat_template=chat_template)
    return text + answer_prefix, add_special


def build_mc_items(
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    *,
    chat_template: bool = True,
    choice_text: bool = False,
    answer_prefix: str = ANSWER_PREFIX,
) -> list[dict[str, Any]]:
    """Turn LLM-Adapters records into ``{"context", "choices", "gold", "add_special_tokens"}`` items.

    ``choice_text=False`` scores the labels the data set trains on (``answer1`` ...); ``True`` scores the
    option texts themselves (when the instruction lists them) -- more informative for an untuned model.
    """
    items = []
    for i, rec in enumerate(records):
        labels = answer_candidates(rec["instruction"])
        gold_label = str(rec["answer"]).strip().lower()
        low = [c.lower() for c in labels]
        if gold_label not in low:
            raise ValueError(f"record {i}: answer {rec['answer']!r} is not among the candidates {labels}")
        choices = labels
        if choice_text:
            texts = option_texts(rec["instruction"])
            if all(c in texts for c in low):
                choices = [texts[c] for c in low]
        context, add_special = mc_context(tokenizer, rec, chat_template=chat_template, answer_prefix=answer_prefix)
        items.append(
            {
                "context": context,
                "choices": choices,
                "gold": low.index(gold_label),
                "add_special_tokens": add_special,
            }
        )
    return items


def encode_pair(
    tokenizer: Any, context: str, continuation: str, *, add_special_tokens: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it (lm-evaluation-harness's split).

    Trailing spaces of the context move into the continuation, the pair is tokenized as one string and the
    continuation is what follows the context's own tokens -- so the ids match tokenizing the whole text.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"]
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def loglikelihoods(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """Summed log-probability of each continuation given its context, and whether it is the greedy one.

    ``requests`` are ``(context_ids, continuation_ids)``. The model input of a request is context +
    continuation without its last token, left-truncated to ``max_length`` (default: the model's context
    size). Requests with identical inputs -- candidates that differ only in their last token, such as
    ``answer1`` / ``answer2`` -- share one forward pass (as in lm-evaluation-harness). Distinct inputs are
    batched longest first and right padded.
    """
    limit = max_length or scoring_limit(model)
    device = model_device(model)
    pad = _pad_id(tokenizer)
    groups: dict[tuple[int, ...], list[int]] = {}  # model input -> indices of the requests that use it
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {i}: the continuation is empty after tokenization")
        full = (list(ctx) + list(cont))[-(limit + 1) :]
        groups.setdefault(tuple(full[:-1]), []).append(i)  # the last token is never an input
    unique = sorted(groups, key=len, reverse=True)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(requests), desc="loglikelihood", disable=not progress, unit="req")
    try:
        for start in range(0, len(unique), batch_size):
            rows = unique[start : start + batch_size]
            width = len(rows[0])
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                input_ids[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            for j, r in enumerate(rows):
                for i in groups[r]:
                    cont = requests[i][1]
                    n = len(cont)
                    logp = F.log_softmax(logits[j, len(r) - n : len(r)].float(), dim=-1)  # (n, V)
                    target = torch.tensor(cont, device=logp.device)
                    score = float(logp.gather(1, target[:, None]).sum())
                    greedy = bool((logp.argmax(-1) == target).all())
                    results[i] = (score, greedy)
                bar.update(len(groups[r]))
    finally:
        bar.close()
        model.train(was_training)
    return results


def score_multiple_choice(
    model: Any,
    tokenizer: Any,
    items: Sequence[dict[str, Any]],
    *,
    batch_size: int = 8,
    target_delimiter: str = " ",
    progress: bool = True,
) -> dict[str, Any]:
    """Pick, for every item, the choice with the highest summed log-likelihood after the context.

    ``acc`` uses the raw sum; ``acc_norm`` divides it by the choice's length in characters (the
    lm-evaluation-harness definitions). Returns the metrics and per-item ``predictions``.
    """
    requests, owner = [], []
    for k, item in enumerate(items):
        for c, choice in enumerate(item["choices"]):
            requests.append(
                encode_pair(
                    tokenizer,
                    item["context"],
                    target_delimiter + choice,
                    add_special_tokens=item.get("add_special_tokens", False),
                )
            )
            owner.append((k, c))
    scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    per_item: list[list[float]] = [[0.0] * len(it["choices"]) for it in items]
    for (k, c), (ll, _) in zip(owner, scores, strict=True):
        per_item[k][c] = ll
    predictions, correct, correct_norm = [], 0, 0
    for item, lls in zip(items, per_item, strict=True):
        pred = max(range(len(lls)), key=lambda c: lls[c])
        norm = [ll / max(len(ch), 1) for ll, ch in zip(lls, item["choices"], strict=True)]
        pred_norm = max(range(len(norm)), key=lambda c: norm[c])
        correct += pred == item["gold"]
        correct_norm += pred_norm == item["gold"]
        predictions.append({"pred": pred, "pred_norm": pred_norm, "gold": item["gold"], "loglikelihoods": lls})
    n = len(items)
    return {
        "acc": correct / n if n else float("nan"),
        "acc_norm": correct_norm / n if n else float("nan"),
        "n": n,
        "predictions": predictions,
    }


def evaluate_commonsense(
    model: Any,
    tokenizer: Any,
    task: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    chat_template: bool = True,
    choice_text: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Multiple-choice accuracy on ``llm_adapters_commonsense/<task>/test.json`` (first ``limit`` items)."""
    records = load_records(task_path(task, data_dir), limit)
    items = build_mc_items(tokenizer, records, chat_template=chat_template, choice_text=choice_text)
    return score_multiple_choice(model, tokenizer, items, batch_size=batch_size, progress=progress)


# --------------------------------------------------------------------------------------------------
# math (LLM-Adapters)
# --------------------------------------------------------------------------------------------------
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")
_LETTER_RE = re.compile(r"\(([A-E])\)|\b([A-E])\b")


def extract_number(text: str) -> float | None:
    """The last number in ``text`` (thousands separators removed), or None."""
    found = _NUMBER_RE.findall(text.replace(",", ""))
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:
        return None


def extract_letter(text: str) -> str | None:
    """The last option letter A-E in ``text`` (``(C)`` or a standalone ``C``), or None."""
    found = _LETTER_RE.findall(text)
    if not found:
        return None
    a, b = found[-1]
    return a or b


def math_correct(prediction: str, answer: str, *, tolerance: float = 1e-3) -> bool:
    """Exact match as LLM-Adapters scores it: an option letter, or a number within ``tolerance``."""
    answer = str(answer).strip()
    if re.fullmatch(r"[A-E]", answer):
        return extract_letter(prediction) == answer
    try:
        gold = float(answer.replace(",", ""))
    except ValueError:
        return prediction.strip() == answer
    pred = extract_number(prediction)
    return pred is not None and abs(pred - gold) <= tolerance


@torch.no_grad()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Greedy completions (new text only) of tokenized prompts, batched with left padding."""
    device = model_device(model)
    pad = _pad_id(tokenizer)
    cfg = generation_config(model, tokenizer, max_new_tokens=max_new_tokens, temperature=0.0)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress, unit="item")
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                p = list(prompts[i])
                input_ids[j, width - len(p) :] = torch.tensor(p)
                mask[j, width - len(p) :] = 1
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=cfg)
            for j, i in enumerate(idx):
                outs[i] = tokenizer.decode(gen[j, width:], skip_special_tokens=True)
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return outs


def evaluate_math(
    model: Any,
    tokenizer: Any,
    task: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    chat_template: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Exact match on ``llm_adapters_math/<task>/test.json``: greedy reply, last number (or letter)."""
    records = load_records(task_path(task, data_dir), limit)
    prompts = []
    for rec in records:
        user = rec["instruction"]
        if str(rec.get("input") or "").strip():
            user = f"{user}\n\n{rec['input']}"
        text, add_special = render_chat(tokenizer, [{"role": "user", "content": user}], chat_template=chat_template)
        prompts.append(tokenizer(text, add_special_tokens=add_special)["input_ids"])
    replies = generate_greedy(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    predictions = []
    correct = 0
    for rec, reply in zip(records, replies, strict=True):
        ok = math_correct(reply, rec["answer"])
        correct += ok
        predictions.append({"answer": str(rec["answer"]), "reply": reply, "correct": ok})
    n = len(records)
    return {"exact_match": correct / n if n else float("nan"), "n": n, "predictions": predictions}


# --------------------------------------------------------------------------------------------------
# driver and reporting
# --------------------------------------------------------------------------------------------------
def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    chat_template: bool = True,
    max_length: int | None = 1024,
    stride: int | None = None,
    max_new_tokens: int = 256,
    keep_predictions: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every task in ``tasks`` and collect ``{"tasks": {task: metrics}, ...}``.

    ``limit`` caps items per task (windows for perplexity); ``max_length`` / ``stride`` are the perplexity
    window and step (see :func:`perplexity`). Per-item predictions are dropped unless ``keep_predictions``
    (they can be large).
    """
    check_eval_options(tasks, limit=limit, batch_size=batch_size, max_length=max_length, stride=stride,
                       max_new_tokens=max_new_tokens)  # fail on a typo or a bad count before any model work
    results: dict[str, Any] = {"tasks": {}, "limit": limit, "data_dir": str(resolve_data_dir(data_dir))}
    for task in tasks:
        start = time.perf_counter()
        kind = task_kind(task)
        if kind == "perplexity":
            res = perplexity(
                model,
                tokenizer,
                path=task_path(task, data_dir),
                max_length=max_length,
                stride=stride,
                limit=limit,
                progress=progress,
            )
        elif kind == "commonsense":
            res = evaluate_commonsense(
                model,
                tokenizer,
                task,
                data_dir=data_dir,
                limit=limit,
                batch_size=batch_size,
                chat_template=chat_template,
                progress=progress,
            )
        else:
            res = evaluate_math(
                model,
                tokenizer,
                task,
                data_dir=data_dir,
                limit=limit,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                chat_template=chat_template,
                progress=progress,
            )
        if not keep_predictions:
            res.pop("predictions", None)
        res["kind"] = kind
        res["seconds"] = round(time.perf_counter() - start, 2)
        results["tasks"][task] = res
    return results


def check_eval_options(
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = 1024,
    stride: int | None = None,
    max_new_tokens: int = 256,
) -> None:
    """Refuse unknown task names and counts that would give wrong figures (``limit=0`` scores nothing,
    a negative limit drops items from the end)."""
    if isinstance(tasks, str):
        raise ValueError(f"tasks: expected a list of task names, got the string {tasks!r}")
    for t in tasks:
        task_kind(t)
    check_int("limit", limit, 1, optional=True)
    check_int("batch_size", batch_size, 1)
    check_int("max_length", max_length, 2, optional=True)
    check_int("stride", stride, 1, optional=True)
    if stride is not None and max_length is not None and stride > max_length:
        raise ValueError(f"stride: must be <= max_length={max_length}, got {stride}")
    check_int("max_new_tokens", max_new_tokens, 1)


def main_metric(task_result: dict[str, Any]) -> tuple[str, float]:
    """The headline metric of one task result: perplexity, acc or exact_match."""
    for key in ("perplexity", "acc", "exact_match"):
        if key in task_result:
            return key, float(task_result[key])
    raise KeyError(f"no known metric in {sorted(task_result)}")


def save_results(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write results as indented JSON (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


def results_table(results: dict[str, Any] | dict[str, dict[str, Any]]) -> str:
    """Markdown table of one ``evaluate`` result, or of ``{run_name: result}`` side by side."""
    runs = {"result": results} if "tasks" in results else dict(results)
    tasks: list[str] = []
    for res in runs.values():
        tasks += [t for t in res["tasks"] if t not in tasks]
    names = list(runs)
    lines = ["| task | metric | n | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for task in tasks:
        metric, n, cells = None, None, []
        for name in names:
            r = runs[name]["tasks"].get(task)
            if r is None:
                cells.append("-")
                continue
            metric, value = main_metric(r)
            n = r.get("n", r.get("num_tokens"))
            cells.append(f"{value:.2f}" if metric == "perplexity" else f"{100 * value:.1f}%")
        lines.append(f"| {task} | {metric} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
