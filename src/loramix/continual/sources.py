"""Tasks from the user's own data: local files (json, jsonl, csv, tsv, parquet) or hub data sets.

Each stream entry is read with the same loader and the same format detection as ``loramix train``
(``loramix.data``: ``prompt_response``, ``instruction``, ``messages``), and every row becomes an
:class:`~loramix.continual.tasks.Example` of one of three kinds, which decides how the task is scored:

* **multiple choice** (scored by accuracy): a row with a list of candidates (``choices``, ``options``,
  ``endings`` or ``candidates``) and the gold one (``answer``, ``label``, ``gold`` or ``target``: an index, a
  letter A-Z or the candidate's text), or an LLM-Adapters-style row whose instruction ends with
  ``Answer format: a/b/...`` and whose answer is one of those;
* **code with tests** (scored by pass@1): a prompt/response row with a ``test_list`` field (a list of
  ``assert`` statements, MBPP's layout; ``test_setup_code`` is run before them). The prompt lists the
  tests, as MBPP's standard prompt does, so the model knows the function's name;
* **free text** (scored by the loss of the response): any other prompt/response, instruction or messages row.

A ``text``-only data set (no prompt/response split) cannot be scored and is refused with the file and the
fields it has.
"""

from __future__ import annotations

import logging
import random
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import (
    DataConfig,
    DataError,
    blank_reply,
    check_not_all_empty,
    load_data_source,
    record_to_messages,
    resolve_format,
)
from ..evaluation import answer_candidates
from .tasks import Example, Task

CHOICE_FIELDS = ("choices", "options", "endings", "candidates")
GOLD_FIELDS = ("answer", "label", "gold", "target", "answerkey")
QUESTION_FIELDS = ("question", "prompt", "query", "instruction", "input", "context", "goal", "sentence", "text")
TEST_FIELD = "test_list"
SETUP_FIELD = "test_setup_code"
TESTS_HEADER = "Your code should pass these tests:"

logger = logging.getLogger(__name__)


class StreamError(ValueError):
    """A stream entry or its data is unusable; the message names the entry (file or hub id) and the option."""


def is_local(source: str) -> bool:
    """True when ``source`` names an existing local file or directory (or one under $LORAMIX_DATA_DIR)."""
    from ..data import resolve_local

    try:
        return resolve_local(source) is not None
    except FileNotFoundError:
        return True  # looks like a path but is missing: reported by the loader with the paths it tried


def split_source(entry: str) -> tuple[str, str]:
    """``name@split`` -> (name, split) for hub data sets (default split ``train``; an ``hf:`` prefix is
    dropped); local paths as they are."""
    if entry.startswith("hf:"):
        entry = entry[3:]
    if "@" in entry and not is_local(entry):
        name, split = entry.rsplit("@", 1)
        return name, split or "train"
    return entry, "train"


GENERIC_STEMS = ("train", "test", "validation", "valid", "val", "dev", "data", "dataset")


def task_name(entry: str) -> str:
    """Short name of a stream entry: a file's stem (its folder's name for a stem such as ``train`` or
    ``test``), a hub id's last part (with a non-train split)."""
    name, split = split_source(entry)
    if is_local(name):
        path = Path(name)
        stem = path.parent.name if path.stem.lower() in GENERIC_STEMS and path.parent.name else path.stem
    else:
        stem = name.rstrip("/").rsplit("/", 1)[-1]
    return stem if split == "train" else f"{stem}@{split}"


