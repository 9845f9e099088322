"""Command line: each sub-command is a plain library function; flags come from its signature or config
dataclasses, and the help text from their docstrings. The library never imports this module."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import json
import os
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import yaml

# sub-command -> ("module:function", config dataclasses whose fields become flags)
COMMANDS: dict[str, tuple[str, list[str]]] = {
    "train": ("loramix.train:train", ["loramix.train:TrainConfig", "loramix.data:DataConfig",
                                      "loramix.config:MixLoraConfig"]),
    "generate": ("loramix.commands:generate_command", []),
    "chat": ("loramix.commands:chat_command", []),
    "eval": ("loramix.commands:eval_command", []),
    "compare": ("loramix.commands:compare_command", []),
    "bench": ("loramix.commands:bench_command", []),
}


def parse_value(text: str) -> Any:
    """A flag value: int, float (``5e-3`` too, which YAML 1.1 reads as a string), or any YAML value."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def _resolve(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def field_docs(cls: type) -> dict[str, str]:
    """The string literal written under each dataclass field (its documentation)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        is_field = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
        if is_field and is_doc:
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


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
    parser: argparse.ArgumentParser, name: str, annotation: str, default: Any, doc: str, required: bool = False
) -> None:
    flag = "--" + name.replace("_", "-")
    text = f"{doc} (required)" if required else f"{doc} (default: {default!r})"
    text = text.replace("%", "%%")
    if annotation.strip() == "bool":
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
    elif annotation.replace(" ", "") in ("str", "str|None", "Path|None", "str|Path|None", "str|Path"):
        parser.add_argument(flag, dest=name, default=None, help=text, metavar="STR", required=required)
    else:  # numbers, lists, maps, unions: parsed as YAML ("8", "[4, 8]", "{0: 2}", "true")
        parser.add_argument(flag, dest=name, type=parse_value, default=None, help=text, metavar="VALUE",
                            required=required)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramix", description="Mixture-of-LoRA-Experts fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn_ref, config_refs) in COMMANDS.items():
        try:
            fn = _resolve(fn_ref)
        except (ImportError, AttributeError):
            continue  # a command whose module is not available in this install
        summary = (inspect.getdoc(fn) or "").split("\n")[0]
        p = sub.add_parser(name, help=summary, description=inspect.getdoc(fn),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        seen: set[str] = set()
        if config_refs:
            p.add_argument("--config", default=None, help="YAML file of options (flags override it)")
            for ref in config_refs:
                cls = _resolve(ref)
                docs = field_docs(cls)
                group = p.add_argument_group(cls.__name__)
                for f in dataclasses.fields(cls):
                    if f.name in seen:
                        continue
                    seen.add(f.name)
                    default = f.default if f.default is not dataclasses.MISSING else None
                    _add_flag(group, f.name, str(f.type), default, docs.get(f.name, ""))
        else:
            docs = _param_docs(fn)
            for pname, param in inspect.signature(fn).parameters.items():
                if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                    continue
                required = param.default is inspect.Parameter.empty
                default = None if required else param.default
                _add_flag(p, pname, str(param.annotation), default, docs.get(pname, ""), required)
        p.set_defaults(_fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    fn = args.pop("_fn")
    args.pop("command")
    kwargs = {k: v for k, v in args.items() if v is not None}
    try:
        result = fn(**kwargs)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError, OSError) as e:
        if os.environ.get("LORAMIX_DEBUG"):
            raise
        print(f"loramix: error: {e}", file=sys.stderr)
        return 2
    if isinstance(result, dict) and fn.__name__ == "train":  # other commands print their own report
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
