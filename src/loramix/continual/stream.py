"""Task streams: multiple-choice tasks arriving one after another, plus their tokenization.

Every task is a list of :class:`Example` (prompt, candidate answers, gold index). Training uses the
exact format of scoring: the context is the rendered prompt followed by ``the correct answer is``
(``loramix.evaluation.mc_context``) and the target is `` <gold answer>``, so the multiple-choice
log-likelihood score measures what training optimises.

Sources: ``synthetic`` tasks (disjoint character sets, one constant answer each: learnable in a few
steps, separable by a random tiny model), SST-2 (``sst2/sst2_{train,test}.tsv``) and the LLM-Adapters
commonsense sets (``llm_adapters_commonsense/<task>/{train,test}.json``) under ``$LORAMIX_DATA_DIR``.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..evaluation import (
    ANSWER_PREFIX,
    answer_candidates,
    encode_pair,
    load_records,
    mc_context,
    resolve_data_dir,
)
from ..generation import render_chat
from .sources import StreamError, is_local, load_file_task, task_name
from .tasks import EncodedExample as EncodedExample  # the task types, importable from here as before
from .tasks import Example as Example
from .tasks import Stream as Stream
from .tasks import Task as Task

SST2_INSTRUCTION = (
    "Please classify the sentiment of the following movie review as positive or negative, review: {sentence}"
    "\n\nAnswer format: positive/negative"
)
SYNTHETIC_ALPHABETS = ("abcdefgh", "01234567", "KLMNOPQR", "!#$%&*+=", "stuvwxyz", "ABCDEFGH")
SYNTHETIC_CHOICES = ("ant", "bee", "cow")  # equal length: summed log-likelihoods compare fairly
COMMONSENSE_DIR = "llm_adapters_commonsense"


# --------------------------------------------------------------------------------------------------
# task sources
# --------------------------------------------------------------------------------------------------
def synthetic_tasks(
    num_tasks: int = 3,
    *,
    train_per_task: int = 48,
    test_per_task: int = 12,
    words: tuple[int, int] = (12, 18),
    seed: int = 0,
) -> list[Task]:
    """Tasks whose prompts use disjoint character sets (clearly different token distributions) and whose
    answer is constant per task (task ``t`` -> ``SYNTHETIC_CHOICES[t % 3]``), so training on a later task
    overwrites an earlier one in a single shared adapter."""
    if not 1 <= num_tasks <= len(SYNTHETIC_ALPHABETS):
        raise ValueError(f"num_tasks must be in [1, {len(SYNTHETIC_ALPHABETS)}], got {num_tasks}")
    rng = random.Random(seed)
    tasks = []
    for t in range(num_tasks):
        alphabet = SYNTHETIC_ALPHABETS[t]
        name = f"synthetic{t}"

        def make(n: int, alphabet: str = alphabet, t: int = t, name: str = name) -> list[Example]:
            out = []
            for _ in range(n):
                text = " ".join(
                    "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 6)))
                    for _ in range(rng.randint(*words))
                )
                out.append(Example(text, list(SYNTHETIC_CHOICES), t % len(SYNTHETIC_CHOICES), name))
            return out

        tasks.append(Task(name, make(train_per_task), make(test_per_task)))
    return tasks


def _sample(items: list[Any], n: int | None, rng: random.Random) -> list[Any]:
    if n is None or n >= len(items):
        items = list(items)
        rng.shuffle(items)
        return items
    return rng.sample(items, n)


def _sst2(path: Path, task: str) -> list[Example]:
    if not path.is_file():
        raise FileNotFoundError(f"{task}: expected data file {path} is missing")
    out = []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            gold = int(row["label"])
            out.append(Example(SST2_INSTRUCTION.format(sentence=row["sentence"].strip()),
                               ["negative", "positive"], gold, task))
    return out


def _commonsense(path: Path, task: str) -> list[Example]:
    if not path.is_file():
        raise FileNotFoundError(f"{task}: expected data file {path} is missing")
    out = []
    for i, rec in enumerate(load_records(path)):
        labels = answer_candidates(rec["instruction"])
        low = [c.lower() for c in labels]
        gold = str(rec["answer"]).strip().lower()
        if gold not in low:
            raise ValueError(f"{path} record {i}: answer {rec['answer']!r} is not among {labels}")
        prompt = rec["instruction"]
        if str(rec.get("input") or "").strip():
            prompt = f"{prompt}\n\n{rec['input']}"
        out.append(Example(prompt, labels, low.index(gold), task))
    return out


def load_task(
    name: str,
    data_dir: str | Path | None = None,
    *,
    train_per_task: int | None = 200,
    test_per_task: int | None = 100,
    seed: int = 0,
) -> Task:
    """``sst2`` or an LLM-Adapters commonsense task (boolq, ARC-Easy, ARC-Challenge, openbookqa, piqa,
    winogrande, social_i_qa); random subsets of ``train_per_task`` / ``test_per_task`` examples (None = all).

    A task with only a ``test.json`` (piqa, winogrande, social_i_qa) is split: ``test_per_task`` random
    items (at most half; None = half) are its test set and ``train_per_task`` of the others (None = all
    the others) its training set, so the two never overlap (``Task.split_from_test``)."""
    root = resolve_data_dir(data_dir)
    if name.lower() in ("sst2", "sst-2"):
        train = _sst2(root / "sst2" / "sst2_train.tsv", name)
        test = _sst2(root / "sst2" / "sst2_test.tsv", name)
    else:
        base = root / COMMONSENSE_DIR / name
        if not (base / "test.json").is_file():
            have = sorted(p.parent.name for p in (root / COMMONSENSE_DIR).glob("*/test.json"))
            raise FileNotFoundError(f"unknown task {name!r}: no {base / 'test.json'}; tasks: sst2, "
                                    f"{', '.join(p for p in have)}")
        test = _commonsense(base / "test.json", name)
        if not (base / "train.json").is_file():
            # only a test file (piqa, winogrande, social_i_qa in the LLM-Adapters release): disjoint random
            # train and test subsets of it
            rng = random.Random(f"{seed}-{name}")
            items = _sample(test, None, rng)
            n_test = len(items) // 2 if test_per_task is None else min(test_per_task, len(items) // 2)
            n_train = len(items) - n_test if train_per_task is None else min(train_per_task, len(items) - n_test)
            return Task(name, items[n_test : n_test + n_train], items[:n_test], split_from_test=True)
        train = _commonsense(base / "train.json", name)
    rng = random.Random(f"{seed}-{name}")
    return Task(name, _sample(train, train_per_task, rng), _sample(test, test_per_task, rng))


BUILTIN_TASKS = ("sst2", "sst-2", "boolq", "ARC-Easy", "ARC-Challenge", "openbookqa", "piqa", "winogrande",
                 "social_i_qa", "hellaswag")


def is_builtin(entry: str) -> bool:
    """True for a built-in task name (sst2, the LLM-Adapters commonsense sets, synthetic[:n])."""
    return entry in BUILTIN_TASKS or entry.lower() in ("sst2", "sst-2") or entry.split(":", 1)[0] == "synthetic"


def split_entries(names: str | Sequence[str] | None) -> list[str]:
    """A comma-separated string (or a list) as a list of stripped entries; empty entries are kept as ''."""
    if names is None:
        return []
    if isinstance(names, str):
        return [n.strip() for n in names.split(",")]
    return [str(n).strip() for n in names]


def _under(entry: str, data_dir: str | Path | None) -> str:
    """A relative file entry found under ``data_dir`` (and not from the working directory) as that path."""
    if not entry or data_dir is None or entry.startswith("hf:"):
        return entry
    p = Path(entry).expanduser()
    if p.is_absolute() or p.exists():
        return entry
    candidate = Path(data_dir).expanduser() / p
    return str(candidate) if candidate.exists() else entry


def load_tasks(
    names: str | Sequence[str],
    data_dir: str | Path | None = None,
    *,
    train_per_task: int | None = 200,
    test_per_task: int | None = 100,
    seed: int = 0,
    test_data: str | Sequence[str] | None = None,
    min_train: int = 1,
    cache_dir: str | None = None,
) -> list[Task]:
    """Tasks in stream order (a list or a comma-separated string). Each entry is a built-in task (``sst2``,
    an LLM-Adapters commonsense set under the data directory; ``synthetic`` or ``synthetic:<n>`` alone makes
    ``n`` (default 3) synthetic tasks and needs no data), a local data file or directory, or a hub data set
    (``owner/name``, ``owner/name@split``, or ``hf:<name>`` for an id without an owner), read by
    :func:`loramix.continual.sources.load_file_task`. A bare name that is not a local path is a built-in task.
    A relative file path is looked up from the working directory, then under ``data_dir``, then under
    ``$LORAMIX_DATA_DIR``.

    ``test_data``: test files / hub ids aligned with ``names`` (an empty entry = hold out ``test_per_task``
    rows of that task's data; built-in tasks bring their own test sets). ``min_train``: training rows a
    held-out split must leave."""
    names = [n for n in split_entries(names) if n]
    if not names:
        raise ValueError("no tasks given")
    tests = split_entries(test_data)
    if tests and len(tests) != len(names):
        raise StreamError(f"--test-data has {len(tests)} entries for {len(names)} tasks; give one per task "
                          "(an empty entry holds out part of that task's data)")
    tests = tests or [""] * len(names)
    if len(names) == 1 and names[0].startswith("synthetic"):
        n = int(names[0].split(":", 1)[1]) if ":" in names[0] else 3
        return synthetic_tasks(n, train_per_task=train_per_task or 48, test_per_task=test_per_task or 12, seed=seed)
    tasks = []
    for name, test in zip(names, tests, strict=True):
        if not name.startswith("hf:") and not is_local(name) and "/" not in name and not name.startswith("synthetic"):
            # a bare name: a built-in task (load_task says which exist when it is none)
            if test:
                raise StreamError(f"--test-data entry {test!r}: built-in task {name!r} has its own test set; "
                                  "leave its entry empty")
            tasks.append(load_task(name, data_dir, train_per_task=train_per_task, test_per_task=test_per_task,
                                   seed=seed))
        elif is_builtin(name) and not name.startswith("synthetic"):
            if test:
                raise StreamError(f"--test-data entry {test!r}: built-in task {name!r} has its own test set; "
                                  "leave its entry empty")
            tasks.append(load_task(name, data_dir, train_per_task=train_per_task, test_per_task=test_per_task,
                                   seed=seed))
        elif name.startswith("synthetic"):
            raise StreamError(f"--tasks: {name!r} makes a whole synthetic stream and cannot be mixed with other tasks")
        else:
            name, test = _under(name, data_dir), _under(test, data_dir)
            tasks.append(load_file_task(name, test or None, name=task_name(name), train_per_task=train_per_task,
                                        test_per_task=test_per_task, min_train=min_train, seed=seed,
                                        cache_dir=cache_dir))
    seen: dict[str, int] = {}
    for t in tasks:  # two files with one stem: number them (task names only label the metrics)
        seen[t.name] = seen.get(t.name, 0) + 1
        if seen[t.name] > 1:
            t.name = f"{t.name}#{seen[t.name]}"
            for ex in t.train + t.test:
                ex.task = t.name
    return tasks


# --------------------------------------------------------------------------------------------------
# tokenization
# --------------------------------------------------------------------------------------------------
def context_of(tokenizer: Any, example: Example, *, chat_template: bool = True,
               answer_prefix: str = ANSWER_PREFIX) -> tuple[str, bool]:
    """Rendered scoring context of an example and the ``add_special_tokens`` flag to tokenize it with."""
    return mc_context(tokenizer, {"instruction": example.prompt}, chat_template=chat_template,
                      answer_prefix=answer_prefix)


def mc_items(tokenizer: Any, examples: Sequence[Example], *, chat_template: bool = True) -> list[dict[str, Any]]:
    """Items for ``loramix.evaluation.score_multiple_choice``."""
    items = []
    for ex in examples:
        context, add_special = context_of(tokenizer, ex, chat_template=chat_template)
        items.append({"context": context, "choices": list(ex.choices), "gold": ex.gold,
                      "add_special_tokens": add_special, "prompt": ex.prompt})
    return items


def response_pair(tokenizer: Any, example: Example, *, chat_template: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of a free-response example: the rendered conversation with the assistant prompt, and the
    response followed by the end-of-sequence token (so the model learns to stop)."""
    messages = example.messages or [{"role": "user", "content": example.prompt}]
    context, add_special = render_chat(tokenizer, messages, chat_template=chat_template)
    assert example.response is not None
    ctx, target = encode_pair(tokenizer, context, example.response, add_special_tokens=add_special)
    if tokenizer.eos_token_id is not None:
        target = [*target, int(tokenizer.eos_token_id)]
    return ctx, target


def encode_example(tokenizer: Any, example: Example, *, index: int = 0, task: int = -1,
                   chat_template: bool = True, max_length: int = 512) -> EncodedExample:
    """Context + target token ids, loss on the target: `` <gold answer>`` for multiple choice (the scorer's
    split), the response + EOS otherwise. Long contexts lose their start; a response longer than
    ``max_length`` keeps its first ``max_length - 1`` tokens."""
    if example.kind != "mc":
        ctx, target = response_pair(tokenizer, example, chat_template=chat_template)
        target = target[: max(max_length - 1, 1)]
        keep = max(max_length - len(target), 1)
        return EncodedExample(index, example.prompt, ctx[-keep:], target, task)
    context, add_special = context_of(tokenizer, example, chat_template=chat_template)
    ctx, target = encode_pair(tokenizer, context, " " + example.choices[example.gold], add_special_tokens=add_special)
    if not target:
        raise ValueError(f"example {index}: the answer tokenizes to nothing")
    keep = max(max_length - len(target), 1)
    return EncodedExample(index, example.prompt, ctx[-keep:], target, task)


def build_stream(tokenizer: Any, tasks: Sequence[Task], *, chat_template: bool = True,
                 max_length: int = 512) -> Stream:
    """All tasks' training examples in task order, encoded; boundaries = each task's first index."""
    examples: list[EncodedExample] = []
    boundaries = []
    for t, task in enumerate(tasks):
        boundaries.append(len(examples))
        for ex in task.train:
            examples.append(encode_example(tokenizer, ex, index=len(examples), task=t,
                                           chat_template=chat_template, max_length=max_length))
    return Stream(examples, boundaries, [t.name for t in tasks])
