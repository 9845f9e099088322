"""Turn real data sets into tokenized causal-LM training examples.

Pipeline (``build_datasets``): load rows with HF ``datasets`` (hub name or local file) -> keep the first
``limit`` rows -> resolve the format and field names (auto-detected unless given) -> normalize every row to a
chat (``list[{role, content}]``) or a plain text, failing with file / row / field on bad rows -> split off a
validation set -> render with the tokenizer's chat template (or a plain ``### Instruction`` template) ->
tokenize, mask prompt tokens with -100 -> truncate or skip over-long rows -> optionally pack into
``max_length`` blocks.

Each example ends up with ``input_ids``, ``attention_mask`` and ``labels`` only, so ``DataCollator`` (or any
HF collator) and ``transformers.Trainer`` take the data sets as they are.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
from transformers import DataCollatorForSeq2Seq

from loramix.config import ConfigError

logger = logging.getLogger(__name__)

FORMATS = ("auto", "prompt_response", "instruction", "messages", "text")
TRUNCATION_MODES = ("truncate", "skip")
IGNORE_INDEX = -100

# Local file suffix -> (datasets builder, extra builder kwargs).
# CSV/TSV: keep_default_na=False so texts such as "NA" or "None" stay strings (empty cells become "");
# TSV: quoting=3 (csv.QUOTE_NONE) because GLUE-style TSVs are unquoted and may contain stray quotes.
_FILE_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".csv": ("csv", {"keep_default_na": False}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": 3, "keep_default_na": False}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}

# Auto-detected field names, matched case-insensitively, first hit wins.
CANDIDATES: dict[str, tuple[str, ...]] = {
    "messages_field": ("messages", "conversations", "conversation"),
    "instruction_field": ("instruction",),
    "input_field": ("input", "context", "dialogue"),
    "output_field": ("output", "response", "completion", "answer", "summary"),
    "prompt_field": ("prompt", "context", "question", "query", "input", "dialogue", "source", "text"),
    "response_field": ("response", "completion", "answer", "output", "target", "summary", "code"),
    "text_field": ("text", "content", "sentence", "document"),
}

# Fields each format needs (optional ones may be absent or null in a row).
_REQUIRED = {
    "prompt_response": ("prompt_field", "response_field"),
    "instruction": ("instruction_field", "output_field"),
    "messages": ("messages_field",),
    "text": ("text_field",),
}
_OPTIONAL = {"instruction": ("input_field",)}

# Roles accepted in message lists, mapped to chat-template roles (ShareGPT's from/value included).
_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}

# Per-row outcome codes of the tokenization pass.
_OK, _TRUNCATED, _SKIPPED, _NO_TARGET, _EMPTY = 0, 1, 2, 3, 4


class DataConfigError(ConfigError):
    """A DataConfig value is invalid; the message names the field."""


class DataError(ValueError):
    """The data itself is unusable; the message names the file, and the row and field where it applies."""


def _fail(field_name: str, msg: str) -> None:
    raise DataConfigError(f"DataConfig.{field_name}: {msg}")


@dataclass
class DataConfig:
    """Where the training data comes from and how it becomes token sequences."""

    data: str
    """Hub data set name (``datasets.load_dataset``) or a local file (.json list or JSON lines, .jsonl, .csv,
    .tsv, .parquet, .txt = one text row per line) or directory. A relative path not found from the working
    directory is looked up under ``$LORAMIX_DATA_DIR``. Several sources of one format, comma-separated,
    are concatenated (``limit`` applies to each)."""
    split: str = "train"
    """Split of a hub data set (slicing such as ``train[:1000]`` works); a local file is one split."""
    subset: str | None = None
    """Hub data set configuration name (e.g. ``wikitext-2-raw-v1``)."""
    format: str = "auto"
    """One of auto, prompt_response, instruction, messages, text; auto picks from the fields present."""
    prompt_field: str | None = None
    """prompt_response format: the user turn's field; None = auto-detected from ``CANDIDATES``."""
    response_field: str | None = None
    """prompt_response format: the reply's field; None = auto-detected from ``CANDIDATES``."""
    instruction_field: str | None = None
    """instruction format: the instruction's field; None = auto-detected from ``CANDIDATES``."""
    input_field: str | None = None
    """Optional second part of the user turn (Alpaca ``input``); a null or empty value is left out."""
    output_field: str | None = None
    """instruction format: the reply's field; None = auto-detected from ``CANDIDATES``."""
    messages_field: str | None = None
    """A list of ``{role, content}`` (or ShareGPT ``{from, value}``) dicts per row."""
    text_field: str | None = None
    """Field names; None = auto-detected (case-insensitively) from ``CANDIDATES``."""
    system_prompt: str | None = None
    """System message put before every conversation that does not start with one."""
    max_length: int = 512
    """Longest example in tokens (and the block size when packing)."""
    truncation: str = "truncate"
    """Over-long rows: ``truncate`` keeps the first max_length tokens, ``skip`` drops the row; counted."""
    train_on_prompt: bool = False
    """False: loss on assistant/response tokens only (labels -100 elsewhere); True: loss on every token."""
    use_chat_template: bool = True
    """Render through ``tokenizer.apply_chat_template`` when the tokenizer has a template; otherwise (or when
    False) use the plain ``### Instruction:`` / ``### Response:`` template."""
    packing: bool = False
    """Concatenate tokenized examples (labels kept) and cut them into max_length blocks."""
    val_size: float | int = 0.05
    """Validation rows split off the training data: a fraction in [0, 1) or a row count; 0 = none.
    Ignored when ``val_data`` is given."""
    val_data: str | None = None
    """A separate validation file / hub name, read like ``data`` (same format, fields auto-detected anew)."""
    val_split: str = "validation"
    """Split used when ``val_data`` is a hub data set."""
    seed: int = 42
    """Seed of the train/validation split."""
    limit: int | None = None
    """Keep only the first ``limit`` rows of each loaded data set (quick runs)."""
    num_proc: int | None = None
    """Worker processes for tokenization (``datasets.map``)."""
    cache_dir: str | None = None
    """``datasets`` cache directory; None = the library default."""

    def __post_init__(self) -> None:
        if isinstance(self.data, os.PathLike):
            self.data = os.fspath(self.data)
        if isinstance(self.val_data, os.PathLike):
            self.val_data = os.fspath(self.val_data)
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.data, str) or not self.data.strip():
            _fail("data", f"must be a non-empty hub name or file path, got {self.data!r}")
        for name in ("split", "val_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                _fail(name, f"must be a non-empty string, got {getattr(self, name)!r}")
        if self.format not in FORMATS:
            _fail("format", f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        for name in (*CANDIDATES, "subset", "system_prompt", "val_data", "cache_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                _fail(name, f"must be None or a non-empty string, got {value!r}")
        if not _is_int(self.max_length) or self.max_length < 2:
            _fail("max_length", f"must be an int >= 2, got {self.max_length!r}")
        if self.truncation not in TRUNCATION_MODES:
            _fail("truncation", f"must be one of {', '.join(TRUNCATION_MODES)}, got {self.truncation!r}")
        for name in ("train_on_prompt", "use_chat_template", "packing"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, f"must be a bool, got {getattr(self, name)!r}")
        v = self.val_size
        if _is_int(v):
            if v < 0:
                _fail("val_size", f"a row count must be >= 0, got {v}")
        elif isinstance(v, float):
            if not 0.0 <= v < 1.0:
                _fail("val_size", f"a fraction must be in [0, 1), got {v}")
        else:
            _fail("val_size", f"must be a fraction (float) or a row count (int), got {v!r}")
        if not _is_int(self.seed):
            _fail("seed", f"must be an int, got {self.seed!r}")
        if self.limit is not None and (not _is_int(self.limit) or self.limit < 1):
            _fail("limit", f"must be None or an int >= 1, got {self.limit!r}")
        if self.num_proc is not None and (not _is_int(self.num_proc) or self.num_proc < 1):
            _fail("num_proc", f"must be None or an int >= 1, got {self.num_proc!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for saving next to a run)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Build from a dict (YAML/JSON config); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataConfigError(f"DataConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def resolve_local(data: str) -> Path | None:
    """Local path for ``data``, or None for a hub name. Raises if it looks like a file but is absent."""
    p = Path(data).expanduser()
    if p.exists():
        return p
    env_dir = os.environ.get("LORAMIX_DATA_DIR")
    if env_dir and not p.is_absolute() and (Path(env_dir) / p).exists():
        return Path(env_dir) / p
    looks_local = (
        p.suffix.lower() in _FILE_BUILDERS
        or p.is_absolute()
        or data.startswith((".", "~"))
        or data.count("/") > 1
    )
    if looks_local:
        tried = [str(p)] + ([str(Path(env_dir) / p)] if env_dir and not p.is_absolute() else [])
        raise FileNotFoundError(f"data file not found: {data} (tried {', '.join(tried)})")
    return None


def load_data_source(data: str, split: str, cfg: DataConfig) -> tuple[datasets.Dataset, str]:
    """Load one data source as a Dataset; returns it with a human-readable source name for messages."""
    path = resolve_local(data)
    if path is None:
        source = f"{data} (split {split!r})"
        try:
            ds = datasets.load_dataset(data, cfg.subset, split=split, cache_dir=cfg.cache_dir)
        except Exception as e:  # noqa: BLE001 - re-raised with the source named
            raise DataError(f"could not load hub data set {source}: {type(e).__name__}: {e}") from e
    elif path.is_dir():
        source = str(path)
        try:
            ds = datasets.load_dataset(str(path), split=split, cache_dir=cfg.cache_dir)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"could not load data directory {source}: {type(e).__name__}: {e}") from e
    else:
        source = str(path)
        suffix = path.suffix.lower()
        if suffix not in _FILE_BUILDERS:
            raise DataError(
                f"{source}: unsupported file type {suffix!r}; use one of {', '.join(sorted(_FILE_BUILDERS))}"
            )
        if path.stat().st_size == 0 or _only_whitespace(path):
            raise DataError(f"data file is empty: {source}")
        builder, kwargs = _FILE_BUILDERS[suffix]
        if builder != "parquet":
            _check_utf8(path)
        try:
            ds = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cfg.cache_dir, **kwargs
            )
        except Exception as e:  # noqa: BLE001
            cause = e.__cause__ or e.__context__ or e
            if "corresponds to no data" in str(e):
                raise DataError(f"data file has no rows: {source}") from e
            if builder == "json":
                _raise_json_error(path)
            raise DataError(f"could not read {source} as {builder}: {type(cause).__name__}: {cause}") from e
    if isinstance(ds, datasets.DatasetDict):  # a hub name without a split that matched; be explicit
        raise DataError(f"{source}: split {split!r} not found; available: {list(ds)}")
    if len(ds) == 0:
        raise DataError(f"data file has no rows: {source}")
    if cfg.limit is not None and len(ds) > cfg.limit:
        ds = ds.select(range(cfg.limit))
    return ds, source


def _check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Raise DataError naming the line and byte of the first invalid UTF-8 sequence in a text data file."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            block = f.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                bad = offset + e.start - len(decoder.getstate()[0]) if e.start >= 0 else offset
                with path.open("rb") as g:
                    before = g.read(max(bad, 0))
                line = before.count(b"\n") + 1
                column = len(before) - (before.rfind(b"\n") + 1) + 1
                raise DataError(
                    f"{path}, line {line}: not UTF-8 text (byte {column} of the line is {e.object[e.start]:#04x}); "
                    "save the file as UTF-8"
                ) from None
            if not block:
                return
            offset += len(block)


def _raise_json_error(path: Path) -> None:
    """Find why a .json/.jsonl file failed to load and raise DataError naming the line (counted from 1);
    returns when every line (or the whole JSON document) parses, i.e. the problem lies elsewhere."""
    import json

    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # one JSON document (a list of rows)
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}, line {number}: not valid JSON ({e.msg}, column {e.colno}); a JSON-lines file holds one "
                "JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")


