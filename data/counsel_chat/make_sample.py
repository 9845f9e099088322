"""Rebuild counsel_chat_sample.jsonl from the counsel-chat CSV (nbertagnolli/counsel-chat, MIT).

    python data/counsel_chat/make_sample.py path/to/20200325_counsel_chat.csv

Rows: questions of the source's ``train`` split; per question its most up-voted answer (the first one on
a tie); kept when the answer has at least 100 characters and question and answer together at most 1,000
(under 270 tokens with SmolLM2's chat template). Texts are stripped, and a space is put back where the
scrape joined two sentences (``end.Next`` becomes ``end. Next``). Source order (by question id) is kept.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

FIELDS = ["questionID", "topic", "questionTitle", "questionText", "answerText", "upvotes"]
JOINED = re.compile(r"([a-z][.!?])([A-Z])")


def clean(text: str) -> str:
    return JOINED.sub(r"\1 \2", text.strip())


def main(csv_path: str) -> None:
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    best: dict[int, dict[str, str]] = {}
    for r in rows:  # the most up-voted answer of each question, the first one on a tie
        qid = int(r["questionID"])
        if qid not in best or int(r["upvotes"]) > int(best[qid]["upvotes"]):
            best[qid] = r
    out = Path(__file__).with_name("counsel_chat_sample.jsonl")
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for qid in sorted(best):
            r = best[qid]
            question = clean(r["questionText"] or r["questionTitle"])
            answer = clean(r["answerText"])
            if len(answer) < 100 or len(question) + len(answer) > 1000:
                continue
            row = {"questionID": qid, "topic": r["topic"], "questionTitle": clean(r["questionTitle"]),
                   "questionText": question, "answerText": answer, "upvotes": int(r["upvotes"])}
            f.write(json.dumps({k: row[k] for k in FIELDS}, ensure_ascii=False) + "\n")
            n += 1
    print(f"{out}: {n} rows")


if __name__ == "__main__":
    main(sys.argv[1])
