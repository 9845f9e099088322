"""Tests of loramix.data: loading, format detection, label masking, truncation, packing, splits, collation.

Fast and offline: a tiny byte-level BPE tokenizer trained in-process, small temp files. The real-data tests
run only when $LORAMIX_DATA_DIR holds the files each one reads.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loramix.data import (
    IGNORE_INDEX,
    DataCollator,
    DataConfig,
    DataConfigError,
    DataError,
    build_datasets,
    build_prompt,
    load_records,
    render_simple,
    resolve_format,
)

datasets.disable_progress_bars()

# SmolLM2-style ChatML template: a default system turn when the chat does not start with one.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SENTENCES = [
    "what is the capital of france",
    "the capital of france is paris",
    "please answer the following question with true or false",
    "the correct answer is true",
    "the quick brown fox jumps over the lazy dog",
    "how do I stop worrying so much about everything",
    "try writing your worries down and talking to someone you trust",
]


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Tiny byte-level BPE: any text round-trips exactly through encode/decode."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def plain_tok() -> PreTrainedTokenizerFast:
    return make_tokenizer(chat_template=None)


def write_json(path: Path, rows: list[dict[str, Any]], lines: bool = False) -> Path:
    with open(path, "w") as f:
        if lines:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        else:
            json.dump(rows, f)
    return path


PAIRS = [
    {"Context": f"question number {i}: what is the capital of france", "Response": f"paris {i}"}
    for i in range(20)
]


def cfg_for(path: Path | str, tmp_path: Path, **kw: Any) -> DataConfig:
    kw.setdefault("val_size", 0)
    return DataConfig(data=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def label_spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of non-ignored labels."""
    spans, start = [], None
    for i, x in enumerate([*labels, IGNORE_INDEX]):
        if x != IGNORE_INDEX and start is None:
            start = i
        elif x == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


# ------------------------------------------------------------------------------------------------
# DataConfig
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("data", ""),
        ("format", "chatml"),
        ("max_length", 0),
        ("max_length", 1.5),
        ("truncation", "cut"),
        ("val_size", 1.0),
        ("val_size", -1),
        ("val_size", "0.1"),
        ("val_size", True),
        ("limit", 0),
        ("prompt_field", ""),
        ("packing", "yes"),
        ("num_proc", 0),
        ("seed", None),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: Any) -> None:
    kw = {"data": "x.json", field: value}
    with pytest.raises(DataConfigError, match=rf"DataConfig\.{field}"):
        DataConfig(**kw)


def test_config_defaults_and_from_dict() -> None:
    cfg = DataConfig.from_dict({"data": "x.jsonl", "max_length": 64})
    assert (cfg.split, cfg.format, cfg.max_length, cfg.truncation) == ("train", "auto", 64, "truncate")
    assert (cfg.train_on_prompt, cfg.use_chat_template, cfg.packing, cfg.val_size) == (
        False,
        True,
        False,
        0.05,
    )
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DataConfigError, match="max_len"):
        DataConfig.from_dict({"data": "x.jsonl", "max_len": 64})


# ------------------------------------------------------------------------------------------------
# Loading and errors
# ------------------------------------------------------------------------------------------------


def test_load_every_file_type(tmp_path: Path) -> None:
    rows = PAIRS[:5]
    files = [
        write_json(tmp_path / "list.json", rows),
        write_json(tmp_path / "lines.json", rows, lines=True),
        write_json(tmp_path / "rows.jsonl", rows, lines=True),
    ]
    for name, delim in (("rows.csv", ","), ("rows.tsv", "\t")):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["Context", "Response"], delimiter=delim)
            w.writeheader()
            w.writerows(rows)
        files.append(tmp_path / name)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    files.append(tmp_path / "rows.parquet")
    for f in files:
        ds = load_records(cfg_for(f, tmp_path))
        assert len(ds) == 5, f
        assert ds[3]["Context"] == rows[3]["Context"] and ds[3]["Response"] == rows[3]["Response"], f


def test_tsv_is_unquoted_and_keeps_na_strings(tmp_path: Path) -> None:
    p = tmp_path / "s.tsv"
    p.write_text('sentence\tlabel\n"a quote starts this\tNA\nplain\t1\n')
    ds = load_records(
        cfg_for(p, tmp_path, format="prompt_response", prompt_field="sentence", response_field="label")
    )
    assert ds[0]["sentence"] == '"a quote starts this' and ds[0]["label"] == "NA"


