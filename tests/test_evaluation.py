"""evaluation.py: perplexity, multiple-choice scoring, math exact match, the driver and the reports."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers.tiny_models import tiny_model
from helpers.tiny_tokenizer import tiny_tokenizer
from loramix import evaluation as ev

_SENTENCES = (
    "the cat sat on the mat and it was good . the dog sat on the mat and it was bad . "
    "hello world how are you ? what is 1 plus 2 ? it is 3 ."
)
TEXT = " ".join(_SENTENCES.split() * 3)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --- perplexity ---------------------------------------------------------------------------------------
def test_perplexity_equals_exp_mean_nll_by_hand_when_stride_equals_window():
    model, tok = tiny_model("llama", seed=0), tiny_tokenizer()
    ids = _ids(tok, TEXT)
    window = 16
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = torch.tensor([ids[start : start + window]])
            if chunk.shape[1] < 2:
                continue
            logp = F.log_softmax(model(input_ids=chunk).logits[0].float(), -1)
            for t in range(1, chunk.shape[1]):  # each window's first token has no context
                total -= float(logp[t - 1, chunk[0, t]])
                count += 1
    res = ev.perplexity(model, tok, TEXT, max_length=window, stride=window, progress=False)
    assert res["num_tokens"] == count
    assert res["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert res["num_windows"] == math.ceil(len(ids) / window)


def test_sliding_window_scores_every_token_once_with_context():
    model, tok = tiny_model("llama", seed=0), tiny_tokenizer()
    n = len(_ids(tok, TEXT))
    res = ev.perplexity(model, tok, TEXT, max_length=16, stride=4, progress=False)
    assert res["num_tokens"] == n - 1  # only the very first token is unscored
    # the last window's scored tokens are predicted with 12 tokens of context: check one window by hand
    ids = _ids(tok, TEXT)
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([ids[:16]])).logits[0], -1)
    first = sum(-float(logp[t - 1, ids[t]]) for t in range(1, 16))
    one = ev.perplexity(model, tok, TEXT, max_length=16, stride=4, limit=1, progress=False)
    assert one["num_tokens"] == 15 and one["nll"] == pytest.approx(first / 15, rel=1e-5)
    non_overlap = ev.perplexity(model, tok, TEXT, max_length=16, stride=16, progress=False)
    assert res["perplexity"] != pytest.approx(non_overlap["perplexity"], rel=1e-6)


def test_perplexity_ignores_the_loramix_aux_loss():
    import loramix

    model, tok = tiny_model("llama", seed=1), tiny_tokenizer()
    before = ev.perplexity(model, tok, TEXT, max_length=16, stride=8, progress=False)
    loramix.inject(model, loramix.MixLoraConfig(num_experts=4, top_k=2, r=4, attn_r=4, balance_coef=10.0))
    after = ev.perplexity(model, tok, TEXT, max_length=16, stride=8, progress=False)
    assert after["perplexity"] == pytest.approx(before["perplexity"], rel=1e-4)  # B = 0: same model


def test_perplexity_rejects_bad_arguments(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError):
        ev.perplexity(model, tok, TEXT, path=tmp_path / "x")
    with pytest.raises(ValueError, match="stride"):
        ev.perplexity(model, tok, TEXT, max_length=8, stride=9)


# --- multiple choice ------------------------------------------------------------------------------------
ARC = (
    "Please choose the correct answer to the question: Which is a cat?\n\nAnswer1: a dog. Answer2: a cat. "
    "Answer3: a mat. Answer4: the world.\n\nAnswer format: answer1/answer2/answer3/answer4"
)
BOOLQ = "Please answer the following question with true or false, question: is it good?\n\nAnswer format: true/false"
PIQA = (
    "Please choose the correct solution to the question: x\n\nSolution1: a b\n\nSolution2: c d\n\n"
    "Answer format: solution1/solution2"
)


def test_answer_candidates_and_option_texts():
    assert ev.answer_candidates(ARC) == ["answer1", "answer2", "answer3", "answer4"]
    assert ev.answer_candidates(BOOLQ) == ["true", "false"]
    assert ev.answer_candidates(PIQA) == ["solution1", "solution2"]
    assert ev.answer_candidates("true or false: is it?") == ["true", "false"]
    with pytest.raises(ValueError):
        ev.answer_candidates("no format here")
    assert ev.option_texts(ARC) == {
        "answer1": "a dog.",
        "answer2": "a cat.",
        "answer3": "a mat.",
        "answer4": "the world.",
    }
    assert ev.option_texts(PIQA) == {"solution1": "a b", "solution2": "c d"}


def _hand_loglik(model, tok, context: str, choice: str) -> float:
    ctx = _ids(tok, context)
    cont = _ids(tok, context + " " + choice)[len(ctx) :]
    full = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=full).logits[0], -1)
    return sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))


def test_mc_scoring_matches_hand_loglikelihoods_and_is_batch_invariant():
    model, tok = tiny_model("llama", seed=2), tiny_tokenizer()
    recs = [
        {"instruction": ARC, "input": "", "output": "the correct answer is answer2", "answer": "answer2"},
        {"instruction": BOOLQ, "input": "", "output": "the correct answer is true", "answer": "true"},
        {"instruction": "what is 1 plus 2 ?\n\nAnswer format: 3/12/42", "input": "hello", "answer": "3"},
    ]
    items = ev.build_mc_items(tok, recs)
    assert [it["gold"] for it in items] == [1, 0, 0]
    assert items[0]["context"].endswith("assistant the correct answer is")
    assert "hello" in items[2]["context"]  # input appended to the instruction
    res1 = ev.score_multiple_choice(model, tok, items, batch_size=1, progress=False)
    res4 = ev.score_multiple_choice(model, tok, items, batch_size=4, progress=False)
    for item, p1, p4 in zip(items, res1["predictions"], res4["predictions"], strict=True):
        hand = [_hand_loglik(model, tok, item["context"], c) for c in item["choices"]]
        assert p1["loglikelihoods"] == pytest.approx(hand, abs=1e-4)
        assert p4["loglikelihoods"] == pytest.approx(hand, abs=1e-4)  # right padding does not leak
        assert p1["pred"] == max(range(len(hand)), key=hand.__getitem__)
    expected_acc = sum(p["pred"] == it["gold"] for p, it in zip(res1["predictions"], items, strict=True)) / 3
    assert res1["acc"] == pytest.approx(expected_acc) and res1["n"] == 3


def test_candidates_differing_in_their_last_token_share_one_forward_row():
    model, tok = tiny_model("llama", seed=2), tiny_tokenizer()
    rows: list[int] = []
    handle = model.register_forward_hook(
        lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    items = ev.build_mc_items(
        tok, [{"instruction": ARC, "answer": "answer2"}, {"instruction": BOOLQ, "answer": "true"}]
    )
    try:
        res = ev.score_multiple_choice(model, tok, items, batch_size=8, progress=False)
    finally:
        handle.remove()
    assert rows == [2]  # 6 (item, candidate) requests, 2 distinct model inputs, one batch
    hand = [_hand_loglik(model, tok, items[0]["context"], c) for c in items[0]["choices"]]
    assert res["predictions"][0]["loglikelihoods"] == pytest.approx(hand, abs=1e-4)


@pytest.mark.parametrize("favoured", ["answer1", "answer3"])
def test_mc_picks_the_candidate_the_model_makes_most_likely(favoured):
    model, tok = tiny_model("llama", seed=3), tiny_tokenizer()
    boost = tok.convert_tokens_to_ids(favoured)

    def hook(module, args, out):
        out = out.clone()
        out[..., boost] += 20.0
        return out

    rec = {"instruction": ARC, "input": "", "answer": "answer2"}
    items = ev.build_mc_items(tok, [rec])
    handle = model.lm_head.register_forward_hook(hook)
    try:
        res = ev.score_multiple_choice(model, tok, items, progress=False)
    finally:
        handle.remove()
    pred = res["predictions"][0]["pred"]
    assert items[0]["choices"][pred] == favoured
    assert res["acc"] == 0.0  # gold is answer2
    rec["answer"] = favoured
    handle = model.lm_head.register_forward_hook(hook)
    try:
        assert ev.score_multiple_choice(model, tok, ev.build_mc_items(tok, [rec]), progress=False)["acc"] == 1.0
    finally:
        handle.remove()


def test_choice_text_mode_scores_option_texts():
    tok = tiny_tokenizer()
    items = ev.build_mc_items(tok, [{"instruction": ARC, "answer": "answer2"}], choice_text=True)
    assert items[0]["choices"] == ["a dog.", "a cat.", "a mat.", "the world."]
    assert items[0]["gold"] == 1


def test_bad_gold_answer_is_reported():
    with pytest.raises(ValueError, match="not among the candidates"):
        ev.build_mc_items(tiny_tokenizer(), [{"instruction": BOOLQ, "answer": "maybe"}])


def test_encode_pair_moves_trailing_space_into_the_continuation():
    tok = tiny_tokenizer()
    ctx, cont = ev.encode_pair(tok, "the correct answer is ", "answer1")
    assert tok.convert_ids_to_tokens(cont) == ["answer1"]
    assert tok.convert_ids_to_tokens(ctx)[-1] == "is"


# --- math ---------------------------------------------------------------------------------------------
def test_number_and_letter_extraction():
    assert ev.extract_number("so 3 + 4 = 7. The answer is 1,234.5") == 1234.5
    assert ev.extract_number("it is -3") == -3.0
    assert ev.extract_number("no digits") is None
    assert ev.math_correct("The answer is 576.", "576.0")
    assert not ev.math_correct("The answer is 575.", "576.0")
    assert ev.math_correct("x is 1.8333", "1.8333333333333335")
    assert ev.math_correct("Between (A) and (D), the answer is (D).", "D")
    assert not ev.math_correct("The answer is (B).", "D")
    assert ev.extract_letter("A ) 38 , so C") == "C"


# --- data files and the driver -------------------------------------------------------------------------
@pytest.fixture()
def data_dir(tmp_path):
    root = tmp_path / "data"
    (root / "wikitext2" / "raw").mkdir(parents=True)
    (root / "wikitext2" / "raw" / "wiki.test.raw.txt").write_bytes(TEXT.replace(" . ", " .\r\n").encode())
    arc = root / "llm_adapters_commonsense" / "ARC-Easy"
    arc.mkdir(parents=True)
    arc_recs = [{"instruction": ARC, "input": "", "output": "the correct answer is answer2", "answer": "answer2"}] * 3
    (arc / "test.json").write_text(json.dumps(arc_recs))
    gsm = root / "llm_adapters_math" / "gsm8k"
    gsm.mkdir(parents=True)
    gsm_recs = [
        {"instruction": "what is 1 plus 2 ?", "input": "", "output": "", "answer": "3.0"},
        {"instruction": "what is 42 ?", "input": "", "output": "", "answer": "42"},
    ]
    (gsm / "test.json").write_text(json.dumps(gsm_recs))
    return root


def test_data_dir_from_argument_or_env(data_dir, monkeypatch):
    monkeypatch.delenv(ev.DATA_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=ev.DATA_ENV):
        ev.resolve_data_dir()
    monkeypatch.setenv(ev.DATA_ENV, str(data_dir))
    assert ev.resolve_data_dir() == data_dir
    assert ev.task_path("ARC-Easy").name == "test.json"
    with pytest.raises(FileNotFoundError, match="boolq"):
        ev.task_path("boolq")
    with pytest.raises(ValueError, match="unknown task"):
        ev.task_kind("nope")


def test_math_exact_match_uses_the_replies(data_dir, monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    monkeypatch.setattr(ev, "generate_greedy", lambda m, t, prompts, **kw: ["it is 3", "it is 41"][: len(prompts)])
    res = ev.evaluate_math(model, tok, "gsm8k", data_dir=data_dir, progress=False)
    assert res["exact_match"] == 0.5 and res["n"] == 2
    assert [p["correct"] for p in res["predictions"]] == [True, False]


def test_generate_greedy_batches_with_left_padding():
    model, tok = tiny_model("llama", seed=4), tiny_tokenizer()
    prompts = [_ids(tok, "hello world how are you"), _ids(tok, "cat"), _ids(tok, "the dog sat on the mat")]
    batched = ev.generate_greedy(model, tok, prompts, max_new_tokens=5, batch_size=3)
    single = [ev.generate_greedy(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_evaluate_driver_results_json_and_table(data_dir, tmp_path):
    model, tok = tiny_model("llama", seed=5), tiny_tokenizer()
    res = ev.evaluate(
        model,
        tok,
        ["wikitext2", "ARC-Easy", "gsm8k"],
        data_dir=data_dir,
        limit=2,
        max_length=16,
        stride=8,
        max_new_tokens=4,
        progress=False,
    )
    t = res["tasks"]
    assert set(t) == {"wikitext2", "ARC-Easy", "gsm8k"}
    assert t["wikitext2"]["perplexity"] > 1 and t["wikitext2"]["num_windows"] == 2
    assert t["ARC-Easy"]["n"] == 2 and 0 <= t["ARC-Easy"]["acc"] <= 1 and "predictions" not in t["ARC-Easy"]
    assert t["gsm8k"]["n"] == 2 and "exact_match" in t["gsm8k"]
    path = ev.save_results(res, tmp_path / "out" / "r.json")
    assert json.loads(path.read_text())["tasks"]["ARC-Easy"]["n"] == 2
    table = ev.results_table(res)
    assert table.splitlines()[0].startswith("| task | metric |") and "| ARC-Easy | acc | 2 |" in table
    both = ev.results_table({"a": res, "b": {"tasks": {"ARC-Easy": {"acc": 1.0, "n": 2}}}})
    assert "100.0%" in both and "| wikitext2 |" in both
    with pytest.raises(ValueError, match="unknown task"):
        ev.evaluate(model, tok, ["nope"], data_dir=data_dir)


# --- real model on real data ----------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_on_real_data():
    root = os.environ.get(ev.DATA_ENV)
    if not root or not Path(root).is_dir():
        pytest.skip(f"{ev.DATA_ENV} not set")
    from loramix.generation import load_for_inference

    model, tok = load_for_inference(None, device="cpu", dtype="float32")
    res = ev.evaluate(model, tok, ["wikitext2", "boolq", "gsm8k"], limit=4, max_new_tokens=64, progress=False)
    assert 1 < res["tasks"]["wikitext2"]["perplexity"] < 100
    assert res["tasks"]["boolq"]["n"] == 4 and res["tasks"]["gsm8k"]["n"] == 4


# --- counts that would give wrong figures -------------------------------------------------------------------
@pytest.mark.parametrize("limit", [0, -5])
def test_a_limit_below_one_is_refused(data_dir, limit):
    """limit=0 used to print nan% and limit=-5 to score all but the last five items; both are errors now,
    for every kind of task and before any model work."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    for task in ("wikitext2", "ARC-Easy", "gsm8k"):
        with pytest.raises(ValueError, match=rf"limit: must be an int >= 1 or None, got {limit}"):
            ev.evaluate(model, tok, [task], data_dir=data_dir, limit=limit, progress=False)
    with pytest.raises(ValueError, match="limit"):
        ev.perplexity(model, tok, TEXT, max_length=16, limit=limit, progress=False)
    with pytest.raises(ValueError, match="limit"):
        ev.load_records(data_dir / "llm_adapters_commonsense" / "ARC-Easy" / "test.json", limit)


