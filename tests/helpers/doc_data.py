"""Small stand-ins, in the real files' formats, for the data the documented commands read: the public data
sets under LORAMIX_DATA_DIR (counsel-chat, the LLM-Adapters commonsense and math sets, WikiText-2, SST-2,
SAMSum, DialogSum, Code Alpaca, MBPP) and the user's own files the pages name (support tickets, reviews)."""

from __future__ import annotations

import json
import random
from pathlib import Path

ROWS = 40
ADJ = ["great", "awful", "boring", "moving", "funny", "dull", "brilliant", "weak", "charming", "messy"]
NOUN = ["acting", "plot", "music", "ending", "script", "cast", "pacing"]
NAMES = ["Anna", "Bob", "Carla", "Dev", "Emma", "Farid"]
TOPICS = ["the trip", "dinner", "the exam", "a new job", "the rent", "a concert"]
QUESTIONS = ["is the sky blue", "do cats bark", "is water wet", "can fish fly", "is ice cold", "do birds swim",
             "is fire hot", "is snow green"]
WORRIES = ["I can't sleep before exams", "I feel anxious at work", "my friend ignores me", "I argue with my sister",
           "I feel tired all the time", "I am nervous about a new job"]
PRODUCTS = ["router", "printer", "phone", "laptop", "headset"]
PROBLEMS = ["does not turn on", "keeps restarting", "is very slow", "lost its settings", "makes a noise"]


def _write_json(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))


def _write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def review_rows(n: int = ROWS, seed: int = 0) -> list[tuple[str, int]]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        adj = r.choice(ADJ)
        out.append((f"the {r.choice(NOUN)} was {adj} and the {r.choice(NOUN)} felt {r.choice(ADJ)}",
                    int(ADJ.index(adj) % 2 == 0)))
    return out


def commonsense_rows(task: str, n: int = ROWS, seed: int = 0) -> list[dict[str, str]]:
    """LLM-Adapters commonsense rows: the question, the options and `Answer format: ...` in `instruction`,
    `the correct answer is <x>` in `output`, `<x>` in `answer`."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        q = r.choice(QUESTIONS)
        if task == "boolq":
            a = r.choice(["true", "false"])
            text = (f"Please answer the following question with true or false, question: {q}?\n\n"
                    "Answer format: true/false")
        elif task == "winogrande":
            a = r.choice(["option1", "option2"])
            text = (f"Please choose the correct answer to fill in the blank: {r.choice(NAMES)} helped _ today.\n\n"
                    f"Option1: {r.choice(NAMES)} Option2: {r.choice(NAMES)} Answer format: option1/option2")
        elif task == "piqa":
            a = r.choice(["solution1", "solution2"])
            text = (f"Please choose the correct solution to the question: how to open a jar {i}?\n\n"
                    "Solution1: turn the lid Solution2: shake it\n\nAnswer format: solution1/solution2")
        else:
            k = 3 if task == "social_i_qa" else 4
            a = f"answer{r.randint(1, k)}"
            options = " ".join(f"Answer{j}: {r.choice(ADJ)}" for j in range(1, k + 1))
            formats = "/".join(f"answer{j}" for j in range(1, k + 1))
            text = f"Please choose the correct answer to the question: {q}?\n\n{options}\n\nAnswer format: {formats}"
        rows.append({"instruction": text, "input": "", "output": f"the correct answer is {a}", "answer": a})
    return rows


def math_rows(task: str, n: int = ROWS, seed: int = 0) -> list[dict[str, str]]:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        x, y = r.randint(1, 20), r.randint(1, 20)
        if task == "AQuA":
            rows.append({"instruction": f"What is {x} plus {y}? Answer Choices: (A) {x + y} (B) {x * y} (C) 0 (D) 1 "
                                        "(E) 2", "input": "", "output": "\nThe answer is (A).", "answer": "A"})
        else:
            rows.append({"instruction": f"Anna has {x} apples and gets {y} more. How many apples does she have?",
                         "input": "", "output": f"\nA: {x} + {y} = {x + y}. The answer is {x + y}.",
                         "answer": f"{x + y}.0"})
    return rows


def dialogue(r: random.Random) -> tuple[str, str]:
    x, y = r.sample(NAMES, 2)
    t = r.choice(TOPICS)
    return f"#Person1#: Did you hear about {t}?\n#Person2#: Yes, {x} told me.", f"{x} and {y} talk about {t}."


def ticket_rows(n: int = ROWS, seed: int = 0, product: str | None = None) -> list[dict[str, str]]:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        p = product or r.choice(PRODUCTS)
        problem = r.choice(PROBLEMS)
        rows.append({"prompt": f"My {p} {problem}. What should I do?",
                     "response": f"Unplug the {p} for ten seconds, then start it again."})
    return rows


def code_rows(n: int = ROWS) -> list[dict]:
    """MBPP's layout: `text`, `code`, `test_list`, `test_setup_code`."""
    return [{"text": f"Write a function add{i} returning a + {i}.", "code": f"def add{i}(a):\n    return a + {i}",
             "task_id": i, "test_setup_code": "", "test_list": [f"assert add{i}(1) == {i + 1}"]} for i in range(n)]


