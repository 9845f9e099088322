"""Streams of the user's own data files: formats, kinds of task, held-out and given test sets, and the
errors for streams the learner cannot use."""

from __future__ import annotations

import csv
import json

import pytest

from helpers.tiny_lm import byte_tokenizer
from loramix.config import ConfigError
from loramix.continual import ContinualConfig, build_stream, load_tasks
from loramix.continual.sources import StreamError, detect_kind, task_name


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa_rows(n, tag="q"):
    return [{"prompt": f"{tag} question {i}?", "response": f"answer {i}"} for i in range(n)]


def mc_rows(n):
    return [{"question": f"Pick the colour number {i}", "choices": ["red", "green", "blue"], "answer": "ABC"[i % 3]}
            for i in range(n)]


def code_rows(n):
    return [{"text": f"Write a function add{i} returning a + {i}.", "code": f"def add{i}(a):\n    return a + {i}",
             "test_list": [f"assert add{i}(1) == {1 + i}"], "test_setup_code": ""} for i in range(n)]


def test_file_stream_kinds_and_held_out_split(tmp_path):
    qa = write_jsonl(tmp_path / "support.jsonl", qa_rows(30))
    mc = tmp_path / "colours.json"
    mc.write_text(json.dumps(mc_rows(30)))
    code = write_jsonl(tmp_path / "code.jsonl", code_rows(30))
    tasks = load_tasks(f"{qa},{mc},{code}", train_per_task=12, test_per_task=6, seed=3, min_train=8)
    assert [t.name for t in tasks] == ["support", "colours", "code"]
    assert [t.kind for t in tasks] == ["text", "mc", "tests"]
    for t in tasks:
        assert len(t.train) == 12 and len(t.test) == 6 and t.held_out
        assert not {e.prompt for e in t.train} & {e.prompt for e in t.test}  # disjoint
    letter = {r["question"]: r["answer"] for r in mc_rows(30)}
    for ex in tasks[1].train:  # the letter answers name the choice by position
        assert ex.choices == ["red", "green", "blue"] and ex.gold == "ABC".index(letter[ex.prompt])
    code_ex = tasks[2].test[0]
    assert code_ex.tests and code_ex.tests[0].startswith("assert add")
    assert "Your code should pass these tests:" in code_ex.prompt and code_ex.tests[0] in code_ex.prompt
    # the stream trains the response after the rendered prompt (plus EOS); MC trains the gold answer
    tok = byte_tokenizer()
    stream = build_stream(tok, tasks, max_length=256)
    assert stream.boundaries == [0, 12, 24]
    first = stream.examples[0]
    assert tok.decode(first.target_ids).startswith(tasks[0].train[0].response)
    assert first.target_ids[-1] == tok.eos_token_id
    assert tok.decode(stream.examples[12].target_ids).strip() in ("red", "green", "blue")
    again = load_tasks(f"{qa},{mc},{code}", train_per_task=12, test_per_task=6, seed=3)
    assert [e.prompt for e in again[0].test] == [e.prompt for e in tasks[0].test]  # seeded


def test_other_formats_csv_instruction_messages_and_given_test_file(tmp_path):
    with (tmp_path / "tickets.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        for i in range(20):
            w.writerow({"instruction": f"Reply to ticket {i}", "input": "printer broken", "output": f"fix {i}"})
    chats = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
             for i in range(20)]
    chat = write_jsonl(tmp_path / "chat.jsonl", chats)
    chat_test = write_jsonl(tmp_path / "chat_test.jsonl", chats[:5])
    tasks = load_tasks(f"{tmp_path / 'tickets.csv'},{chat}", test_data=f",{chat_test}", train_per_task=None,
                       test_per_task=4)
    assert [t.kind for t in tasks] == ["text", "text"]
    assert tasks[0].train[0].prompt.startswith("Reply to ticket") and "printer broken" in tasks[0].train[0].prompt
    assert len(tasks[1].train) == 20 and len(tasks[1].test) == 4 and not tasks[1].held_out
    assert tasks[1].test[0].messages[-1]["role"] == "user"