def _only_whitespace(path: Path, probe: int = 1 << 16) -> bool:
    """True for a small file holding only whitespace (big files are assumed to hold data)."""
    if path.stat().st_size > probe:
        return False
    return not path.read_bytes().strip()


def load_records(cfg: DataConfig, *, val: bool = False) -> datasets.Dataset:
    """Load the raw rows of ``cfg.data`` (or of ``cfg.val_data`` with ``val=True``), first ``cfg.limit`` only.

    Hub names go through ``datasets.load_dataset(name, cfg.subset, split=...)``; local files through the
    matching ``datasets`` builder. The fields the configured (or detected) format needs are checked here, so
    a wrong field name fails before any tokenization. Returns a ``datasets.Dataset`` (one split).
    """
    if val and cfg.val_data is None:
        raise DataConfigError("DataConfig.val_data: load_records(val=True) needs val_data to be set")
    data, split = (cfg.val_data, cfg.val_split) if val else (cfg.data, cfg.split)
    ds, source = _load_sources(data, split, cfg, field_name="val_data" if val else "data")
    resolve_format(ds, cfg, source=source)
    return ds


def _load_sources(data: str, split: str, cfg: DataConfig, *, field_name: str) -> tuple[datasets.Dataset, str]:
    """:func:`load_data_source` for one source, or for a comma-separated list of sources of one format, which are
    checked one by one (a missing field names its file) and concatenated on their shared columns."""
    if "," not in data:
        return load_data_source(data, split, cfg)
    parts = [part.strip() for part in data.split(",")]
    if not all(parts):
        raise DataConfigError(f"DataConfig.{field_name}: empty name in the list {data!r}")
    loaded = []
    for part in parts:
        ds, source = load_data_source(part, split, cfg)
        loaded.append((ds, source, resolve_format(ds, cfg, source=source)))
    first_ds, first_source, first_format = loaded[0]
    for _ds, source, fmt in loaded[1:]:
        if fmt != first_format:
            raise DataError(
                f"{source}: format/fields {fmt} differ from {first_source}'s {first_format}; "
                "a comma-separated list must share one format"
            )
    keep = [c for c in first_ds.column_names if all(c in ds.column_names for ds, _, _ in loaded)]
    joined = datasets.concatenate_datasets([ds.select_columns(keep) for ds, _, _ in loaded])
    return joined, " + ".join(source for _, source, _ in loaded)