def _pick(columns: Sequence[str], names: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def _gold_index(value: Any, choices: list[str], *, source: str, row: int, field: str) -> int:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        if 0 <= value < len(choices):
            return value
    elif isinstance(value, str):
        v = value.strip()
        low = [c.strip().lower() for c in choices]
        if v.lower() in low:
            return low.index(v.lower())
        if v.isdigit() and 0 <= int(v) < len(choices):
            return int(v)
        if len(v) == 1 and v.upper() in string.ascii_uppercase[: len(choices)]:
            return string.ascii_uppercase.index(v.upper())
    raise StreamError(f"{source}, row {row}: field {field!r} = {value!r} names none of the {len(choices)} choices "
                      f"(an index 0-{len(choices) - 1}, a letter, or the choice's text)")


def _candidates(instruction: str) -> list[str]:
    """The ``Answer format: a/b/...`` candidates of an LLM-Adapters instruction ([] when it names none)."""
    try:
        return answer_candidates(instruction)
    except ValueError:
        return []


def _choices_of(value: Any) -> list[str] | None:
    """A candidate list: a list of strings, or HF's ``{"text": [...], "label": [...]}`` (ARC's layout)."""
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        value = value["text"]
    if isinstance(value, list) and len(value) >= 2 and all(isinstance(c, (str, int, float)) for c in value):
        return [str(c) for c in value]
    return None


def detect_kind(columns: Sequence[str], first: dict[str, Any]) -> str:
    """``mc``, ``tests`` or ``text`` for a data set with these columns (``first``: its first row)."""
    choice = _pick(columns, CHOICE_FIELDS)
    if choice is not None and _choices_of(first.get(choice)) and _pick(columns, GOLD_FIELDS):
        return "mc"
    instr, ans = _pick(columns, ("instruction",)), _pick(columns, ("answer",))
    if instr and ans and isinstance(first.get(instr), str):
        labels = [c.lower() for c in _candidates(first[instr])]
        if labels and str(first.get(ans)).strip().lower() in labels:
            return "mc"
    if TEST_FIELD in columns and isinstance(first.get(TEST_FIELD), list):
        return "tests"
    return "text"


def rows_to_examples(rows: Any, source: str, name: str, cfg: DataConfig, *, purpose: str = "train on") -> list[Example]:
    """Every row of a ``datasets.Dataset`` (or list of dicts) as an Example of the data set's kind.

    Free-text rows with an empty response are left out (with a warning), as ``loramix train`` leaves them out;
    a data set whose every response is empty is refused (:func:`loramix.data.check_not_all_empty`, the check
    ``train`` applies). ``purpose`` says in that error what the rows were for (``train on``, ``score``)."""
    rows = list(rows)
    if not rows:
        raise StreamError(f"{source}: no rows")
    columns = list(rows[0])
    kind = detect_kind(columns, rows[0])
    out: list[Example] = []
    if kind == "mc":
        choice, gold = _pick(columns, CHOICE_FIELDS), _pick(columns, GOLD_FIELDS)
        question = _pick(columns, QUESTION_FIELDS)
        for i, rec in enumerate(rows, 1):
            if choice is None:  # LLM-Adapters style: the candidates are in the instruction
                labels = _candidates(str(rec.get("instruction") or ""))
                if not labels:
                    raise StreamError(f"{source}, row {i}: no 'Answer format: a/b/...' line in the instruction, "
                                      "unlike row 1 (a multiple-choice data set needs it in every row)")
                prompt = rec["instruction"]
                if str(rec.get("input") or "").strip():
                    prompt = f"{prompt}\n\n{rec['input']}"
                idx = _gold_index(str(rec["answer"]), labels, source=source, row=i, field="answer")
                out.append(Example(prompt, labels, idx, name))
                continue
            choices = _choices_of(rec.get(choice))
            if choices is None:
                raise StreamError(f"{source}, row {i}: field {choice!r} must be a list of at least two choices, "
                                  f"got {rec.get(choice)!r:.80}")
            if question is None or not isinstance(rec.get(question), str):
                raise StreamError(f"{source}, row {i}: a multiple-choice row needs a question field (one of "
                                  f"{list(QUESTION_FIELDS)}); rows have fields: {', '.join(columns)}")
            idx = _gold_index(rec.get(gold), choices, source=source, row=i, field=str(gold))
            out.append(Example(rec[question], choices, idx, name))
        return out
    ds_like = _as_dataset(rows)
    try:
        fmt, fields = resolve_format(ds_like, cfg, source=source)
    except DataError as e:
        raise StreamError(f"{e}; a continual task needs prompt/response, instruction/output, messages or "
                          "multiple-choice rows") from e
    if fmt == "text":
        raise StreamError(
            f"{source}: the learner cannot score a text-only data set (format 'text', field "
            f"{fields['text_field']!r}; rows have fields: {', '.join(columns)}): a task needs a prompt and a "
            "response (prompt/response, instruction/output or messages rows), or multiple-choice rows")
    conversations = [record_to_messages(rec, fmt, fields, system_prompt=cfg.system_prompt, source=source, row=i)
                     for i, rec in enumerate(rows, 1)]
    empty = sum(blank_reply(msgs) for msgs in conversations)
    try:
        check_not_all_empty(rows, empty, fmt, fields, source=source, split="", purpose=purpose, mappable=False)
    except DataError as e:
        raise StreamError(str(e)) from None
    if empty:
        logger.warning("%s: %d of %d rows have an empty response and are left out", source, empty, len(rows))
    for i, (rec, msgs) in enumerate(zip(rows, conversations, strict=True), 1):
        if blank_reply(msgs):
            continue
        if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
            raise StreamError(f"{source}, row {i}: the conversation must end with an assistant turn (the response "
                              "that is trained and scored)")
        history, response = msgs[:-1], msgs[-1]["content"]
        tests, setup = None, ""
        if kind == "tests":
            tests = [str(t) for t in rec.get(TEST_FIELD) or []]
            if not tests:
                raise StreamError(f"{source}, row {i}: field {TEST_FIELD!r} is empty (every row of a data set with "
                                  "tests needs at least one)")
            setup = str(rec.get(SETUP_FIELD) or "")
            last = dict(history[-1])
            last["content"] = f"{last['content']}\n{TESTS_HEADER}\n" + "\n".join(tests)
            history = [*history[:-1], last]
        prompt = "\n\n".join(m["content"] for m in history if m["role"] == "user")
        out.append(Example(prompt, [], -1, name, response=response, messages=history, tests=tests, setup=setup))
    return out


def _as_dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.Dataset.from_list(rows)


def load_source(entry: str, *, field: str = "tasks", cache_dir: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Rows of one stream entry (local file/directory or hub id, ``name@split``) and its printable name."""
    name, split = split_source(entry)
    cfg = DataConfig(data=name, split=split, cache_dir=cache_dir)
    try:
        ds, source = load_data_source(name, split, cfg)
    except (DataError, FileNotFoundError) as e:
        raise StreamError(f"--{field.replace('_', '-')} entry {entry!r}: {e}") from e
    return list(ds), source


def load_file_task(
    entry: str,
    test_entry: str | None = None,
    *,
    name: str | None = None,
    train_per_task: int | None = 200,
    test_per_task: int | None = 100,
    min_train: int = 1,
    seed: int = 0,
    cache_dir: str | None = None,
) -> Task:
    """One task from a data file or hub data set; its test set is ``test_entry`` (a file or hub id) or a
    disjoint held-out random split of ``test_per_task`` rows (then ``Task.split_from_test`` is False and
    ``Task.held_out`` is True). ``min_train``: training rows the split must leave (else a StreamError)."""
    name = name or task_name(entry)
    rows, source = load_source(entry, cache_dir=cache_dir)
    cfg = DataConfig(data=split_source(entry)[0], cache_dir=cache_dir)
    examples = rows_to_examples(rows, source, name, cfg)
    rng = random.Random(f"{seed}-{name}")
    if test_entry:
        test_rows, test_source = load_source(test_entry, field="test_data", cache_dir=cache_dir)
        test = rows_to_examples(test_rows, test_source, name, cfg, purpose="score")
        if test[0].kind != examples[0].kind:
            raise StreamError(f"{test_source}: its rows are {test[0].kind} rows, but {source}'s are "
                              f"{examples[0].kind} rows (a task's test data must be scored like its training data)")
        rng.shuffle(examples)
        train = examples if train_per_task is None else examples[:train_per_task]
        rng.shuffle(test)
        test = test if test_per_task is None else test[:test_per_task]
        return Task(name, train, test)
    n_test = test_per_task if test_per_task is not None else max(len(examples) // 5, 1)
    if len(examples) < n_test + min_train:
        raise StreamError(
            f"{source}: {len(examples)} rows are too few to hold out --test-per-task {n_test} test rows and keep "
            f"{min_train} for training; give a smaller --test-per-task, more rows, or a test file (--test-data)")
    rng.shuffle(examples)
    test, rest = examples[:n_test], examples[n_test:]
    train = rest if train_per_task is None else rest[:train_per_task]
    return Task(name, train, test, held_out=True)
