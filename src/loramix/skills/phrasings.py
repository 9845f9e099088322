"""Varied gate prompts for a skill: its data's own instruction and a few seed phrasings, in many layouts.

A gate trained on one template per skill learns the template, not the skill. ``skills_add`` therefore trains the
gate on prompts built here from

* the skill's *contents*: its training prompts with the instruction text they all share (the longest common
  prefix and suffix, :func:`split_template`) removed, e.g. the review sentence of an SST-2 row;
* its *instructions*: that shared instruction itself plus the seed phrasings the user gives (``instructions`` of
  ``skills_add``);

rendered in several layouts (instruction before or after the text, quoted or not) and framings ("Please ...",
"Can you ..."). Composed prompts that ask for two skills at once (:func:`compose`) teach the gate to give both a
weight. Everything is seeded and deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

LAYOUTS = (
    "{i} {c}",
    "{i}\n{c}",
    "{i}: \"{c}\"",
    "{i}\n\n{c}",
    "{c}\n{i}",
    "{c}\n\n{i}",
    "\"{c}\" {i}",
    "{i}\n\"{c}\"",
)
FRAMES = ("{i}", "{i}", "{i}", "Please {l}", "Can you {l}?", "I need you to {l}.", "Hey, {l}", "{i} Thanks!")
JOINERS = ("{a} and {b}", "{a}. Also, {b}", "{a}, then {b}", "{a}; {b}", "{a}. {B}", "{a} and also {b}")
_MIN_TEMPLATE = 8  # characters a shared prefix/suffix needs before it counts as the skill's instruction


def _common_prefix(texts: Sequence[str]) -> str:
    first, last = min(texts), max(texts)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]


def split_template(prompts: Sequence[str]) -> tuple[str, str, list[str]]:
    """``(prefix, suffix, contents)``: the text every prompt starts / ends with and what lies between.

    Prefix and suffix end / start at a word boundary and are kept only when at least a few characters long and
    the prompts are at least two; otherwise they are empty and the contents are the prompts themselves.
    """
    prompts = list(prompts)
    if len(prompts) < 2:
        return "", "", prompts
    pre = _common_prefix(prompts)
    # the instruction ends at the first ':' or line break after a few characters ("Summarize this dialogue:\n"),
    # else at the last word boundary; what follows is shared data ("#Person1#: " opening every dialogue)
    ends = [k for k, ch in enumerate(pre) if ch in ":\n" and k >= _MIN_TEMPLATE]
    cut = ends[0] if ends else max(pre.rfind(" "), pre.rfind("\n"))
    pre = pre[: cut + 1] if cut >= 0 else ""
    while pre and all(len(p) > len(pre) and p[len(pre)] in " \n" and p[len(pre)] == prompts[0][len(pre)]
                      for p in prompts):
        pre += prompts[0][len(pre)]  # the separator after the instruction belongs to it
    rest = [p[len(pre):] for p in prompts]
    suf = _common_prefix([r[::-1] for r in rest])[::-1]
    cut = min((k for k in (suf.find(" "), suf.find("\n")) if k >= 0), default=-1)
    suf = suf[cut:] if cut >= 0 else ""  # a shared '?' before the suffix stays with the content
    if len(pre.strip()) < _MIN_TEMPLATE:
        pre = ""
    if len(suf.strip()) < _MIN_TEMPLATE:
        suf = ""
    contents = [p[len(pre): len(p) - len(suf)].strip() for p in prompts]
    if any(not c for c in contents):
        return "", "", prompts
    return pre, suf, contents


def template_instruction(prefix: str, suffix: str) -> str | None:
    """The instruction of a data template as a phrase (prefix and suffix joined, trailing ':' dropped)."""
    text = ". ".join(_strip_end(s) for s in (prefix, suffix) if _strip_end(s))
    return text or None


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:] if s[:1].isupper() and not s[1:2].isupper() else s


def _strip_end(s: str) -> str:
    return s.strip().strip(",").rstrip(".:!;?").strip()


def frame(instruction: str, rng: random.Random) -> str:
    """The instruction in one of :data:`FRAMES` (some framings lower-case its first letter)."""
    i = _strip_end(instruction)
    return rng.choice(FRAMES).format(i=instruction.strip(), l=_lower_first(i))


def render(instruction: str, content: str, rng: random.Random) -> str:
    """One prompt: a framing of ``instruction`` and ``content`` in one of :data:`LAYOUTS`."""
    c = content.strip()
    if len(c) > 1500:  # long texts: the instruction's wording matters, not the whole dialogue
        c = c[:1500]
    return rng.choice(LAYOUTS).format(i=frame(instruction, rng), c=c)


def vary(instructions: Sequence[str], contents: Sequence[str], n: int, *, seed: int = 0) -> list[str]:
    """``n`` prompts, each one instruction (cycled) with one content (random) in a random layout and framing."""
    if not instructions or not contents:
        return []
    rng = random.Random(seed)
    return [render(instructions[k % len(instructions)], rng.choice(list(contents)), rng) for k in range(n)]


def compose(instructions_a: Sequence[str], instructions_b: Sequence[str], contents: Sequence[str], n: int, *,
            seed: int = 0) -> list[str]:
    """``n`` prompts that ask for two skills: an instruction of each, joined, with one content."""
    if not instructions_a or not instructions_b or not contents:
        return []
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = _strip_end(rng.choice(list(instructions_a))), _strip_end(rng.choice(list(instructions_b)))
        if rng.random() < 0.5:
            a, b = b, a
        joined = rng.choice(JOINERS).format(a=a, b=_lower_first(b), B=b[:1].upper() + b[1:])
        out.append(render(joined, rng.choice(list(contents)), rng))
    return out