# ------------------------------------------------------------------------------------------------
# Formats and normalization
# ------------------------------------------------------------------------------------------------


def _row_fields(row: dict[str, Any]) -> list[str]:
    return [k for k, v in row.items() if v is not None]


def _pick(columns: Sequence[str], names: Sequence[str], exclude: set[str] = frozenset()) -> str | None:
    """First candidate name present in ``columns`` (case-insensitive), skipping ``exclude``."""
    lower = {c.lower(): c for c in columns}
    for name in names:
        col = lower.get(name.lower())
        if col is not None and col not in exclude:
            return col
    return None


def resolve_format(
    ds: datasets.Dataset, cfg: DataConfig, *, source: str = "data"
) -> tuple[str, dict[str, str]]:
    """Decide the format and the field names used for ``ds``.

    Returns ``(format, {"prompt_field": "Context", ...})`` holding only the fields the format uses.
    Raises ``DataError`` naming the file, row 1, the missing field and the fields the rows do have.
    """
    columns = list(ds.column_names)
    first = ds[0]
    have = f"rows have fields: {', '.join(columns)}"

    def given(name: str) -> str | None:
        return getattr(cfg, name)

    fmt = cfg.format
    if fmt == "auto":
        msg_col = given("messages_field") or _pick(columns, CANDIDATES["messages_field"])
        if given("messages_field") or (msg_col is not None and isinstance(first.get(msg_col), list)):
            fmt = "messages"
        elif (
            given("instruction_field")
            or given("output_field")
            or given("input_field")
            or (
                _pick(columns, CANDIDATES["instruction_field"]) and _pick(columns, CANDIDATES["output_field"])
            )
        ):
            fmt = "instruction"
        elif given("prompt_field") or given("response_field") or _detect_pair(columns):
            fmt = "prompt_response"
        elif given("text_field") or _pick(columns, CANDIDATES["text_field"]):
            fmt = "text"
        else:
            raise DataError(
                f"{source}: could not detect the data format from the fields of row 1 "
                f"({', '.join(columns)}); "
                "set DataConfig.format and the field names (e.g. prompt_field/response_field, "
                "instruction_field/output_field, messages_field or text_field)"
            )

    fields: dict[str, str] = {}
    pair = _detect_pair(columns) if fmt == "prompt_response" and not given("prompt_field") else None
    if pair is not None and not given("response_field"):
        fields["prompt_field"] = pair[0]  # a prompt that leaves a response column (e.g. input/output)
    for name in _REQUIRED[fmt] + _OPTIONAL.get(fmt, ()):
        col = fields.get(name) or given(name)
        if col is None:
            col = _pick(
                columns, CANDIDATES[name], exclude=set(fields.values()) | {given(n) for n in CANDIDATES}
            )
        if col is None or col not in columns:
            if name in _OPTIONAL.get(fmt, ()) and col is None:
                continue
            shown = col if col is not None else f"one of {list(CANDIDATES[name])}"
            raise DataError(
                f"{source}: row 1 has no field {shown!r} ({name}, needed by format {fmt!r}); {have}"
            )
        fields[name] = col
    return fmt, fields