def write_data_dir(root: Path, n: int = ROWS) -> Path:
    """A LORAMIX_DATA_DIR with ``n`` rows in each of the files the documented commands read."""
    r = random.Random(0)
    _write_jsonl(root / "counsel_chat" / "counsel_chat_context_response.jsonl",
                 [{"Context": f"{w}. What can I do?", "Response": "Talk to someone you trust and keep a routine."}
                  for w in (r.choice(WORRIES) for _ in range(n))])
    for task in ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"):
        for seed, split in enumerate(("train", "test")):
            _write_json(root / "llm_adapters_commonsense" / task / f"{split}.json", commonsense_rows(task, n, seed))
    for task in ("piqa", "social_i_qa", "winogrande"):
        _write_json(root / "llm_adapters_commonsense" / task / "test.json", commonsense_rows(task, n))
    for task in ("AQuA", "SVAMP", "gsm8k"):
        _write_json(root / "llm_adapters_math" / task / "test.json", math_rows(task, n))
    wiki = root / "wikitext2" / "raw"
    wiki.mkdir(parents=True, exist_ok=True)
    (wiki / "wiki.test.raw.txt").write_bytes(
        "\r\n".join(f" = Section {i} = \r\n The {r.choice(NOUN)} was {r.choice(ADJ)} . " for i in range(n)).encode())
    (root / "sst2").mkdir(parents=True, exist_ok=True)
    for seed, split in enumerate(("train", "dev", "test")):
        lines = ["sentence\tlabel"] + [f"{s}\t{y}" for s, y in review_rows(n, seed)]
        (root / "sst2" / f"sst2_{split}.tsv").write_text("\n".join(lines) + "\n")
    for split in ("validation", "test"):
        _write_json(root / "summarization" / "samsum" / f"{split}.json", [
            {"instruction": "Please summarize the following dialogue from SAMSum dataset.", "dialogue": d,
             "summary": s} for d, s in (dialogue(r) for _ in range(n))])
    _write_jsonl(root / "summarization" / "dialogsum" / "dialogsum.dev.jsonl",
                 [{"fname": f"dev_{i}", "dialogue": d, "summary": s, "topic": "talk"}
                  for i, (d, s) in enumerate(dialogue(r) for _ in range(n))])
    _write_jsonl(root / "summarization" / "dialogsum" / "dialogsum.test.jsonl",
                 [{"fname": f"test_{i}", "dialogue": d, "summary1": s, "topic1": "talk", "summary2": s,
                   "topic2": "talk", "summary3": s, "topic3": "talk"}
                  for i, (d, s) in enumerate(dialogue(r) for _ in range(n))])
    _write_json(root / "code" / "codealpaca" / "code_alpaca_2k.json",
                [{"instruction": f"Write a Python expression for {x} times {y}.", "input": "",
                  "output": f"{x} * {y}"} for x, y in ((r.randint(1, 9), r.randint(1, 9)) for _ in range(n))])
    _write_jsonl(root / "code" / "mbpp" / "mbpp.jsonl", code_rows(n))
    return root


def write_user_files(work: Path, n: int = ROWS) -> None:
    """The user's own files the pages name, in the working directory: training data (`data.jsonl`), reviews
    and dialogues for skills (`sst2.jsonl`, `dialogsum.jsonl`), support tickets for continual learning (JSONL,
    CSV, Parquet), code tasks with MBPP's tests, and a check text for `loramix export --check-text`."""
    import pandas as pd

    r = random.Random(1)
    _write_jsonl(work / "data.jsonl", [{"prompt": f"{w}. What can I do?", "response": "Try a calm routine."}
                                       for w in (r.choice(WORRIES) for _ in range(n))])
    _write_jsonl(work / "sst2.jsonl", [
        {"prompt": f"Classify the sentiment of this movie review as positive or negative: {s}",
         "response": "positive" if y else "negative"} for s, y in review_rows(n)])
    _write_jsonl(work / "dialogsum.jsonl", [{"prompt": f"Summarize this dialogue:\n{d}", "response": s}
                                            for d, s in (dialogue(r) for _ in range(n))])
    for name, seed in (("tickets_jan", 1), ("tickets_feb", 2), ("tickets_march", 3)):
        _write_jsonl(work / f"{name}.jsonl", ticket_rows(n, seed))
    pd.DataFrame(ticket_rows(n, 4, "printer")).to_csv(work / "tickets_april.csv", index=False)
    pd.DataFrame([{"instruction": f"How do I pair the new watch with {p}?", "input": "",
                   "output": "Open the app and hold the crown for three seconds."}
                  for p in (r.choice(PRODUCTS) for _ in range(n))]).to_parquet(work / "new_product.parquet")
    _write_json(work / "code_alpaca_2k.json", [
        {"instruction": f"Write a Python expression for {x} times {y}.", "input": "", "output": f"{x} * {y}"}
        for x, y in ((r.randint(1, 9), r.randint(1, 9)) for _ in range(n))])
    _write_jsonl(work / "mbpp.jsonl", code_rows(n))
    _write_jsonl(work / "mbpp_test.jsonl", code_rows(8))
    (work / "counsel_check.txt").write_text(" ".join(f"{w}." for w in WORRIES * 4))
