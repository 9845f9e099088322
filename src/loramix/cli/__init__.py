"""Command line: each sub-command is a plain library function; flags come from its signature or config
dataclasses, and the help text from their docstrings. The library never imports this module."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import docstring_parser
import jsonargparse
from jsonargparse import ActionYesNo, DefaultHelpFormatter

from ..allocator import tune_malloc

TRAIN_OPTIONS = ["loramix.train:TrainConfig", "loramix.data:DataConfig", "loramix.config:MixLoraConfig"]


@dataclasses.dataclass(frozen=True)
class Command:
    """A sub-command: the function it calls, config dataclasses whose fields become extra flags, and the
    parameters taken as positional arguments."""

    fn: str
    option_classes: tuple[str, ...] = ()
    positional: tuple[str, ...] = ()


COMMANDS: dict[str, Command | dict[str, Command]] = {
    "train": Command("loramix.train:train", tuple(TRAIN_OPTIONS)),
    "generate": Command("loramix.cli.commands:generate_command"),
    "chat": Command("loramix.cli.commands:chat_command"),
    "eval": Command("loramix.cli.commands:eval_command"),
    "compare": Command("loramix.cli.commands:compare_command"),
    "bench": Command("loramix.cli.commands:bench_command"),
    "export": Command("loramix.cli.commands:export_command"),
    "skills": {
        "add": Command("loramix.skills.api:skills_add", tuple(TRAIN_OPTIONS), ("name",)),
        "route": Command("loramix.skills.api:skills_route", (), ("prompts",)),
        "generate": Command("loramix.skills.api:skills_generate", (), ("prompts",)),
        "list": Command("loramix.skills.api:skills_list"),
        "compare-static": Command("loramix.skills.api:skills_compare_static", (), ("prompts",)),
        "export": Command("loramix.skills.export:skills_export"),
        "serve": Command("loramix.skills.serve:skills_serve"),
    },
    "continual": Command("loramix.cli.commands:continual_command", ("loramix.continual.config:ContinualConfig",)),
}


class HelpFormatter(DefaultHelpFormatter):
    """Help lines as written by ``_add_flag`` (doc, type, default), with the description kept as written."""

    def _get_help_string(self, action: Any) -> str:
        return action.help or ""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class ArgumentParser(jsonargparse.ArgumentParser):
    """jsonargparse with one-line errors: ``loramix train: error: argument --max-steps: ...`` (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        prog = self.prog.replace(" [options]", "")
        self.exit(2, f"{prog}: error: {one_line_error(message, self)} (see {prog} --help)\n")


def one_line_error(message: str, parser: Any = None) -> str:
    """jsonargparse's multi-line type error as one line naming the flag and the value given."""
    key = re.search(r'Parser key "([^"]+)"', message)
    if not key:
        return " ".join(message.split())
    dest = key.group(1).split(".")[-1]
    flag = "--" + dest.replace("_", "-")
    for action in getattr(parser, "_actions", ()):
        if action.dest == dest and action.option_strings:
            flag = action.option_strings[0]
    given = re.search(r"(?:Given|Got) value: (.*)", message)
    value = given.group(1).strip() if given else "?"
    kind = getattr(parser, "_flag_kinds", {}).get(dest, "this type")
    return f"argument {flag}: cannot read {value!r} as {kind}"


def field_docs(cls: type) -> dict[str, str]:
    """The documentation written under each dataclass field (an attribute docstring), by field name."""
    parsed = docstring_parser.parse_from_object(cls)
    return {p.arg_name: " ".join((p.description or "").split()) for p in parsed.params}


def param_docs(fn: Callable) -> dict[str, str]:
    """Each parameter's text from a function's Google-style ``Args:`` section."""
    parsed = docstring_parser.parse(inspect.getdoc(fn) or "")
    return {p.arg_name: " ".join((p.description or "").split()) for p in parsed.params}


def _resolve(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _type_text(hint: Any) -> str:
    """``int | list[int] | None`` rather than typing's ``Union[...]`` repr."""
    if hint is type(None):
        return "None"
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if args:
        return f"{typing.get_origin(hint).__name__}[{', '.join(_type_text(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def _int_first(hint: Any) -> Any:
    """``float | int`` as ``int | float``: jsonargparse tries a union's types in order, and ``4`` must stay a
    count rather than become the fraction 4.0."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and int in args and float in args:
        return typing.Union[tuple(sorted(args, key=lambda a: a is not int))]  # noqa: UP007
    return hint


def _metavar(kind: str) -> str:
    """INT, FLOAT or STR for plain (or optional) scalars; VALUE for unions, lists and maps (YAML)."""
    plain = kind.removesuffix(" | None")
    return plain.upper() if plain in ("int", "float", "str") else "VALUE"


def plain_text(text: str) -> str:
    """Docstring text as the terminal shows it: reST roles and backquotes dropped (``x``, `x`, :func:`x` -> x)."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return re.sub(r"`{1,2}([^`]+)`{1,2}", r"\1", text)


def summary_text(fn: Callable) -> str:
    """A command's one-line summary: the first paragraph of its docstring, whole, as plain text."""
    first = (inspect.getdoc(fn) or "").split("\n\n")[0]
    return plain_text(" ".join(first.split()))


def description_text(fn: Callable) -> str:
    """A command's ``--help`` description: its docstring without the ``Args:`` section, as plain text."""
    kept: list[str] = []
    in_args = False
    for line in (inspect.getdoc(fn) or "").splitlines():
        if line.strip() == "Args:" and not line.startswith(" "):
            in_args = True
            continue
        if in_args and (not line.strip() or line.startswith(" ")):
            continue
        in_args = False
        kept.append(line)
    return plain_text(re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip())


TYPE_NAMES: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict,
                              "None": None, "Path": Path}
"""The names a flag's type may use in the command table (``int | list[int] | None``, ...)."""


def type_from_text(text: str) -> Any:
    """The type a flag's type text names (``"int | None"`` -> ``int | None``), for jsonargparse to check values."""
    return eval(text, {"__builtins__": {}}, TYPE_NAMES)  # only the names above


def describe_command(cmd: Command) -> dict[str, Any]:
    """One command's entry of the command table: summary, description and flags, read from its function's
    signature and docstring and from its option dataclasses (this imports them, and with them torch)."""
    fn = _resolve(cmd.fn)
    docs = param_docs(fn)
    hints = typing.get_type_hints(fn)
    flags: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(name: str, hint: Any, default: Any, doc: str, required: bool, group: str | None) -> None:
        kind = _type_text(_int_first(hint))
        if type_from_text(kind) is None and kind != "None":
            raise ValueError(f"{cmd.fn}: {name}: type {kind!r} cannot be written to the command table")
        flags.append({"name": name, "type": kind, "help": plain_text(doc), "required": required,
                      "default": None if required else repr(default), "positional": name in cmd.positional,
                      "group": group})

    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or pname == "callbacks":
            continue
        seen.add(pname)
        required = param.default is inspect.Parameter.empty
        help_text = docs.get(pname, "")
        if pname == "config" and cmd.option_classes:
            help_text = help_text or "YAML file of options (flags override it)"
        add(pname, hints.get(pname, str), None if required else param.default, help_text, required, None)
    for ref in cmd.option_classes:  # option dataclasses: every field is a flag (collected in **options)
        cls = _resolve(ref)
        field_help = field_docs(cls)
        field_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen or not f.init:
                continue
            seen.add(f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            add(f.name, field_hints[f.name], default, field_help.get(f.name, ""), False, cls.__name__)
    return {"summary": summary_text(fn), "description": description_text(fn), "flags": flags}


def describe_commands() -> dict[str, Any]:
    """The whole command table, read from the code (``COMMANDS``); ``spec.json`` holds a copy of it."""
    table: dict[str, Any] = {}
    for name, cmd in COMMANDS.items():
        if isinstance(cmd, Command):
            table[name] = describe_command(cmd)
        else:
            summary = f"{name} sub-commands: {', '.join(cmd)}"
            table[name] = {"summary": summary, "description": summary,
                           "commands": {sub: describe_command(c) for sub, c in cmd.items()}}
    return table


SPEC_FILE = Path(__file__).with_name("spec.json")
"""The command table as shipped, so that building the parser imports no command module (nor torch).
Written by ``python -m loramix.cli.spec``; a test checks that it matches :func:`describe_commands`."""


@functools.cache
def command_table() -> dict[str, Any]:
    """The shipped command table (``spec.json``)."""
    return json.loads(SPEC_FILE.read_text())


def _add_flag(parser: Any, flag: dict[str, Any]) -> None:
    """One flag: its type checked by jsonargparse (lists and maps as YAML: ``"[4, 8]"``, ``"{0: 2}"``),
    ``--flag/--no-flag`` for booleans, and unset (None) unless given, so a ``--config`` file's value stands."""
    name, kind, doc, required = flag["name"], flag["type"], flag["help"], flag["required"]
    if flag["positional"]:
        many = "list" in kind
        parser.add_argument(name, nargs="+" if many else None, type=str, help=doc, metavar=name.upper())
        return
    hint = type_from_text(kind)
    option = "--" + name.replace("_", "-")
    text = f"{doc} (type: {kind}, {'required' if required else 'default: ' + flag['default']})"
    parser._flag_kinds[name] = kind
    if hint is bool:
        parser.add_argument(option, dest=name, action=ActionYesNo(no_prefix="no-"), default=None,
                            help=text.replace("%", "%%"))
        return
    parser.add_argument(option, dest=name, type=hint | None if not required else hint, default=None,
                        required=required, help=text.replace("%", "%%"),
                        metavar=_metavar(kind))


def _subparser(entry: dict[str, Any]) -> ArgumentParser:
    parser = ArgumentParser(description=entry["description"], exit_on_error=True)
    parser._flag_kinds = {}
    groups: dict[str, Any] = {}
    for flag in entry["flags"]:
        target = parser
        if flag["group"]:
            if flag["group"] not in groups:
                groups[flag["group"]] = parser.add_argument_group(flag["group"])
                groups[flag["group"]]._flag_kinds = parser._flag_kinds
            target = groups[flag["group"]]
        _add_flag(target, flag)
    return parser


def build_parser(table: dict[str, Any] | None = None) -> ArgumentParser:
    """The ``loramix`` parser: one sub-command per entry of the command table (``skills`` holds its own). It is
    built from ``spec.json`` (default) and imports no command module: those load when a command runs."""
    table = command_table() if table is None else table
    parser = ArgumentParser(prog="loramix", description="Mixture-of-LoRA-Experts fine-tuning")
    sub = parser.add_subcommands(dest="command", required=True)
    for name, entry in table.items():
        if "commands" not in entry:
            sub.add_subcommand(name, _subparser(entry), help=entry["summary"])
            continue
        group = ArgumentParser(description=entry["description"])
        sub.add_subcommand(name, group, help=entry["summary"])
        group_sub = group.add_subcommands(dest="subcommand", required=True)
        for sub_name, sub_entry in entry["commands"].items():
            group_sub.add_subcommand(sub_name, _subparser(sub_entry), help=sub_entry["summary"])
    return parser


def _parse(argv: list[str] | None) -> tuple[Command, list[str], dict[str, Any]]:
    """The command a command line names, the names of its flags, and the keyword arguments its flags give."""
    cfg = build_parser().parse_args(argv)
    name = cfg["command"]
    cmd, node, entry = COMMANDS[name], cfg[name], command_table()[name]
    while isinstance(cmd, dict):  # a group such as `skills`: its own sub-command
        name = node["subcommand"]
        cmd, node, entry = cmd[name], node[name], entry["commands"][name]
    kwargs = {k: v for k, v in node.as_dict().items() if v is not None and k != "subcommand"}
    return cmd, [f["name"] for f in entry["flags"] if not f["positional"]], kwargs


def parse(argv: list[str] | None = None) -> tuple[Callable, dict[str, Any]]:
    """The function a command line names and the keyword arguments its flags give (unset flags left out)."""
    cmd, _, kwargs = _parse(argv)
    return _resolve(cmd.fn), kwargs


def _file_keys(path: Any) -> set[str]:
    """The top-level keys of a ``--config`` options file (none when it is absent or not a YAML mapping)."""
    if not isinstance(path, str) or not os.path.isfile(path):
        return set()
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return set()
    return {str(k) for k in data} if isinstance(data, dict) else set()


def flag_message(message: str, names: list[str]) -> str:
    """A library error as the command line says it: the options it names become the command's flags.

    ``data_dir=...`` becomes ``--data-dir=...``; ``max_steps: must be ...`` and ``TrainConfig.output_dir: ...``
    become ``--max-steps: ...`` and ``--output-dir: ...``; any other option name with an underscore becomes its
    flag wherever it stands as a word. A name without an underscore (``model``) is changed only before ``=``, at
    the start of the message or after ``SomeConfig.``, where it cannot be an ordinary word."""
    for name in sorted(names, key=len, reverse=True):
        flag = "--" + name.replace("_", "-")
        edge = r"(?<![\w.$/'\"-])"
        message = re.sub(rf"\b[A-Z]\w*Config\.{name}\b", flag, message)
        message = re.sub(rf"{edge}{name}(?==)", flag, message)
        message = re.sub(rf"^{name}(?=:)", flag, message)
        if "_" in name:
            message = re.sub(rf"{edge}{name}(?![\w/-]|\.\w)", flag, message)
    return message


REPORTS = {"train": "loramix.train:summary_text", "skills_export": "loramix.skills.export:export_summary"}
"""Commands whose result is printed as a few lines of text by a library function (the full result is in a
file of the run, e.g. summary.json)."""
PRINTS_RESULT = {"skills_add", "skills_route", "skills_generate", "skills_list", "skills_compare_static"}
EXIT_INTERRUPTED = 130
"""Exit status of a run stopped by Ctrl-C (128 + SIGINT), after its checkpoint is saved; a run stopped by SIGTERM
exits with 143 (128 + SIGTERM)."""


def _signal_exit(name: str | None) -> int:
    """128 + the signal's number (the shell's status of a process ended by that signal); Ctrl-C's without one."""
    import signal

    return 128 + int(getattr(signal, name)) if name in ("SIGINT", "SIGTERM") else EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    cmd, names, kwargs = _parse(argv)
    fn = _resolve(cmd.fn)
    from_file = _file_keys(kwargs.get("config")) - set(kwargs)  # an error about these names the file's field
    names = [n for n in names if n not in from_file]
    tune_malloc()  # before any model exists; LORAMIX_TUNE_MALLOC=0 opts out
    try:
        result = fn(**kwargs)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError, OSError) as e:
        if os.environ.get("LORAMIX_DEBUG"):
            raise
        message = flag_message(" ".join(str(e).split()), names)  # one line, naming flags
        print(f"loramix: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a second Ctrl-C / SIGTERM (StopAborted) or a Ctrl-C outside training
        signum = getattr(e, "signum", None)
        print(f"loramix: aborted by {e}" if signum else "loramix: interrupted", file=sys.stderr)
        return 128 + signum if signum else EXIT_INTERRUPTED
    if isinstance(result, dict) and fn.__name__ in REPORTS:
        print(_resolve(REPORTS[fn.__name__])(result))
    elif isinstance(result, dict) and fn.__name__ in PRINTS_RESULT:  # the others print their own report
        print(json.dumps(result, indent=2, default=str))
    if isinstance(result, dict) and result.get("interrupted") is True:
        by = f" by {result['stop_signal']}" if result.get("stop_signal") else ""
        print(f"loramix: interrupted{by}; the checkpoint is saved (continue with --resume true)", file=sys.stderr)
        return _signal_exit(result.get("stop_signal"))
    return 0