def _detect_pair(columns: Sequence[str]) -> tuple[str, str] | None:
    """(prompt, response) columns for auto-detected prompt/response data, or None."""
    for p in CANDIDATES["prompt_field"]:
        pcol = _pick(columns, (p,))
        if pcol is None:
            continue
        rcol = _pick(columns, CANDIDATES["response_field"], exclude={pcol})
        if rcol is not None:
            return pcol, rcol
    return None


def _as_text(value: Any, *, source: str, row: int, field: str, role: str, record: dict[str, Any]) -> str:
    """A field's value as a string: str as is, int/float converted; null or other types are errors."""
    if value is None:
        raise DataError(
            f"{source}, row {row}: field {field!r} ({role}) is missing or null; "
            f"this row has fields: {', '.join(_row_fields(record))}"
        )
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(
        f"{source}, row {row}: field {field!r} ({role}) must be a string, got {type(value).__name__}: "
        f"{str(value)[:80]!r}"
    )


def record_to_messages(
    record: dict[str, Any],
    fmt: str,
    fields: dict[str, str],
    *,
    system_prompt: str | None = None,
    source: str = "data",
    row: int = 1,
) -> list[dict[str, str]]:
    """One row as a chat: ``[{role, content}, ...]`` (not for the ``text`` format). ``row`` (counted from 1)
    only names the row in error messages.

    prompt_response -> user=prompt, assistant=response; instruction -> user=instruction (+ blank line +
    input when non-empty), assistant=output; messages -> validated and role-normalized copy.
    """
    kw = {"source": source, "row": row, "record": record}
    if fmt == "prompt_response":
        f_p, f_r = fields["prompt_field"], fields["response_field"]
        msgs = [
            {"role": "user", "content": _as_text(record.get(f_p), field=f_p, role="prompt_field", **kw)},
            {
                "role": "assistant",
                "content": _as_text(record.get(f_r), field=f_r, role="response_field", **kw),
            },
        ]
    elif fmt == "instruction":
        f_i, f_o = fields["instruction_field"], fields["output_field"]
        user = _as_text(record.get(f_i), field=f_i, role="instruction_field", **kw)
        f_in = fields.get("input_field")
        if f_in is not None and record.get(f_in) is not None:
            extra = _as_text(record.get(f_in), field=f_in, role="input_field", **kw)
            if extra.strip():
                user = f"{user}\n\n{extra}"
        msgs = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _as_text(record.get(f_o), field=f_o, role="output_field", **kw)},
        ]
    elif fmt == "messages":
        msgs = _validate_messages(record, fields["messages_field"], source=source, row=row)
    else:
        raise ValueError(f"record_to_messages does not handle format {fmt!r}")
    if system_prompt is not None and msgs and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def _validate_messages(record: dict[str, Any], field: str, *, source: str, row: int) -> list[dict[str, str]]:
    value = record.get(field)
    where = f"{source}, row {row}: field {field!r} (messages_field)"
    if value is None:
        raise DataError(f"{where} is missing or null; this row has fields: {', '.join(_row_fields(record))}")
    if not isinstance(value, list):
        raise DataError(f"{where} must be a list of {{role, content}} dicts, got {type(value).__name__}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(
                f"{where}: message {j} must be a dict with role and content, got {type(m).__name__}"
            )
        role = m.get("role") if m.get("role") is not None else m.get("from")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        keys = [k for k, v in m.items() if v is not None]
        if not isinstance(role, str) or role.lower() not in _ROLE_ALIASES:
            raise DataError(
                f"{where}: message {j} has role {role!r}; expected one of {sorted(set(_ROLE_ALIASES))} "
                f"(message keys: {keys})"
            )
        if not isinstance(content, str):
            raise DataError(
                f"{where}: message {j} content must be a string, got {type(content).__name__} "
                f"(message keys: {keys})"
            )
        out.append({"role": _ROLE_ALIASES[role.lower()], "content": content})
    return out