def test_text_file_lines_and_empty_rows(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    p = tmp_path / "wiki.txt"
    p.write_bytes(b" = Title = \r\n the quick brown fox\r\n\r\n jumps over the lazy dog\r\n")
    train, val, stats = build_datasets(cfg_for(p, tmp_path), tok)
    assert stats["format"] == "text" and stats["template"] == "none" and val is None
    assert stats["rows"] == 4 and stats["train"]["empty"] == 1 and len(train) == 3
    for ex in train:
        assert ex["labels"] == ex["input_ids"]  # language modelling: every token is a target
        assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(train[1]["input_ids"]) == " the quick brown fox<|im_end|>"


def test_missing_file_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(cfg_for(missing, tmp_path))


def test_relative_path_found_under_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    write_json(tmp_path / "sub" / "pairs.jsonl", PAIRS[:3], lines=True)
    monkeypatch.setenv("LORAMIX_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path / "sub")  # "sub/pairs.jsonl" is not under the working directory
    assert len(load_records(cfg_for("sub/pairs.jsonl", tmp_path))) == 3


@pytest.mark.parametrize("content,match", [("", "empty"), ("  \n", "empty"), ("[]", "no rows")])
def test_empty_file_named(tmp_path: Path, content: str, match: str) -> None:
    p = tmp_path / "empty.json"
    p.write_text(content)
    with pytest.raises(DataError, match=rf"{match}.*empty\.json"):
        load_records(cfg_for(p, tmp_path))


def test_header_only_csv_has_no_rows(tmp_path: Path) -> None:
    p = tmp_path / "h.csv"
    p.write_text("prompt,response\n")
    with pytest.raises(DataError, match=r"no rows.*h\.csv"):
        load_records(cfg_for(p, tmp_path))


def test_unparsable_json_names_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl"):
        load_records(cfg_for(p, tmp_path))


def test_missing_field_names_file_row_field_and_fields_present(tmp_path: Path) -> None:
    p = write_json(tmp_path / "pairs.jsonl", PAIRS[:3], lines=True)
    cfg = cfg_for(p, tmp_path, format="prompt_response", response_field="Answer")
    with pytest.raises(DataError) as e:
        load_records(cfg)
    msg = str(e.value)
    for part in ("pairs.jsonl", "row 1", "'Answer'", "response_field", "Context", "Response"):
        assert part in msg, (part, msg)


def test_undetectable_format_lists_fields(tmp_path: Path) -> None:
    p = write_json(tmp_path / "odd.json", [{"foo": "a", "bar": "b"}])
    with pytest.raises(DataError, match=r"odd\.json.*foo, bar"):
        load_records(cfg_for(p, tmp_path))


def test_null_value_names_row_and_field(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    rows = [{"instruction": "a", "input": "", "output": "x"} for _ in range(4)]
    rows[2] = {"instruction": "c", "input": ""}  # no output in the third row (rows are counted from 1)
    p = write_json(tmp_path / "alp.json", rows)
    with pytest.raises(DataError) as e:
        build_datasets(cfg_for(p, tmp_path), tok)
    msg = str(e.value)
    for part in ("alp.json", "row 3", "'output'", "instruction, input"):
        assert part in msg, (part, msg)


def test_wrong_types_named(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    rows = [{"prompt": "a", "response": "x"}, {"prompt": "b", "response": ["not", "text"]}]
    p = write_json(tmp_path / "typ.jsonl", rows, lines=True)
    with pytest.raises(DataError, match=r"typ\.jsonl, row 2: field 'response'.*must be a string, got list"):
        build_datasets(cfg_for(p, tmp_path), tok)

    msgs = [{"messages": [{"role": "user", "content": "a"}]}, {"messages": "hello"}]
    p = write_json(tmp_path / "msg.jsonl", msgs, lines=True)
    with pytest.raises(DataError, match=r"msg\.jsonl, row 2: field 'messages'.*must be a list"):
        build_datasets(cfg_for(p, tmp_path, format="messages"), tok)

    bad_role = [{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}]
    p = write_json(tmp_path / "role.jsonl", bad_role, lines=True)
    with pytest.raises(DataError, match=r"role\.jsonl, row 1.*message 1 has role 'robot'"):
        build_datasets(cfg_for(p, tmp_path), tok)


def test_numbers_become_text(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    p = write_json(tmp_path / "num.json", [{"question": "two plus two", "answer": 4}] * 3)
    train, _, _ = build_datasets(cfg_for(p, tmp_path), tok)
    assert tok.decode([x for x in train[0]["labels"] if x != IGNORE_INDEX]) == "4<|im_end|>\n"


def test_hub_name_goes_through_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load(name: str, subset: str | None = None, **kw: Any) -> datasets.Dataset:
        calls.append((name, subset, kw["split"]))
        return datasets.Dataset.from_list(PAIRS[:4])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ds = load_records(cfg_for("someone/counsel", tmp_path, split="train[:4]", limit=2))
    assert calls == [("someone/counsel", None, "train[:4]")] and len(ds) == 2


# ------------------------------------------------------------------------------------------------
# Format detection
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row,fmt,fields",
    [
        (
            {"Context": "q", "Response": "a", "topic": "t"},
            "prompt_response",
            {"prompt_field": "Context", "response_field": "Response"},
        ),
        (
            {"question": "q", "answer": "a"},
            "prompt_response",
            {"prompt_field": "question", "response_field": "answer"},
        ),
        (
            {"input": "q", "output": "a"},
            "prompt_response",
            {"prompt_field": "input", "response_field": "output"},
        ),
        (
            {"instruction": "i", "input": "", "output": "o", "answer": "a"},
            "instruction",
            {"instruction_field": "instruction", "input_field": "input", "output_field": "output"},
        ),
        (
            {"instruction": "i", "dialogue": "d", "summary": "s"},
            "instruction",
            {"instruction_field": "instruction", "input_field": "dialogue", "output_field": "summary"},
        ),
        (
            {"instruction": "i", "output": "o"},
            "instruction",
            {"instruction_field": "instruction", "output_field": "output"},
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "messages", {"messages_field": "messages"}),
        ({"text": "hello", "label": 1}, "text", {"text_field": "text"}),
    ],
)
def test_auto_detection(row: dict[str, Any], fmt: str, fields: dict[str, str]) -> None:
    ds = datasets.Dataset.from_list([row])
    assert resolve_format(ds, DataConfig(data="x.json")) == (fmt, fields)


def test_explicit_fields_override_detection() -> None:
    ds = datasets.Dataset.from_list([{"q": "x", "a": "y", "text": "z"}])
    cfg = DataConfig(data="x.json", prompt_field="q", response_field="a")
    assert resolve_format(ds, cfg) == ("prompt_response", {"prompt_field": "q", "response_field": "a"})


# ------------------------------------------------------------------------------------------------
# Label masking
# ------------------------------------------------------------------------------------------------


def test_chat_template_labels_only_on_response(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    p = write_json(tmp_path / "pairs.jsonl", PAIRS, lines=True)
    train, _, stats = build_datasets(cfg_for(p, tmp_path, limit=6), tok)
    assert stats["format"] == "prompt_response" and stats["template"] == "chat_template"
    assert stats["train"]["boundary_mismatch"] == 0
    assert len(train) == 6 and train.column_names == ["input_ids", "attention_mask", "labels"]
    for row, ex in zip(PAIRS[:6], train, strict=True):
        msgs = [
            {"role": "user", "content": row["Context"]},
            {"role": "assistant", "content": row["Response"]},
        ]
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        prompt = tok.apply_chat_template(
            msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        assert ex["input_ids"] == list(full)
        n = len(prompt)
        assert ex["labels"][:n] == [IGNORE_INDEX] * n
        assert ex["labels"][n:] == ex["input_ids"][n:]
        assert tok.decode(ex["labels"][n:]) == row["Response"] + "<|im_end|>\n"


def test_simple_template_without_chat_template(tmp_path: Path, plain_tok: PreTrainedTokenizerFast) -> None:
    rows = [{"instruction": "what is the capital", "input": "of france", "output": "paris"}] * 3
    p = write_json(tmp_path / "alp.json", rows)
    train, _, stats = build_datasets(cfg_for(p, tmp_path), plain_tok)
    assert stats["template"] == "simple"
    ex = train[0]
    text = plain_tok.decode(ex["input_ids"])
    assert text == "### Instruction:\nwhat is the capital\n\nof france\n\n### Response:\nparis<|im_end|>"
    assert label_spans(ex["labels"]) == [
        (len(ex["labels"]) - len(plain_tok("paris<|im_end|>")["input_ids"]), len(ex["labels"]))
    ]
    assert plain_tok.decode([x for x in ex["labels"] if x != IGNORE_INDEX]) == "paris<|im_end|>"
    # the chat template is ignored when asked to
    _, _, stats2 = build_datasets(cfg_for(p, tmp_path, use_chat_template=False), make_tokenizer())
    assert stats2["template"] == "simple"


def test_render_simple_prefix_property() -> None:
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert render_simple(msgs, eos="</s>").startswith(render_simple(msgs[:1], add_generation_prompt=True))


def test_train_on_prompt_labels_everything(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    p = write_json(tmp_path / "pairs.jsonl", PAIRS[:4], lines=True)
    train, _, stats = build_datasets(cfg_for(p, tmp_path, train_on_prompt=True), tok)
    assert all(ex["labels"] == ex["input_ids"] for ex in train)
    assert stats["label_tokens"] == stats["tokens"]


def test_multi_turn_messages_label_every_assistant_turn(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    conv = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is the capital of france"},
        {"role": "assistant", "content": "paris"},
        {"role": "user", "content": "and the fox"},
        {"role": "assistant", "content": "quick brown"},
    ]
    share = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": share[m["role"]], "value": m["content"]} for m in conv]
    files = [
        write_json(tmp_path / "chat.jsonl", [{"messages": conv}] * 2, lines=True),
        write_json(tmp_path / "sharegpt.json", [{"id": 1, "conversations": sharegpt}] * 2),
    ]
    for f in files:
        train, _, stats = build_datasets(cfg_for(f, tmp_path), tok)
        assert stats["format"] == "messages", f
        ex = train[0]
        assert ex["input_ids"] == list(tok.apply_chat_template(conv, tokenize=True, return_dict=False))
        spans = label_spans(ex["labels"])
        decoded = [tok.decode(ex["input_ids"][s:e]) for s, e in spans]
        assert decoded == ["paris<|im_end|>\n", "quick brown<|im_end|>\n"], f


def test_system_prompt_added(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    p = write_json(tmp_path / "pairs.jsonl", PAIRS[:2], lines=True)
    train, _, _ = build_datasets(cfg_for(p, tmp_path, system_prompt="be kind"), tok)
    assert tok.decode(train[0]["input_ids"]).startswith(
        "<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user"
    )
    assert build_prompt(tok, "hi", system_prompt="be kind").endswith("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------------------
# Truncation, packing, splits
# ------------------------------------------------------------------------------------------------


def _lengths(tok: PreTrainedTokenizerFast, rows: list[dict[str, str]]) -> list[int]:
    return [
        len(
            tok.apply_chat_template(
                [{"role": "user", "content": r["Context"]}, {"role": "assistant", "content": r["Response"]}],
                return_dict=False,
            )
        )
        for r in rows
    ]


def _varied_rows() -> list[dict[str, str]]:
    return [
        {"Context": "what is the capital " * (1 + i % 5), "Response": "paris " * (1 + i % 7)}
        for i in range(30)
    ]


@pytest.mark.parametrize("mode", ["truncate", "skip"])
def test_truncation_counts(tmp_path: Path, tok: PreTrainedTokenizerFast, mode: str) -> None:
    rows = _varied_rows()
    lens = _lengths(tok, rows)
    max_len = sorted(lens)[len(lens) // 2]  # about half the rows are longer
    prompt_lens = [
        len(
            tok.apply_chat_template(
                [{"role": "user", "content": r["Context"]}], add_generation_prompt=True, return_dict=False
            )
        )
        for r in rows
    ]
    over = sum(n > max_len for n in lens)
    no_target = sum(n > max_len and p >= max_len for n, p in zip(lens, prompt_lens, strict=True))
    assert over > 0
    p = write_json(tmp_path / "v.jsonl", rows, lines=True)
    train, _, stats = build_datasets(cfg_for(p, tmp_path, max_length=max_len, truncation=mode), tok)
    assert all(len(ex["input_ids"]) <= max_len for ex in train)
    if mode == "truncate":
        assert (stats["truncated"], stats["skipped"], stats["no_target"]) == (over - no_target, 0, no_target)
        assert len(train) == len(rows) - no_target
        assert f"truncated {over - no_target} rows" in stats["summary"]
    else:
        assert (stats["truncated"], stats["skipped"]) == (0, over)
        assert len(train) == len(rows) - over
        assert f"skipped {over} rows" in stats["summary"]
    assert all(any(x != IGNORE_INDEX for x in ex["labels"]) for ex in train)


def test_prompt_filling_max_length_is_dropped(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    rows = [{"prompt": "the quick brown fox " * 30, "response": "ok"}, {"prompt": "hi", "response": "ok"}]
    p = write_json(tmp_path / "long.jsonl", rows, lines=True)
    train, _, stats = build_datasets(cfg_for(p, tmp_path, max_length=64), tok)
    assert stats["no_target"] == 1 and len(train) == 1


def test_packing_keeps_totals(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    p = write_json(tmp_path / "v.jsonl", _varied_rows(), lines=True)
    plain, _, s_plain = build_datasets(cfg_for(p, tmp_path, max_length=64), tok)
    packed, _, s_pack = build_datasets(cfg_for(p, tmp_path, max_length=64, packing=True), tok)
    assert s_pack["train"]["dropped_blocks"] == 0  # every block of this data holds some response
    assert s_pack["tokens"] == s_plain["tokens"] and s_pack["label_tokens"] == s_plain["label_tokens"]
    cat = lambda ds, col: [x for ex in ds for x in ex[col]]
    assert cat(packed, "input_ids") == cat(plain, "input_ids")
    assert cat(packed, "labels") == cat(plain, "labels")
    lens = [len(ex["input_ids"]) for ex in packed]
    assert all(n == 64 for n in lens[:-1]) and 0 < lens[-1] <= 64
    assert len(packed) == -(-s_plain["tokens"] // 64)
    assert all(ex["attention_mask"] == [1] * len(ex["input_ids"]) for ex in packed)


def test_packing_drops_blocks_without_labels(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    # Long unlabeled stretches across row boundaries: a trailing user turn, then a long prompt.
    long = "the quick brown fox jumps over the lazy dog " * 2
    row_a = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": long},
    ]
    row_b = [{"role": "user", "content": long}, {"role": "assistant", "content": "ok"}]
    p = write_json(tmp_path / "m.jsonl", [{"messages": m} for m in [row_a, row_b] * 6], lines=True)
    plain, _, s_plain = build_datasets(cfg_for(p, tmp_path, max_length=128), tok)
    assert s_plain["truncated"] == 0 and max(len(ex["input_ids"]) for ex in plain) <= 72
    packed, _, s = build_datasets(cfg_for(p, tmp_path, max_length=72, packing=True), tok)
    assert s["truncated"] == 0 and s["train"]["dropped_blocks"] > 0
    assert s["tokens"] + s["train"]["dropped_block_tokens"] == s_plain["tokens"]
    assert s["label_tokens"] == s_plain["label_tokens"]
    assert all(any(x != IGNORE_INDEX for x in ex["labels"]) for ex in packed)


@pytest.mark.parametrize("val_size,n_val", [(0.2, 4), (3, 3), (0.01, 1), (0, 0)])
def test_val_split_sizes(
    tmp_path: Path, tok: PreTrainedTokenizerFast, val_size: float | int, n_val: int
) -> None:
    p = write_json(tmp_path / "pairs.jsonl", PAIRS, lines=True)
    train, val, stats = build_datasets(cfg_for(p, tmp_path, val_size=val_size, seed=1), tok)
    assert len(train) == 20 - n_val and stats["rows"] == 20
    if n_val == 0:
        assert val is None and stats["val"] is None
        return
    assert len(val) == n_val and stats["val"]["rows"] == n_val
    dec = lambda ds: {tok.decode(ex["input_ids"]) for ex in ds}
    assert not dec(train) & dec(val) and len(dec(train) | dec(val)) == 20
    # same seed, same split
    _, val2, _ = build_datasets(cfg_for(p, tmp_path, val_size=val_size, seed=1), tok)
    assert dec(val2) == dec(val)


def test_val_size_too_large_and_val_file(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    p = write_json(tmp_path / "pairs.jsonl", PAIRS[:3], lines=True)
    with pytest.raises(DataConfigError, match="DataConfig.val_size"):
        build_datasets(cfg_for(p, tmp_path, val_size=3), tok)
    v = write_json(tmp_path / "dev.json", [{"question": "q", "answer": "a"}] * 2)
    train, val, stats = build_datasets(cfg_for(p, tmp_path, val_size=0.5, val_data=str(v)), tok)
    assert len(train) == 3 and len(val) == 2 and stats["val_source"].endswith("dev.json")
    assert tok.decode([x for x in val[0]["labels"] if x != IGNORE_INDEX]) == "a<|im_end|>\n"


def test_limit(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    p = write_json(tmp_path / "pairs.jsonl", PAIRS, lines=True)
    train, val, stats = build_datasets(cfg_for(p, tmp_path, limit=5, val_size=1), tok)
    assert stats["rows"] == 5 and len(train) == 4 and len(val) == 1


def test_comma_separated_sources_are_concatenated(tmp_path: Path) -> None:
    """Files of one format join into one data set (extra columns of one file dropped); ``limit`` is per file."""
    a = write_json(tmp_path / "a.json", [{"instruction": f"a{i}", "output": "x", "answer": "x"} for i in range(4)])
    b = write_json(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "y"} for i in range(3)], lines=True)
    ds = load_records(cfg_for(f"{a}, {b}", tmp_path))
    assert ds["instruction"] == [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(3)]
    assert "answer" not in ds.column_names
    assert len(load_records(cfg_for(f"{a},{b}", tmp_path, limit=2))) == 4


def test_comma_separated_sources_build_datasets(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    a = write_json(tmp_path / "a.json", [{"instruction": f"a{i}", "output": "x"} for i in range(4)])
    b = write_json(tmp_path / "b.json", [{"instruction": f"b{i}", "output": "y"} for i in range(3)])
    train, val, stats = build_datasets(cfg_for(f"{a},{b}", tmp_path, val_size=2), tok)
    assert (len(train), len(val), stats["rows"]) == (5, 2, 7)
    assert "a.json + " in stats["source"] and stats["source"].endswith("b.json")


def test_comma_separated_sources_name_the_bad_file(tmp_path: Path) -> None:
    a = write_json(tmp_path / "a.json", [{"instruction": "q", "output": "x"}])
    b = write_json(tmp_path / "b.json", [{"prompt": "q", "response": "y"}])
    with pytest.raises(DataError, match="b.json"):
        load_records(cfg_for(f"{a},{b}", tmp_path))
    with pytest.raises(DataConfigError, match="DataConfig.data"):
        load_records(cfg_for(f"{a},", tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_records(cfg_for(f"{a},{tmp_path / 'missing.json'}", tmp_path))


# ------------------------------------------------------------------------------------------------
# Collation
# ------------------------------------------------------------------------------------------------


def test_collator_pads_right_with_ignored_labels(tmp_path: Path) -> None:
    tok = make_tokenizer()
    tok.padding_side = "left"
    p = write_json(tmp_path / "v.jsonl", _varied_rows()[:6], lines=True)
    train, _, _ = build_datasets(cfg_for(p, tmp_path), tok)
    feats = [train[i] for i in range(len(train))]
    batch = DataCollator(tok)(feats)
    longest = max(len(f["input_ids"]) for f in feats)
    assert batch["input_ids"].shape == batch["labels"].shape == (len(feats), longest)
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == f["input_ids"]
        assert batch["labels"][i, :n].tolist() == f["labels"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
    assert tok.padding_side == "left"  # restored


def test_collator_sets_missing_pad_token(tmp_path: Path) -> None:
    tok = make_tokenizer()
    tok.pad_token = None
    DataCollator(tok)
    assert tok.pad_token_id == tok.eos_token_id


def test_batches_train_a_tiny_model(tmp_path: Path, tok: PreTrainedTokenizerFast) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    p = write_json(tmp_path / "pairs.jsonl", PAIRS, lines=True)
    train, val, _ = build_datasets(cfg_for(p, tmp_path, val_size=0.2), tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=DataCollator(tok)
    )
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


# ------------------------------------------------------------------------------------------------
# Real data (each case only with the file it reads under $LORAMIX_DATA_DIR)
# ------------------------------------------------------------------------------------------------

DATA_DIR = os.environ.get("LORAMIX_DATA_DIR")


def real_file(rel: str, *values: str):
    """A test case reading ``$LORAMIX_DATA_DIR/rel``: skipped when that file is missing."""
    missing = not DATA_DIR or not (Path(DATA_DIR) / rel).is_file()
    return pytest.param(rel, *values, marks=pytest.mark.skipif(missing, reason=f"needs $LORAMIX_DATA_DIR/{rel}"))


@pytest.mark.parametrize(
    "rel,fmt,prompt_key,response_key",
    [
        real_file("counsel_chat/counsel_chat_context_response.jsonl", "prompt_response", "Context", "Response"),
        real_file("llm_adapters_commonsense/boolq/train.json", "instruction", "instruction", "output"),
    ],
)
def test_real_data_response_only_labels(
    tmp_path: Path, tok: PreTrainedTokenizerFast, rel: str, fmt: str, prompt_key: str, response_key: str
) -> None:
    cfg = cfg_for(rel, tmp_path, limit=40, max_length=100_000)  # relative path: found via LORAMIX_DATA_DIR
    raw = load_records(cfg)
    train, _, stats = build_datasets(cfg, tok)
    assert stats["format"] == fmt and stats["rows"] == 40 and len(train) == 40
    assert stats["truncated"] == stats["skipped"] == stats["train"]["boundary_mismatch"] == 0
    for row, ex in zip(raw, train, strict=True):
        spans = label_spans(ex["labels"])
        assert len(spans) == 1 and spans[0][1] == len(ex["input_ids"])
        s = spans[0][0]
        assert tok.decode(ex["input_ids"][s:]) == row[response_key] + "<|im_end|>\n"
        assert tok.decode(ex["input_ids"][:s]).endswith(
            row[prompt_key] + "<|im_end|>\n<|im_start|>assistant\n"
        )


# --- without LORAMIX_DATA_DIR; the main job's sample, shipped in the repository -----------------------------
ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "counsel_chat" / "counsel_chat_sample.jsonl"


def test_without_loramix_data_dir_the_data_tests_skip_and_say_why() -> None:
    """The default run needs no data outside the repository: with LORAMIX_DATA_DIR unset, tests that read the
    full data sets are skipped and the run prints each reason (pyproject's -rs)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "LORAMIX_DATA_DIR"}
    tests = ["tests/test_real_batch.py", "tests/test_data.py::test_real_data_response_only_labels",
             "tests/test_continual_run.py::test_real_task_loaders"]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    skipped = [line for line in res.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) >= 3 and all("LORAMIX_DATA_DIR" in line for line in skipped), res.stdout
    assert " passed" not in res.stdout and "skipped" in res.stdout.splitlines()[-1]


def test_the_shipped_counsel_chat_sample_builds_with_the_quickstart_config(tmp_path, tok) -> None:
    """configs/counsel_chat_quick.yaml reads the sample in data/ (no LORAMIX_DATA_DIR): every row is one
    question and its answer, labelled on the answer only, and the licence note sits next to the file."""
    from loramix.train import resolve

    _, cfg, _ = resolve(ROOT / "configs" / "counsel_chat_quick.yaml")
    assert (ROOT / cfg.data).resolve() == SAMPLE
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert 200 <= len(rows) <= 1000 and len({r["questionID"] for r in rows}) == len(rows)
    assert all(r["questionText"].strip() and len(r["answerText"]) >= 100 for r in rows)
    licence = (SAMPLE.parent / "README.md").read_text()
    assert "MIT License" in licence and "Copyright (c) 2020 nbertagnolli" in licence
    cfg = dataclasses.replace(cfg, data=str(SAMPLE), cache_dir=str(tmp_path / "cache"), max_length=100_000)
    train, val, stats = build_datasets(cfg, tok)
    assert stats["format"] == "prompt_response" and stats["rows"] == len(rows)
    assert len(train) + len(val) == len(rows) and len(val) == cfg.val_size
    spans = label_spans(train[0]["labels"])
    assert len(spans) == 1 and tok.decode(train[0]["input_ids"][spans[0][0]:]).endswith("<|im_end|>\n")


# --- data errors name the file and the line ---------------------------------------------------------------
@pytest.mark.parametrize("name, content, where", [
    ("bad.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'
                  b'{"prompt": "\xe9t\xe9", "response": "e"}\n', r"bad\.jsonl, line 3: not UTF-8 text \(byte 13 "),
    ("bad.csv", b"prompt,response\na,b\nc,d\xff\n", r"bad\.csv, line 3: not UTF-8 text \(byte 4 "),
    ("bad.txt", b"one\ntwo\n\x80three\n", r"bad\.txt, line 3: not UTF-8 text \(byte 1 "),
])
def test_non_utf8_bytes_name_the_file_and_line(tmp_path, tok, name, content, where) -> None:
    """A Latin-1 byte in a text data file fails naming the file, the line (from 1) and the byte."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=where):
        build_datasets(cfg_for(tmp_path / name, tmp_path), tok)


def test_malformed_jsonl_line_is_named_counting_from_one(tmp_path, tok) -> None:
    """A JSON-lines file whose third line is cut off fails with 'line 3', not the parser's 0-based row."""
    rows = [json.dumps(r) for r in PAIRS[:5]]
    rows[2] = rows[2][:25]
    (tmp_path / "cut.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"cut\.jsonl, line 3: not valid JSON"):
        build_datasets(cfg_for(tmp_path / "cut.jsonl", tmp_path), tok)
    (tmp_path / "list.json").write_text('[\n{"prompt": "a", "response": "b"},\n{"prompt": "c" "response": "d"}\n]')
    with pytest.raises(DataError, match=r"list\.json, line 3: not valid JSON"):
        build_datasets(cfg_for(tmp_path / "list.json", tmp_path), tok)


def test_empty_responses_are_counted_and_all_empty_is_refused(tmp_path, tok) -> None:
    """Rows whose reply is blank are dropped and counted as empty; a file with nothing but blank replies is
    refused naming the file (it used to train on end-of-turn tokens alone)."""
    rows = [{"prompt": f"question {i}", "response": "  " if i % 3 == 0 else f"answer {i}"} for i in range(9)]
    p = write_json(tmp_path / "some.jsonl", rows, lines=True)
    train, _, stats = build_datasets(cfg_for(p, tmp_path), tok)
    assert stats["train"]["empty"] == 3 and len(train) == 6
    assert "dropped 3 rows with an empty response" in stats["summary"]
    p = write_json(tmp_path / "none.jsonl", [{"prompt": f"q {i}", "response": ""} for i in range(4)], lines=True)
    with pytest.raises(DataError, match=r"none\.jsonl: all 4 training rows have an empty response"):
        build_datasets(cfg_for(p, tmp_path), tok)
    train, _, stats = build_datasets(cfg_for(p, tmp_path, train_on_prompt=True), tok)  # the prompts still train
    assert len(train) == 4 and stats["train"]["empty"] == 0


def test_all_empty_outputs_name_the_field_that_holds_the_answers(tmp_path, tok) -> None:
    """LLM-Adapters' math rows leave ``output`` empty and keep the number in ``answer``: the refusal says so and
    names the flag that trains on it; with that flag the same file trains."""
    rows = [{"instruction": f"What is {i} + {i}?", "input": "", "output": "", "answer": str(2 * i)} for i in range(6)]
    p = write_json(tmp_path / "math.json", rows)
    with pytest.raises(DataError, match=r"math\.json: all 6 training rows have an empty response; nothing to train "
                                        r"on; field 'output' is empty in every row, but field 'answer' is not "
                                        r"\(LLM-Adapters' math sets keep the answer there\): to train on it, pass "
                                        r"--output-field answer$"):
        build_datasets(cfg_for(p, tmp_path), tok)
    with pytest.raises(DataError, match=r"math\.json: all 4 training rows have an empty response; nothing to train "
                                        r"on; field 'output' is empty in every row, but field 'answer' is not"):
        build_datasets(cfg_for(p, tmp_path, val_size=2), tok)  # 2 rows split off for validation
    train, _, stats = build_datasets(cfg_for(p, tmp_path, output_field="answer"), tok)
    assert len(train) == 6 and stats["fields"]["output_field"] == "answer"
    no_answer = write_json(tmp_path / "plain.jsonl", [{"prompt": f"q {i}", "response": ""} for i in range(4)],
                           lines=True)
    with pytest.raises(DataError, match=r"plain\.jsonl: all 4 training rows have an empty response; nothing to "
                                        r"train on$"):  # no other field to point to
        build_datasets(cfg_for(no_answer, tmp_path), tok)


def test_validation_rows_that_are_all_empty_are_refused(tmp_path, tok) -> None:
    """A --val-data file whose every response is empty is refused naming it (it used to leave the run without
    validation, silently)."""
    good = write_json(tmp_path / "train.jsonl", [{"prompt": f"q {i}", "response": f"a {i}"} for i in range(6)],
                      lines=True)
    empty = write_json(tmp_path / "val.jsonl", [{"prompt": f"q {i}", "response": " "} for i in range(3)], lines=True)
    with pytest.raises(DataError, match=r"val\.jsonl: all 3 validation rows have an empty response; nothing to "
                                        r"validate on"):
        build_datasets(cfg_for(good, tmp_path, val_data=str(empty)), tok)
