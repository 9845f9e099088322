"""The data types of a continual-learning stream: examples, tasks and the encoded training stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One example; ``task`` is used only by the evaluation harness, never the learner.

    Multiple choice: ``choices`` and the ``gold`` index. Otherwise ``choices`` is empty and ``response`` is
    the target (after ``messages``, the conversation up to it; None = one user turn holding ``prompt``);
    ``tests`` (assert statements, run after ``setup``) make the task scored by pass@1. ``prompt`` is what
    the novelty detector embeds.
    """

    prompt: str
    choices: list[str]
    gold: int
    task: str = ""
    response: str | None = None
    messages: list[dict[str, str]] | None = None
    tests: list[str] | None = None
    setup: str = ""

    @property
    def kind(self) -> str:
        """``mc`` (multiple choice), ``tests`` (code with tests) or ``text`` (free response)."""
        return "mc" if self.choices else "tests" if self.tests else "text"


@dataclass
class Task:
    name: str
    train: list[Example]
    test: list[Example]
    split_from_test: bool = False
    """True when the data has no training file: train and test are disjoint subsets of its test file."""
    held_out: bool = False
    """True when the test set was held out of the task's data file (no test file was given)."""

    @property
    def kind(self) -> str:
        """How the task is scored: ``mc`` (accuracy), ``tests`` (pass@1) or ``text`` (response loss)."""
        return self.test[0].kind if self.test else self.train[0].kind


@dataclass
class EncodedExample:
    """A training example as token ids: ``context_ids + target_ids``, loss on the target only."""

    index: int  # position in the stream
    prompt: str
    context_ids: list[int]
    target_ids: list[int]
    task: int = -1  # true task (metrics only)
    embedding: Any = None  # filled by the learner / harness


@dataclass
class Stream:
    """The concatenated training stream and where each task starts in it."""

    examples: list[EncodedExample]
    boundaries: list[int]  # stream index of every task's first example
    task_names: list[str] = field(default_factory=list)