def _normalize(
    ds: datasets.Dataset, fmt: str, fields: dict[str, str], cfg: DataConfig, source: str
) -> datasets.Dataset:
    """Validate every row and replace the columns by ``_messages`` (chat) or ``_text`` (text format).
    Errors name rows counted from 1 (in a JSON-lines file without blank lines, row n is line n)."""

    def fn(batch: dict[str, list[Any]], idx: list[int]) -> dict[str, list[Any]]:
        keys = list(batch)
        rows = [{k: batch[k][i] for k in keys} for i in range(len(idx))]
        if fmt == "text":
            f = fields["text_field"]
            kw = {"source": source, "field": f, "role": "text_field"}
            return {
                "_text": [_as_text(r.get(f), row=i + 1, record=r, **kw) for r, i in zip(rows, idx, strict=True)]
            }
        return {
            "_messages": [
                record_to_messages(r, fmt, fields, system_prompt=cfg.system_prompt, source=source, row=i + 1)
                for r, i in zip(rows, idx, strict=True)
            ]
        }

    return ds.map(fn, batched=True, with_indices=True, remove_columns=ds.column_names, desc="Checking rows")


# ------------------------------------------------------------------------------------------------
# Empty responses: the one check every reader of user rows applies (train, continual, skills add)
# ------------------------------------------------------------------------------------------------


def blank_reply(messages: list[dict[str, str]]) -> bool:
    """True for a conversation with assistant turns that are all blank: it teaches nothing but the end-of-turn
    token, and a loss on it measures nothing. Such rows are left out wherever loramix reads user rows."""
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    return bool(replies) and not any(c.strip() for c in replies)


def count_empty_rows(rows: Any, fmt: str, fields: dict[str, str], *, source: str = "data") -> int:
    """How many of ``rows`` (a ``datasets.Dataset`` or a list of dicts, in format ``fmt`` with ``fields`` from
    :func:`resolve_format`) have an empty response (format ``text``: an empty text)."""
    if fmt == "text":
        f = fields["text_field"]
        return sum(1 for r in rows if not str(r.get(f) or "").strip())
    return sum(blank_reply(record_to_messages(r, fmt, fields, source=source, row=i))
               for i, r in enumerate(rows, 1))


def check_not_all_empty(
    rows: Any, n_empty: int, fmt: str, fields: dict[str, str], *, source: str, split: str = "training",
    purpose: str = "train on", mappable: bool = True, n_rows: int | None = None,
) -> None:
    """Refuse a split whose every row has an empty response: a ``DataError`` naming ``source``, and where another
    field of the rows holds the answers (LLM-Adapters' math sets keep them in ``answer`` and leave ``output``
    empty), naming that field and, with ``mappable``, the flag that trains on it. ``n_rows``: the split's rows
    when ``rows`` holds more (the raw file a validation split was taken from); default ``len(rows)``."""
    n = len(rows) if n_rows is None else n_rows
    if n == 0 or n_empty < n:
        return
    what = "text" if fmt == "text" else "response"
    rows_of = f"{split} rows" if split else "rows"
    raise DataError(f"{source}: all {n} {rows_of} have an empty {what}; nothing to {purpose}"
                    + _answer_elsewhere(rows, fmt, fields, mappable))


def _answer_elsewhere(rows: Any, fmt: str, fields: dict[str, str], mappable: bool, probe: int = 1000) -> str:
    """``; field 'output' is empty in every row, but field 'answer' is not ...`` or ``""``."""
    role = {"instruction": "output_field", "prompt_response": "response_field"}.get(fmt)
    if role not in fields:
        return ""
    first = rows[0]
    names = {n.lower() for n in CANDIDATES["output_field"] + CANDIDATES["response_field"]}
    used = set(fields.values())
    sample = rows.select(range(min(len(rows), probe))) if isinstance(rows, datasets.Dataset) else rows[:probe]
    for col in first:
        if col in used or col.lower() not in names:
            continue
        if any(isinstance(r.get(col), (str, int, float)) and str(r.get(col)).strip() for r in sample):
            hint = (f"; field {fields[role]!r} is empty in every row, but field {col!r} is not (LLM-Adapters' "
                    "math sets keep the answer there)")
            if mappable:
                return hint + f": to train on it, pass --{role.replace('_', '-')} {col}"
            return hint + f": copy it into {fields[role]!r} to use it"
    return ""


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------

_SIMPLE_HEADERS = {"system": "### System:", "user": "### Instruction:", "assistant": "### Response:"}


def render_simple(messages: list[dict[str, str]], add_generation_prompt: bool = False, eos: str = "") -> str:
    """Plain template for tokenizers without a chat template.

    ``### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}{eos}``; turns joined by a blank line. A
    rendered conversation always starts with the rendering of each of its prefixes (what the label
    boundary computation relies on).
    """
    parts = []
    for m in messages:
        end = eos if m["role"] == "assistant" else ""
        parts.append(f"{_SIMPLE_HEADERS[m['role']]}\n{m['content']}{end}")
    if add_generation_prompt:
        parts.append(f"{_SIMPLE_HEADERS['assistant']}\n")
    return "\n\n".join(parts)


