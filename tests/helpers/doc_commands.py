"""The commands shown in the README and in docs/, read from the pages' code blocks, and what a test needs to
run them: the size flags it lays over them, its expansion of shell variables, and the in-process run."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GUIDES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPORTS = sorted((ROOT / "docs" / "reports").glob("*.md"))
PAGES = GUIDES + REPORTS
PLACEHOLDER = "PLACEHOLDER"

ASSIGNMENT = r"[A-Za-z_][A-Za-z0-9_]*=(?:\"[^\"]*\"|'[^']*'|\S*)"
COMMAND_START = re.compile(rf"^(?P<env>(?:{ASSIGNMENT}\s+)*)"
                           r"(?:(?P<which>.*\$\(which loramix\))\s+|(?P<launcher>srun\s+|.*&&\s*)?loramix\s+)"
                           r"(?P<args>.*)$")


def code_lines(text: str) -> list[str]:
    """The lines of a markdown page's code: fenced blocks and blocks indented by four spaces, with backslash
    continuations joined."""
    lines, fenced, out = text.splitlines(), False, []
    for line in lines:
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or (line.startswith("    ") and line.strip()):
            out.append(line.strip())
        else:
            out.append("")
    joined = "\n".join(out).replace("\\\n", " ")
    return [line for line in joined.splitlines() if line]


def code_blocks(text: str) -> list[str]:
    """The text of each fenced code block of a page, as written."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


@dataclass
class DocCommand:
    """One `loramix` command line of a page: its arguments as the shell would split them (a `<placeholder>` or
    `$(command)` kept as one PLACEHOLDER argument, `...` and a trailing comment left out), the environment
    assignments written before it (`LORAMIX_DATA_DIR=/path/to/data loramix ...`) and what launches it
    (`srun `, `accelerate launch ... $(which loramix) `), if anything."""

    page: str
    line: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    launcher: str = ""
    more_flags: bool = False
    """The page writes `...` for flags of the reader's own."""

    @property
    def name(self) -> str:
        """`train`, `skills add`, ..."""
        return " ".join(self.argv[:2]) if self.argv[0] == "skills" else self.argv[0]

    @property
    def text(self) -> str:
        program = self.launcher if "which loramix" in self.launcher else f"{self.launcher} loramix".strip()
        return f"{program} {' '.join(self.argv)}"

    @property
    def id(self) -> str:
        return f"{self.page}: {self.text}"


def doc_commands(text: str, page: str = "") -> list[DocCommand]:
    """The `loramix` command lines of a page's code, in page order (a `$ ` prompt left out; program output
    that merely mentions a command, such as `Adapter: ... (loramix generate ...)`, is not a command)."""
    commands = []
    for line in code_lines(text):
        line = line.removeprefix("$ ")
        if line.startswith("pip "):
            continue
        match = COMMAND_START.match(line)
        if not match:
            continue
        words = shlex.split(re.sub(r"<[^<>]+>|\$\([^()]*\)", PLACEHOLDER, match.group("args")), comments=True)
        argv = [a for a in words if a != "..."]
        if not argv or (argv[0].startswith("-") and argv != ["--help"]):
            continue
        env = dict(a.split("=", 1) for a in shlex.split(match.group("env")))
        launcher = (match.group("which") or match.group("launcher") or "").strip()
        commands.append(DocCommand(page, line, argv, env, launcher,
                                   more_flags="..." in words))
    return commands


def loramix_commands(text: str) -> list[list[str]]:
    """The argument lists of the `loramix` command lines in a page's code (see :func:`doc_commands`)."""
    return [c.argv for c in doc_commands(text)]


def page_variables(text: str) -> dict[str, str]:
    """The plain shell assignments of a page's code (`D=runs/skills18/data; A=...`), in page order."""
    found = {}
    for line in code_lines(text):
        for part in line.split(";"):
            match = re.fullmatch(r"([A-Za-z_]\w*)=([^\s$`()]+)", part.strip())
            if match and match.group(2) != "...":
                found[match.group(1)] = match.group(2)
    return found


def page_commands(pages: list[Path] = PAGES) -> list[DocCommand]:
    return [c for page in pages for c in doc_commands(page.read_text(), str(page.relative_to(ROOT)))]


