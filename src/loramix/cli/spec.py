"""Writes ``spec.json``, the command table the ``loramix`` parser is built from: every command's summary,
description and flags, read from the command functions' signatures and docstrings and their option dataclasses.
With it, ``loramix --help`` and ``loramix <command> --help`` import no command module (nor torch).

Regenerate after changing a command's signature, docstring or option dataclass::

    python -m loramix.cli.spec

A test checks that the shipped table matches the code.
"""

from __future__ import annotations

import json

from . import SPEC_FILE, describe_commands


def spec_json() -> str:
    """The command table as ``spec.json`` holds it."""
    return json.dumps(describe_commands(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    SPEC_FILE.write_text(spec_json())
    print(f"wrote {SPEC_FILE}")