def uses_chat_template(tokenizer: Any, use_chat_template: bool = True) -> bool:
    """Whether rendering goes through the tokenizer's chat template."""
    return bool(use_chat_template and getattr(tokenizer, "chat_template", None))


def render_messages(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool = False,
    use_chat_template: bool = True,
) -> str:
    """Render a chat to text exactly as training does (chat template when present, else ``render_simple``)."""
    if uses_chat_template(tokenizer, use_chat_template):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return render_simple(messages, add_generation_prompt, eos=tokenizer.eos_token or "")


def build_prompt(
    tokenizer: Any, prompt: str, *, system_prompt: str | None = None, use_chat_template: bool = True
) -> str:
    """Generation prompt for one user message, matching the training rendering (for evaluation/generation).

    Tokenize the result with ``add_special_tokens=not uses_chat_template(tokenizer, use_chat_template)``.
    """
    msgs = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return render_messages(tokenizer, msgs, add_generation_prompt=True, use_chat_template=use_chat_template)


# ------------------------------------------------------------------------------------------------
# Tokenization
# ------------------------------------------------------------------------------------------------


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _tokenize_fn(
    tokenizer: Any, cfg: DataConfig, fmt: str
) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """Batched map function: rows -> input_ids / attention_mask / labels plus bookkeeping columns
    (``_status``, ``_len``, ``_nlab`` and ``_mismatch``: turns whose prefix tokens were not an exact prefix).

    Label boundaries: the whole conversation is tokenized once; for every assistant turn the conversation
    before it is rendered with ``add_generation_prompt=True`` and tokenized, and the turn's labels start where
    that prefix's tokens stop matching the full sequence (normally exactly its length); they end where the
    tokens of the conversation up to and including the turn stop matching. Tokenizing prefixes this way (not
    the response on its own) keeps the full sequence tokenized as a whole, as at inference time.
    """
    chat = uses_chat_template(tokenizer, cfg.use_chat_template)
    add_special = not chat  # chat templates write their own BOS where the model wants one
    eos = tokenizer.eos_token or ""
    max_len, mode, all_labels = cfg.max_length, cfg.truncation, cfg.train_on_prompt

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        if chat:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return render_simple(msgs, gen, eos=eos)

    def encode(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return tokenizer(texts, add_special_tokens=add_special)["input_ids"]

    def fn(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        status: list[int] = []
        mismatch = [0] * len(next(iter(batch.values())))
        if fmt == "text":
            texts = batch["_text"]
            ids_list = tokenizer([t + eos for t in texts], add_special_tokens=True)["input_ids"]
            labels_list = [list(ids) for ids in ids_list]
            status = [_EMPTY if not t.strip() else _OK for t in texts]
        else:
            convs = batch["_messages"]
            ids_list = encode([render(m, False) for m in convs])
            labels_list = []
            # prefix texts of every assistant turn: (row, start_text, end_text)
            starts: list[str] = []
            ends: list[str] = []
            owners: list[int] = []
            for r, msgs in enumerate(convs):
                if all_labels:
                    continue
                for i, m in enumerate(msgs):
                    if m["role"] == "assistant":
                        starts.append(render(msgs[:i], True) if i > 0 else "")
                        ends.append(render(msgs[: i + 1], False))
                        owners.append(r)
            start_ids, end_ids = encode(starts), encode(ends)
            spans: list[list[tuple[int, int]]] = [[] for _ in convs]
            for k, r in enumerate(owners):
                full = ids_list[r]
                s = _common_prefix(full, start_ids[k]) if starts[k] else 0
                e = _common_prefix(full, end_ids[k])
                spans[r].append((s, e))
                if (starts[k] and s != len(start_ids[k])) or e != len(end_ids[k]):
                    mismatch[r] += 1
            for r, ids in enumerate(ids_list):
                if all_labels:
                    labels_list.append(list(ids))
                    continue
                labels = [IGNORE_INDEX] * len(ids)
                for s, e in spans[r]:
                    labels[s:e] = ids[s:e]
                labels_list.append(labels)
            status = [_EMPTY if not all_labels and blank_reply(msgs) else _OK for msgs in convs]

        out: dict[str, list[Any]] = {
            "input_ids": [],
            "attention_mask": [],
            "labels": [],
            "_status": [],
            "_len": [],
            "_nlab": [],
            "_mismatch": mismatch,
        }
        for ids, labels, st in zip(ids_list, labels_list, status, strict=True):
            ids = list(ids)
            if st == _OK and len(ids) > max_len:
                if mode == "skip":
                    st = _SKIPPED
                else:
                    ids, labels, st = ids[:max_len], labels[:max_len], _TRUNCATED
            nlab = sum(1 for x in labels if x != IGNORE_INDEX)
            if st in (_OK, _TRUNCATED) and nlab == 0:
                st = _NO_TARGET
            if st not in (_OK, _TRUNCATED):
                ids, labels, nlab = [], [], 0
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
            out["_status"].append(st)
            out["_len"].append(len(ids))
            out["_nlab"].append(nlab)
        return out

    return fn


def _pack_fn(block: int) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """Batched map function: concatenate a batch of examples and cut it into ``block``-token pieces."""

    def fn(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        ids = list(chain.from_iterable(batch["input_ids"]))
        labels = list(chain.from_iterable(batch["labels"]))
        out: dict[str, list[Any]] = {
            "input_ids": [],
            "attention_mask": [],
            "labels": [],
            "_len": [],
            "_nlab": [],
        }
        for i in range(0, len(ids), block):
            piece, lab = ids[i : i + block], labels[i : i + block]
            out["input_ids"].append(piece)
            out["attention_mask"].append([1] * len(piece))
            out["labels"].append(lab)
            out["_len"].append(len(piece))
            out["_nlab"].append(sum(1 for x in lab if x != IGNORE_INDEX))
        return out

    return fn


def _tokenize_split(
    ds: datasets.Dataset, tokenizer: Any, cfg: DataConfig, fmt: str, name: str
) -> tuple[datasets.Dataset, dict[str, Any]]:
    """Tokenize one normalized split; returns the final data set and its counts."""
    tok = ds.map(
        _tokenize_fn(tokenizer, cfg, fmt),
        batched=True,
        remove_columns=ds.column_names,
        num_proc=cfg.num_proc,
        desc=f"Tokenizing {name}",
    )
    status = list(tok["_status"])
    stats: dict[str, Any] = {
        "rows": len(ds),
        "truncated": status.count(_TRUNCATED),
        "skipped": status.count(_SKIPPED),
        "no_target": status.count(_NO_TARGET),
        "empty": status.count(_EMPTY),
        "boundary_mismatch": int(sum(tok["_mismatch"])),
    }
    kept = tok.filter(lambda s: [x in (_OK, _TRUNCATED) for x in s], input_columns="_status", batched=True)
    kept = kept.remove_columns(["_status", "_mismatch"])
    if cfg.packing and len(kept):
        packed = kept.map(
            _pack_fn(cfg.max_length),
            batched=True,
            batch_size=1000,
            remove_columns=kept.column_names,
            desc=f"Packing {name}",
        )
        nlab = list(packed["_nlab"])
        lens = list(packed["_len"])
        stats["dropped_blocks"] = sum(1 for n in nlab if n == 0)
        stats["dropped_block_tokens"] = sum(length for length, n in zip(lens, nlab, strict=True) if n == 0)
        kept = packed.filter(lambda n: [x > 0 for x in n], input_columns="_nlab", batched=True)
    stats["examples"] = len(kept)
    stats["tokens"] = int(sum(kept["_len"])) if len(kept) else 0
    stats["label_tokens"] = int(sum(kept["_nlab"])) if len(kept) else 0
    kept = kept.remove_columns([c for c in ("_len", "_nlab") if c in kept.column_names])
    return kept, stats


@dataclass
class RawData:
    """The rows of a :class:`DataConfig`'s sources, loaded and checked (format and fields), before any tokenizer
    or model: :func:`load_raw` gives it and :func:`build_datasets` tokenizes it."""

    train: datasets.Dataset
    source: str
    format: str
    fields: dict[str, str]
    val: datasets.Dataset | None = None
    val_source: str | None = None
    val_format: str | None = None
    val_fields: dict[str, str] | None = None


def load_raw(cfg: DataConfig) -> RawData:
    """Load and check the training (and ``val_data``) rows of ``cfg``: a missing file, an unreachable hub data
    set or a wrong field fails here, before a model is loaded."""
    train_raw, source = _load_sources(cfg.data, cfg.split, cfg, field_name="data")
    fmt, fields = resolve_format(train_raw, cfg, source=source)
    raw = RawData(train_raw, source, fmt, fields)
    if cfg.val_data is not None:
        raw.val, raw.val_source = _load_sources(cfg.val_data, cfg.val_split, cfg, field_name="val_data")
        raw.val_format, raw.val_fields = resolve_format(raw.val, dataclasses.replace(cfg, format=fmt),
                                                        source=raw.val_source)
    return raw


def build_datasets(
    cfg: DataConfig, tokenizer: Any, raw: RawData | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None, dict[str, Any]]:
    """Load (unless ``raw`` holds the rows :func:`load_raw` gave), check, split and tokenize the data of ``cfg``.

    Returns ``(train_ds, val_ds, stats)``. Both data sets hold exactly ``input_ids``, ``attention_mask`` and
    ``labels`` (-100 on prompt tokens unless ``train_on_prompt``); ``val_ds`` is None when ``val_size == 0``
    and no ``val_data`` is set. The validation rows are split off before tokenization and packing, so no row
    is in both. ``stats``:

    - ``format``, ``fields``, ``template`` (``chat_template`` | ``simple`` | ``none`` for text),
      ``source``, ``val_source``, ``max_length``, ``truncation``, ``packing``;
    - ``rows``, ``truncated``, ``skipped``, ``no_target``, ``tokens``, ``label_tokens``: train + val sums;
    - ``train`` / ``val`` (None without validation): ``rows`` (input rows), ``truncated`` (cut to
      max_length, kept), ``skipped`` (over max_length, dropped with truncation="skip"), ``no_target``
      (dropped: no response token left, e.g. the prompt alone fills max_length), ``empty`` (dropped: blank
      text, or every reply blank unless ``train_on_prompt``), ``examples`` (rows or packed blocks returned),
      ``tokens``, ``label_tokens``,
      ``boundary_mismatch`` (assistant turns whose rendered prefix did not tokenize to an exact prefix of the
      conversation, so the label boundary fell back to the longest common prefix; 0 normally), and with
      packing ``dropped_blocks`` / ``dropped_block_tokens`` (blocks without any label token, dropped);
    - ``summary``: one line saying what was truncated or skipped and how many.
    """
    raw = raw or load_raw(cfg)
    source, fmt, fields = raw.source, raw.format, raw.fields
    train_norm = _normalize(raw.train, fmt, fields, cfg, source)

    val_norm: datasets.Dataset | None = None
    val_source = None
    if raw.val is not None:
        val_source = raw.val_source
        val_norm = _normalize(raw.val, raw.val_format, raw.val_fields, cfg, val_source)
    elif cfg.val_size:
        n = len(train_norm)
        n_val = cfg.val_size if _is_int(cfg.val_size) else math.ceil(round(cfg.val_size * n, 6))
        if n_val >= n:
            raise DataConfigError(
                f"DataConfig.val_size: {cfg.val_size!r} asks for {n_val} validation rows but {source} "
                f"has only {n} rows (after limit={cfg.limit}); lower val_size or set it to 0"
            )
        split = train_norm.train_test_split(test_size=n_val, seed=cfg.seed, shuffle=True)
        train_norm, val_norm = split["train"], split["test"]
        val_source = f"{source} ({n_val} rows split off, seed {cfg.seed})"

    train_ds, train_stats = _tokenize_split(train_norm, tokenizer, cfg, fmt, "train")
    val_ds, val_stats = (None, None)
    if val_norm is not None:
        val_ds, val_stats = _tokenize_split(val_norm, tokenizer, cfg, fmt, "validation")
    check_not_all_empty(raw.train, train_stats["empty"], fmt, fields, source=source, n_rows=train_stats["rows"])
    if val_stats is not None:  # validation rows of a --val-data file, or split off the training rows
        val_rows, val_format = ((raw.val, (raw.val_format, raw.val_fields)) if raw.val is not None
                                else (val_norm, (fmt, {})))
        check_not_all_empty(val_rows, val_stats["empty"], *val_format, source=str(val_source), split="validation",
                            purpose="validate on", n_rows=val_stats["rows"])
    if len(train_ds) == 0:
        raise DataError(
            f"{source}: no training example left ({train_stats}); raise max_length or check the data"
        )

    splits = [s for s in (train_stats, val_stats) if s is not None]
    template = (
        "none"
        if fmt == "text"
        else ("chat_template" if uses_chat_template(tokenizer, cfg.use_chat_template) else "simple")
    )
    stats: dict[str, Any] = {
        "format": fmt,
        "fields": fields,
        "template": template,
        "source": source,
        "val_source": val_source,
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "packing": cfg.packing,
        **{
            k: sum(s[k] for s in splits)
            for k in ("rows", "truncated", "skipped", "no_target", "tokens", "label_tokens")
        },
        "train": train_stats,
        "val": val_stats,
    }
    stats["summary"] = _summary(stats)
    dropped_empty = train_stats["empty"] + (val_stats["empty"] if val_stats else 0)
    dropped = stats["truncated"] or stats["skipped"] or stats["no_target"] or dropped_empty
    log = logger.warning if dropped else logger.info
    log("%s", stats["summary"])
    return train_ds, val_ds, stats


def _summary(stats: dict[str, Any]) -> str:
    tr, va = stats["train"], stats["val"]
    parts = [
        f"{stats['rows']} rows ({stats['format']}, template {stats['template']}): "
        f"{tr['examples']} train / {va['examples'] if va else 0} val examples, {stats['tokens']} tokens"
    ]
    if stats["truncation"] == "truncate":
        parts.append(f"truncated {stats['truncated']} rows to max_length={stats['max_length']}")
    else:
        parts.append(f"skipped {stats['skipped']} rows longer than max_length={stats['max_length']}")
    if stats["no_target"]:
        parts.append(f"dropped {stats['no_target']} rows with no response token left")
    empty = tr["empty"] + (va["empty"] if va else 0)
    if empty:
        what = "text" if stats["format"] == "text" else "response"
        parts.append(f"dropped {empty} rows with an empty {what}")
    if stats["packing"]:
        parts.append(f"packed into {stats['max_length']}-token blocks")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------
# Collation
# ------------------------------------------------------------------------------------------------


def ensure_pad_token(tokenizer: Any) -> None:
    """Give the tokenizer a pad token (its EOS) if it has none; padded positions are masked anyway."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DataError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token


@dataclass
class DataCollator(DataCollatorForSeq2Seq):
    """``transformers.DataCollatorForSeq2Seq`` that always pads on the right (to the longest in the batch).

    input_ids are padded with the pad token (EOS when the tokenizer has none), attention_mask with 0, labels
    with -100. Works as ``Trainer(data_collator=DataCollator(tokenizer))``.
    """

    def __post_init__(self) -> None:
        ensure_pad_token(self.tokenizer)

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> dict[str, Any]:
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        try:
            return super().__call__(features, return_tensors)
        finally:
            self.tokenizer.padding_side = side