def test_detect_kind():
    assert detect_kind(["question", "choices", "answer"], {"question": "q", "choices": ["a", "b"], "answer": 0}) == "mc"
    llm_adapters = {"instruction": "Pick. Answer format: true/false", "answer": "true"}
    assert detect_kind(["instruction", "answer"], llm_adapters) == "mc"
    assert detect_kind(["text", "code", "test_list"], code_rows(1)[0]) == "tests"
    assert detect_kind(["prompt", "response"], qa_rows(1)[0]) == "text"
    math_row = {"instruction": "How many tiles?", "input": "", "output": "24 * 24 = 576", "answer": "576"}
    assert detect_kind(list(math_row), math_row) == "text"  # an answer field without candidates


def test_task_names_from_paths_and_hub_ids(tmp_path):
    p = write_jsonl(tmp_path / "month1.jsonl", qa_rows(2))
    assert task_name(p) == "month1"
    (tmp_path / "gsm8k").mkdir()
    assert task_name(write_jsonl(tmp_path / "gsm8k" / "test.jsonl", qa_rows(2))) == "gsm8k"
    assert task_name("google-research-datasets/mbpp@test") == "mbpp@test"
    assert task_name("owner/data") == "data"


def test_a_single_task_stream_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match=r"ContinualConfig.tasks: a continual stream needs at least two tasks.*"
                                          r"--tasks has one \('only.jsonl'\)"):
        ContinualConfig(tasks="only.jsonl")
    with pytest.raises(ConfigError, match="at least two tasks"):
        ContinualConfig(tasks="synthetic:1")
    ContinualConfig(tasks="synthetic")  # three synthetic tasks
    with pytest.raises(ConfigError, match="test_data: has 1 entries for 2 tasks"):
        ContinualConfig(tasks="a.jsonl,b.jsonl", test_data="t.jsonl")


def test_a_file_too_small_for_its_test_split_names_the_file_and_flag(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", qa_rows(40))
    small = write_jsonl(tmp_path / "small.jsonl", qa_rows(10, "s"))
    with pytest.raises(StreamError, match=r"small.jsonl: 10 rows are too few to hold out --test-per-task 6 test "
                                          r"rows and keep 8 for training"):
        load_tasks(f"{big},{small}", test_per_task=6, min_train=8)
    load_tasks(f"{big},{small}", test_per_task=2, min_train=8)  # fits


def test_a_format_the_learner_cannot_score_is_refused(tmp_path):
    text = write_jsonl(tmp_path / "notes.jsonl", [{"text": f"just some text {i}"} for i in range(20)])
    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows(20))
    with pytest.raises(StreamError, match=r"notes.jsonl: the learner cannot score a text-only data set "
                                          r"\(format 'text', field 'text'"):
        load_tasks(f"{qa},{text}", test_per_task=4)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"a": 1, "b": 2}] * 20)
    with pytest.raises(StreamError, match="odd.jsonl: could not detect the data format"):
        load_tasks(f"{qa},{odd}", test_per_task=4)
    bad_gold = tmp_path / "bad.json"
    bad_gold.write_text(json.dumps([{"question": "q", "choices": ["a", "b"], "answer": "z"}] * 20))
    with pytest.raises(StreamError, match=r"bad.json, row 1: field 'answer' = 'z' names none of the 2 choices"):
        load_tasks(f"{qa},{bad_gold}", test_per_task=4)
    with pytest.raises(StreamError, match="built-in task 'sst2' has its own test set"):
        load_tasks(f"sst2,{qa}", test_data=f"{qa},")
    with pytest.raises(StreamError, match=r"--tasks entry .*missing.jsonl.*not found"):
        load_tasks(f"{qa},{tmp_path / 'missing.jsonl'}", test_per_task=4)


