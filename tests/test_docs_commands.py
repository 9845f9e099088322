"""Every `loramix ...` command shown in the README and in docs/ parses against the command line: its command
exists, each flag it gives exists and takes the value written, and no required flag is missing. An example
cannot drift from the code unnoticed (what the commands then do is tested elsewhere)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from loramix.cli import build_parser, command_table

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


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


PLACEHOLDER = "PLACEHOLDER"


def loramix_commands(text: str) -> list[list[str]]:
    """The argument lists of the `loramix` command lines in a page's code (a `$ ` prompt, a `$(which loramix)`
    launcher prefix and a trailing `# comment` left out; `...` stands for more flags and is dropped; a
    `<placeholder>` or `$(command)` becomes one argument)."""
    commands = []
    for line in code_lines(text):
        line = line.removeprefix("$ ")
        line = re.sub(r"<[^<>]+>|\$\([^()]*\)", PLACEHOLDER, line)
        match = re.search(r"(?:^|\$\(which loramix\)\s+|&&\s*)loramix\s+(.*)$", line)
        if not match or line.startswith("pip "):
            continue
        argv = [a for a in shlex.split(match.group(1), comments=True) if a != "..."]
        if argv and not argv[0].startswith("-") or argv == ["--help"]:
            commands.append(argv)
    return commands


def _cases() -> list[tuple[str, list[str]]]:
    return [(f"{page.relative_to(ROOT)}: loramix {' '.join(argv)}", argv)
            for page in PAGES for argv in loramix_commands(page.read_text())]


CASES = _cases()


def test_the_pages_show_commands():
    """The extraction finds the commands (a change of page layout would otherwise silently test nothing)."""
    names = {argv[0] for _, argv in CASES}
    assert {"train", "generate", "chat", "eval", "compare", "bench", "export", "skills", "continual"} <= names


@pytest.fixture(scope="module")
def parser():
    return build_parser()


def with_numbers_for_variables(argv: list[str]) -> list[str]:
    """A shell variable or placeholder given to a number or list flag (`--max-steps $N`) as a number or a
    one-item list: the page shows a value there, the test cannot know which."""
    table = command_table()
    entry = table.get(argv[0], {})
    if "commands" in entry and len(argv) > 1:
        entry = entry["commands"].get(argv[1], {})
    kinds = {"--" + f["name"].replace("_", "-"): f["type"] for f in entry.get("flags", [])}
    out = list(argv)
    for i in range(1, len(out)):
        variable = "$" in out[i] or out[i] == PLACEHOLDER
        kind = kinds.get(out[i - 1], "").split(" |")[0]
        if variable and kind in ("int", "float"):
            out[i] = "1"
        elif variable and kind.startswith("list"):
            out[i] = "[x]"
    return out


@pytest.mark.parametrize("where,argv", CASES, ids=[c[0] for c in CASES])
def test_documented_command_parses(parser, where, argv, capsys):
    argv = with_numbers_for_variables([a for a in argv if a != "--help"])
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}\n{capsys.readouterr().err.strip()} (exit {e.code})")