# --- laying the test's sizes over a command ----------------------------------------------------------------
def set_flag(argv: list[str], flag: str, value: str | None) -> list[str]:
    """``argv`` with ``flag`` given ``value``: the value written after it is replaced where the flag is there,
    otherwise the flag is added at the end (``value`` None: a boolean switch, added when missing)."""
    out = list(argv)
    for i, word in enumerate(out):
        if word == flag:
            if value is not None:
                out[i + 1] = value
            return out
        if word.startswith(flag + "="):
            out[i] = f"{flag}={value}"
            return out
    return out + ([flag] if value is None else [flag, value])


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


SIZES: dict[str, dict[str, str]] = {
    "train": {"--max-steps": "2", "--max-length": "128", "--batch-size": "2", "--val-size": "2"},
    "skills add": {"--max-steps": "2", "--max-length": "128", "--batch-size": "2", "--val-size": "0",
                   "--max-gate-prompts": "24", "--gate-variants": "16", "--gate-mixed": "8"},
    "generate": {"--max-new-tokens": "4"},
    "chat": {"--max-new-tokens": "4"},
    "skills generate": {"--max-new-tokens": "4"},
    "eval": {"--limit": "2", "--max-length": "64", "--batch-size": "2", "--max-new-tokens": "4"},
    "compare": {"--max-steps": "2", "--eval-limit": "2"},
    "bench": {"--steps": "1", "--warmup": "0", "--batch-size": "1", "--seq-len": "16", "--threads": "1"},
    "export": {"--check-tokens": "32"},
    "continual": {"--train-per-task": "16", "--test-per-task": "4", "--max-length": "128", "--max-new-tokens": "4",
                  "--eval-batch-size": "4"},
}
"""Size flags the tests give every command of that name (replacing the page's value, or added): a couple of
optimiser steps, a few rows, items and tokens, short sequences. Nothing else about the command changes."""

TAKES_MODEL = {"train", "generate", "chat", "eval", "compare", "bench", "export", "continual", "skills add"}
"""Commands whose base model is the packaged SmolLM2-135M-Instruct unless `--model` names another (skills route,
generate, list, export and serve use the library's recorded base)."""


def sized(argv: list[str], name: str, model: str | None) -> list[str]:
    """``argv`` with :data:`SIZES` laid over it, and ``--model model`` where the command takes a base model and
    ``model`` is given (a tiny local model in place of the packaged one or of a hub id)."""
    out = list(argv)
    for flag, value in SIZES.get(name, {}).items():
        out = set_flag(out, flag, value)
    if model is not None and name in TAKES_MODEL:
        out = set_flag(out, "--model", model)
    return out


def expand(argv: list[str], variables: dict[str, str], arrays: dict[str, list[str]] | None = None) -> list[str]:
    """Shell variables (`$NAME`, `${NAME}`, `$1`) in ``argv`` replaced by ``variables``, and an argument that is
    a whole array (`${P[@]}`) by the items of ``arrays``; an unknown one is an error naming it (the test must
    say what the page means by it)."""
    spliced = []
    for a in argv:
        whole = re.fullmatch(r"\$\{(\w+)\[@\]\}", a)
        if whole and whole.group(1) not in (arrays or {}):
            raise KeyError(f"the page uses the array ${{{whole.group(1)}[@]}}, which the test does not define")
        spliced += arrays[whole.group(1)] if whole else [a]
    argv = spliced

    def one(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"the page uses ${name}, which the test does not define")
        return variables[name]

    return [re.sub(r"\$\{(\w+)\}|\$([0-9]|[A-Za-z_]\w*)", one, a) for a in argv]


@dataclass
class Result:
    argv: list[str]
    rc: int
    out: str
    err: str

    def describe(self) -> str:
        return (f"loramix {shlex.join(self.argv)}\nexit {self.rc}\n--- stdout ---\n{self.out[-3000:]}\n"
                f"--- stderr ---\n{self.err[-3000:]}")


def run_cli(argv: list[str], cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None) -> Result:
    """``loramix argv`` through the command line's own entry (:func:`loramix.cli.main`), in-process, from
    ``cwd`` with ``env`` set; its exit status and what it printed."""
    from loramix.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in env or {}}
    saved_cwd, saved_stdin = os.getcwd(), sys.stdin
    os.environ.update(env or {})
    os.chdir(cwd)
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        sys.stdin = saved_stdin
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Result(argv, rc, out.getvalue(), err.getvalue())
