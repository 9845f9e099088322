"""Scores of non-multiple-choice tasks (response loss, pass@1 with tests run in a subprocess) and the metrics'
sign conventions for a lower-is-better score."""

from __future__ import annotations

import math
import time

import pytest
import torch

from helpers.tiny_lm import byte_lm
from loramix.continual import summarize
from loramix.continual.metrics import summarize_by_score
from loramix.continual.scoring import (
    extract_code,
    pass_at_1,
    prepare_eval,
    routed_response_loss,
    run_tests,
    score_task,
)
from loramix.continual.stream import Example, Task


def test_run_tests_passes_fails_and_times_out():
    code = "def add(a, b):\n    return a + b\n"
    assert run_tests(code, ["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
    assert not run_tests(code, ["assert add(1, 2) == 4"])
    assert not run_tests("def add(a, b) return", ["assert add(1, 2) == 3"])  # syntax error
    assert run_tests("", ["assert X == 2"], setup="X = 2")  # setup runs before the tests
    start = time.monotonic()
    assert not run_tests("while True:\n    pass\n", ["assert True"], timeout=1.0)
    assert time.monotonic() - start < 10
    # isolated: no environment, an empty working directory
    assert run_tests("import os", ["assert 'HOME' not in os.environ", "assert os.listdir('.') == ['candidate.py']"])


def test_extract_code_takes_the_first_fenced_block():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\ndef g(): pass") == "def g(): pass"  # unclosed block runs to the end
    assert extract_code("def h(): return 2") == "def h(): return 2"
    assert pass_at_1(["```python\ndef f():\n    return 1\n```", "def f(): return 2"],
                     [(["assert f() == 1"], ""), (["assert f() == 1"], "")]) == 0.5


def test_metrics_for_a_lower_is_better_score_keep_their_signs():
    # losses: task 0 learned to 1.0, then rose to 1.5 (forgotten); task 1 went 2.0 -> 1.2
    R = [[1.0, 2.0], [1.5, 1.2]]
    base = [2.5, 2.2]
    m = summarize(R, base, higher_is_better=False)
    assert m["acc"] == pytest.approx(1.35)  # mean final loss, as is
    assert m["bwt"] == pytest.approx(-0.5)  # negative = forgetting, as for accuracy
    assert m["forgetting"] == pytest.approx(0.5)
    assert m["fwt"] == pytest.approx(0.2)  # 2.2 - 2.0: training task 0 lowered task 1's loss
    acc = summarize([[0.8, 0.3], [0.6, 0.7]], [0.5, 0.4])
    assert acc["bwt"] == pytest.approx(-0.2) and acc["forgetting"] == pytest.approx(0.2)


def test_metrics_by_score_group_tasks_of_one_score():
    R = [[0.9, 3.0, 0.1], [0.8, 2.0, 0.2], [0.7, 2.5, 0.6]]
    base = [0.5, 3.5, 0.1]
    by = summarize_by_score(R, base, ["acc", "loss", "acc"], {"acc": True, "loss": False})
    assert by["acc"]["tasks"] == [0, 2] and by["acc"]["acc"] == pytest.approx(0.65)
    assert by["acc"]["bwt"] == pytest.approx(0.7 - 0.9)  # only task 0 is before the last
    assert by["acc"]["fwt"] == pytest.approx(0.2 - 0.1)  # only task 2 is after the first
    assert by["loss"]["acc"] == pytest.approx(2.5)
    assert by["loss"]["bwt"] == pytest.approx(-(2.5 - 2.0))
    assert by["loss"]["fwt"] == pytest.approx(-(3.0 - 3.5))
    assert by["loss"]["forgetting"] == pytest.approx(2.5 - 2.0)


@pytest.fixture(scope="module")
def tiny():
    return byte_lm("llama")


def test_response_loss_matches_a_direct_computation(tiny):
    model, tok = tiny
    task = Task("t", [], [Example("say hi", [], -1, "t", response="hi there"),
                          Example("count", [], -1, "t", response="one two three")])
    ev = prepare_eval(tok, task, "loss")
    loss = score_task(model, tok, ev)
    total, n = 0.0, 0
    for ctx, tgt in ev.pairs:
        ids = torch.tensor([ctx + tgt])
        with torch.no_grad():
            logits = model(ids).logits[0, len(ctx) - 1 : -1]  # (len(tgt), V)
        total += float(torch.nn.functional.cross_entropy(logits.float(), torch.tensor(tgt), reduction="sum"))
        n += len(tgt)
    assert loss == pytest.approx(total / n, rel=1e-4)
    assert ev.pairs[0][1][-1] == tok.eos_token_id and math.isfinite(loss)
    assert routed_response_loss(model, tok, ev.pairs, None, None) == pytest.approx(loss)


def test_pass_at_1_generates_and_runs_the_tests(tiny, monkeypatch):
    model, tok = tiny
    task = Task("code", [], [Example("write f", [], -1, "code", response="def f(): return 1",
                                     tests=["assert f() == 1"])])
    ev = prepare_eval(tok, task, "pass@1")
    assert len(ev.prompts) == 1 and ev.tests == [(["assert f() == 1"], "")]
    assert score_task(model, tok, ev, max_new_tokens=4) == 0.0  # a random model writes no working code
    import loramix.continual.scoring as scoring

    monkeypatch.setattr(scoring, "routed_generate", lambda *a, **k: ["```python\ndef f():\n    return 1\n```"])
    assert score_task(model, tok, ev) == 1.0
