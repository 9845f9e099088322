"""``docs/configuration.md``: every option of every config dataclass, written from the dataclasses themselves
(field, type, default and the documentation written under the field). A test keeps the page in sync.

Regenerate with ``python -m loramix.cli.reference docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import typing
from pathlib import Path

from . import _type_text, field_docs

SECTIONS = [
    ("loramix.config:MixLoraConfig", "The adapter",
     "What `inject` builds: experts, router, attention LoRA and the aux losses. Saved in the adapter's "
     "`adapter_config.json`; `loramix train`, `loramix compare` and `loramix skills add` take every field as a "
     "flag."),
    ("loramix.train:TrainConfig", "Training",
     "The training run of `loramix train` (and `loramix skills add`): model, steps, optimiser, precision, "
     "checkpoints."),
    ("loramix.data:DataConfig", "Data",
     "Where the examples come from and how they become token sequences (`loramix train`, `loramix skills add`)."),
    ("loramix.continual.config:ContinualConfig", "Continual learning",
     "`loramix continual`: the task stream, novelty detection, experts and routing."),
]

HEADER = """# Configuration

Every option below is a field of a config dataclass. The same name works as a YAML key in a `--config` file,
as a command-line flag (`num_experts` is `--num-experts`; booleans take `--flag` / `--no-flag`; lists and maps
are written as YAML, e.g. `--expert-targets "[up, down]"`) and as a keyword argument of the Python function
(`loramix.train.train(num_experts=8)`). Flags override the `--config` file. Values are checked when the config
is built, and a wrong one is refused with the field's name.

This page is written from the dataclasses (`python -m loramix.cli.reference docs/configuration.md`); a test
checks that it matches them.
"""


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()!r}`"
    return "required"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def configuration_markdown() -> str:
    """The configuration reference page as Markdown."""
    parts = [HEADER]
    for ref, title, intro in SECTIONS:
        module, name = ref.split(":")
        cls = getattr(importlib.import_module(module), name)
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        parts.append(f"\n## {title} (`{name}`)\n\n{intro}\n\n")
        parts.append("| option | type | default | meaning |\n|---|---|---|---|\n")
        for field in dataclasses.fields(cls):
            if not field.init:
                continue
            kind = _cell(_type_text(hints[field.name]))
            parts.append(f"| `{field.name}` | {kind} | {_cell(_default_text(field))} | "
                         f"{_cell(docs.get(field.name, ''))} |\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = configuration_markdown()
    if args:
        Path(args[0]).write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