@pytest.mark.parametrize("option, value", [("batch_size", 0), ("max_length", 1), ("stride", 0),
                                           ("max_new_tokens", 0), ("batch_size", "8")])
def test_other_eval_counts_are_checked(data_dir, option, value):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match=rf"^{option}: must be an int"):
        ev.evaluate(model, tok, ["ARC-Easy"], data_dir=data_dir, progress=False, **{option: value})


def test_perplexity_stride_follows_a_short_context():
    """A model whose context is shorter than 512 tokens gets a stride of half its window by default (a fixed
    512 used to make the evaluation impossible); a stride longer than the window names the window."""
    model, tok = tiny_model("llama"), tiny_tokenizer()  # max_position_embeddings = 64
    res = ev.perplexity(model, tok, TEXT, progress=False)
    assert (res["max_length"], res["stride"]) == (64, 32)
    assert res["num_tokens"] == len(_ids(tok, TEXT)) - 1
    assert ev.perplexity(model, tok, TEXT, stride=16, progress=False)["stride"] == 16
    with pytest.raises(ValueError, match=r"stride must be in \[1, window=64\]"):
        ev.perplexity(model, tok, TEXT, stride=100, progress=False)


def test_eval_records_errors_name_the_line(tmp_path):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"a": 1}\n\n{"a": 2\n')
    with pytest.raises(ValueError, match=r"t\.jsonl, line 3: not valid JSON"):
        ev.load_records(bad)
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(ValueError, match=r"e\.json: holds no records"):
        ev.load_records(tmp_path / "e.json")
