"""Command line: each sub-command is a plain library function; flags come from its signature or config
dataclasses, and the help text from their docstrings. The library never imports this module."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import yaml

from ..allocator import tune_malloc
from ..config import field_docs

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
    "export": Command("loramix.export:export_command"),
    "skills": {
        "add": Command("loramix.skills.api:skills_add", tuple(TRAIN_OPTIONS), ("name",)),
        "route": Command("loramix.skills.api:skills_route", (), ("prompts",)),
        "generate": Command("loramix.skills.api:skills_generate", (), ("prompts",)),
        "list": Command("loramix.skills.api:skills_list"),
        "compare-static": Command("loramix.skills.api:skills_compare_static", (), ("prompts",)),
    },
    "continual": Command("loramix.cli.commands:continual_command", ("loramix.continual.config:ContinualConfig",)),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``loramix train: error: argument --max-steps: ...`` (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_value(text: str) -> Any:
    """A flag value: int, float (``5e-3`` too, which YAML 1.1 reads as a string), or any YAML value."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        from ..config import yaml_error_text

        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a value ({yaml_error_text(e)})") from None


def parse_int(text: str) -> int:
    """A flag value that must be an integer."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def parse_float(text: str) -> float:
    """A flag value that must be a number."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


TYPED_FLAGS = {"int": parse_int, "int|None": parse_int, "float": parse_float, "float|None": parse_float}


def _resolve(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _param_docs(fn: Callable) -> dict[str, str]:
    """``name: text`` lines from a Google-style ``Args:`` section."""
    docs: dict[str, str] = {}
    current = None
    for line in (inspect.getdoc(fn) or "").splitlines():
        stripped = line.strip()
        head, sep, rest = stripped.partition(":")
        if sep and head.isidentifier() and line.startswith("    ") and not line.startswith("        "):
            current = head
            docs[head] = rest.strip()
        elif current and line.startswith("        "):
            docs[current] += " " + stripped
    return docs


def _add_flag(
    parser: Any, name: str, annotation: str, default: Any, doc: str, required: bool = False, positional: bool = False
) -> None:
    if positional:
        kind = annotation.replace(" ", "")
        nargs = "+" if kind.startswith("list") or "|list" in kind else None
        parser.add_argument(name, nargs=nargs, help=doc.replace("%", "%%"), metavar=name.upper())
        return
    flag = "--" + name.replace("_", "-")
    text = f"{doc} (required)" if required else f"{doc} (default: {default!r})"
    text = text.replace("%", "%%")
    if annotation.strip() == "bool":
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
    elif annotation.replace(" ", "") in ("str", "str|None", "Path|None", "str|Path|None", "str|Path"):
        parser.add_argument(flag, dest=name, default=None, help=text, metavar="STR", required=required)
    elif annotation.replace(" ", "") in TYPED_FLAGS:
        kind = annotation.replace(" ", "")
        parser.add_argument(flag, dest=name, type=TYPED_FLAGS[kind], default=None, help=text,
                            metavar=kind.split("|")[0].upper(), required=required)
    else:  # lists, maps, unions: parsed as YAML ("[4, 8]", "{0: 2}", "true"), numbers as numbers
        parser.add_argument(flag, dest=name, type=parse_value, default=None, help=text, metavar="VALUE",
                            required=required)


def _add_command(sub: Any, name: str, cmd: Command) -> None:
    try:
        fn = _resolve(cmd.fn)
    except (ImportError, AttributeError):
        return  # a command whose module is not available in this install
    summary = (inspect.getdoc(fn) or "").split("\n")[0]
    p = sub.add_parser(name, help=summary, description=inspect.getdoc(fn),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    docs = _param_docs(fn)
    seen: set[str] = set()
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL) or pname == "callbacks":
            continue
        seen.add(pname)
        required = param.default is inspect.Parameter.empty
        default = None if required else param.default
        help_text = docs.get(pname, "")
        if pname == "config" and cmd.option_classes:
            help_text = help_text or "YAML file of options (flags override it)"
        _add_flag(p, pname, str(param.annotation), default, help_text, required, pname in cmd.positional)
    for ref in cmd.option_classes:  # option dataclasses: every field is a flag (collected in **options)
        cls = _resolve(ref)
        field_help = field_docs(cls)
        group = p.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            _add_flag(group, f.name, str(f.type), default, field_help.get(f.name, ""))
    p.set_defaults(_fn=fn)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="loramix", description="Mixture-of-LoRA-Experts fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        if isinstance(cmd, Command):
            _add_command(sub, name, cmd)
            continue
        group = sub.add_parser(name, help=f"{name} sub-commands: {', '.join(cmd)}")
        group_sub = group.add_subparsers(dest="subcommand", required=True)
        for sub_name, sub_cmd in cmd.items():
            _add_command(group_sub, sub_name, sub_cmd)
    return parser


REPORTS = {"train": "loramix.train:summary_text"}
"""Commands whose result is printed as a few lines of text by a library function (the full result is in a
file of the run, e.g. summary.json)."""
PRINTS_RESULT = {"skills_add", "skills_route", "skills_generate", "skills_list", "skills_compare_static"}
EXIT_INTERRUPTED = 130
"""Exit status of a run stopped by Ctrl-C (128 + SIGINT), after its checkpoint is saved."""


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    fn = args.pop("_fn")
    args.pop("command")
    args.pop("subcommand", None)
    kwargs = {k: v for k, v in args.items() if v is not None}
    tune_malloc()  # before any model exists; LORAMIX_TUNE_MALLOC=0 opts out
    try:
        result = fn(**kwargs)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError, OSError) as e:
        if os.environ.get("LORAMIX_DEBUG"):
            raise
        print(f"loramix: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt:
        print("loramix: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(result, dict) and fn.__name__ in REPORTS:
        print(_resolve(REPORTS[fn.__name__])(result))
    elif isinstance(result, dict) and fn.__name__ in PRINTS_RESULT:  # the others print their own report
        print(json.dumps(result, indent=2, default=str))
    if isinstance(result, dict) and result.get("interrupted") is True:
        print("loramix: interrupted; the checkpoint is saved (continue with --resume true)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0