def test_accuracy_metric_on_free_text_tasks_keeps_their_loss_score():
    from loramix.continual.scoring import task_score

    assert task_score("mc") == "acc" and task_score("tests") == "pass@1" and task_score("text") == "loss"
    assert task_score("mc", "acc_norm") == "acc_norm" and task_score("text", "acc") == "loss"
    assert task_score("mc", "loss") == "loss" and task_score("tests", "loss") == "loss"


def test_relative_task_files_are_found_under_data_dir(tmp_path, monkeypatch):
    (tmp_path / "streams").mkdir()
    write_jsonl(tmp_path / "streams" / "a.jsonl", qa_rows(20, "a"))
    write_jsonl(tmp_path / "streams" / "b.jsonl", qa_rows(20, "b"))
    write_jsonl(tmp_path / "streams" / "b_test.jsonl", qa_rows(5, "t"))
    monkeypatch.chdir(tmp_path / "streams")  # found from the working directory
    assert [t.name for t in load_tasks("a.jsonl,b.jsonl", test_per_task=4)] == ["a", "b"]
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.delenv("LORAMIX_DATA_DIR", raising=False)
    tasks = load_tasks("streams/a.jsonl,streams/b.jsonl", tmp_path, test_per_task=4,
                       test_data=",streams/b_test.jsonl")
    assert len(tasks[1].test) == 4 and tasks[1].test[0].prompt.startswith("t question")
    with pytest.raises(StreamError, match="not found"):
        load_tasks("streams/a.jsonl,streams/b.jsonl", test_per_task=4)


def test_code_stream_config_resolves():
    from pathlib import Path

    from loramix.continual import resolve_config

    cfg = resolve_config(Path(__file__).parents[1] / "configs" / "continual" / "code_stream.yaml")
    assert cfg.tasks.split(",") == ["code/codealpaca/code_alpaca_2k.json", "code/mbpp/mbpp.jsonl"]
    assert cfg.threshold == "auto" and cfg.temperature == "auto" and cfg.metric == "auto"


def test_a_task_with_empty_responses_is_refused_like_train_refuses_it(tmp_path, caplog):
    """The check `loramix train` applies: a task whose every response is empty is refused naming the file and,
    for LLM-Adapters' math layout, the field that holds the answers; a task with some empty responses leaves
    those rows out of its training and test sets."""
    import logging

    qa = write_jsonl(tmp_path / "qa.jsonl", qa_rows(20))
    math = tmp_path / "mawps" / "test.json"
    math.parent.mkdir()
    math.write_text(json.dumps([{"instruction": f"What is {i} + 1?", "input": "", "output": "", "answer": str(i + 1)}
                                for i in range(20)]))
    with pytest.raises(StreamError, match=r"mawps/test\.json: all 20 rows have an empty response; nothing to train "
                                          r"on; field 'output' is empty in every row, but field 'answer' is not"):
        load_tasks(f"{qa},{math}", test_per_task=4)
    blank_test = write_jsonl(tmp_path / "blank_test.jsonl", [{"prompt": f"q {i}", "response": ""} for i in range(5)])
    with pytest.raises(StreamError, match=r"blank_test\.jsonl: all 5 rows have an empty response; nothing to score"):
        load_tasks(f"{qa},{qa}", test_data=f"{qa},{blank_test}")
    some = write_jsonl(tmp_path / "some.jsonl", [{"prompt": f"q {i}", "response": "" if i % 4 == 0 else f"a {i}"}
                                                 for i in range(20)])
    with caplog.at_level(logging.WARNING, logger="loramix.continual.sources"):
        tasks = load_tasks(f"{qa},{some}", test_per_task=4, train_per_task=None)
    assert len(tasks[1].train) + len(tasks[1].test) == 15
    assert all(ex.response.strip() for ex in tasks[1].train + tasks[1].test)
    assert "some.jsonl: 5 of 20 rows have an empty response and are left out" in caplog.text
