"""The real-data skills demo (bench.skills_demo, experiment code beside the package) on a tiny llama, fake data."""

from __future__ import annotations

import json

import pytest
import torch

from bench.skills_demo import devset, heldout
from bench.skills_demo.demo import (
    GATE_VARIANTS,
    SEED_INSTRUCTIONS,
    EmbeddingCache,
    boolq_question,
    choice_logliks,
    compare_gates,
    dev_items,
    evaluate,
    prepare,
    rouge_l,
)
from helpers.tiny_lm import save_tiny_lm
from loramix import load_adapter
from loramix.evaluation import encode_pair, loglikelihoods
from loramix.generation import render_chat
from loramix.models import load_base_model
from loramix.skills import SkillBlend, SkillLibrary, skills_add
from loramix.skills.gate import embed_prompts

TRAIN = dict(device="cpu", max_steps=3, batch_size=8, learning_rate=2e-2, val_size=0, r=4, attn_r=4, seed=1,
             logging_steps=1, adapter="lora")
REVIEWS = ["a gripping , moving film", "dull and far too long", "the cast is wonderful", "a messy , boring script",
           "funny from start to finish", "weak acting and a weaker plot"]
DIALOGUES = ["#Person1#: Are you coming to dinner?\n#Person2#: Yes, at eight.",
             "#Person1#: The rent is due.\n#Person2#: I paid it yesterday.",
             "#Person1#: How was the exam?\n#Person2#: Hard, but I passed."]
QUESTIONS = ["is the sky blue", "do cats have nine lives", "is water wet", "can penguins fly"]


def fake_data_dir(root):
    """The three staged sources the demo reads, a few rows each, in their real file formats."""
    (root / "sst2").mkdir(parents=True)
    for split in ("train", "test"):
        lines = ["sentence\tlabel"] + [f"{r}\t{1 - i % 2}" for i, r in enumerate(REVIEWS * 4)]
        (root / "sst2" / f"sst2_{split}.tsv").write_text("\n".join(lines) + "\n")
    ds = root / "summarization" / "dialogsum"
    ds.mkdir(parents=True)
    dev = [{"fname": f"d{i}", "dialogue": d, "summary": f"Summary {i}.", "topic": "t"}
           for i, d in enumerate(DIALOGUES * 4)]
    test = [{"fname": f"t{i}", "dialogue": d, "summary1": f"Person1 and Person2 talk {i}.", "topic1": "t",
             "summary2": "x", "topic2": "t", "summary3": "y", "topic3": "t"} for i, d in enumerate(DIALOGUES * 2)]
    (ds / "dialogsum.dev.jsonl").write_text("\n".join(json.dumps(r) for r in dev))
    (ds / "dialogsum.test.jsonl").write_text("\n".join(json.dumps(r) for r in test))
    bq = root / "llm_adapters_commonsense" / "boolq"
    bq.mkdir(parents=True)
    rows = [{"instruction": f"Please answer the following question with true or false, question: {q}?\n\n"
                            "Answer format: true/false", "input": "", "output": f"the correct answer is {a}",
             "answer": a} for q, a in zip(QUESTIONS * 4, ["true", "false"] * 8, strict=True)]
    for split in ("train", "test"):
        (bq / f"{split}.json").write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("skills_demo")
    counts = prepare(d / "data", fake_data_dir(d / "staged"))
    model_dir = save_tiny_lm(d / "model")
    root = d / "lib"
    skills_add(str(root), "sentiment", str(d / "data" / "sentiment_train.jsonl"), model=model_dir, **TRAIN)
    skills_add(str(root), "summary", str(d / "data" / "summary_train.jsonl"), **TRAIN)
    return {"dir": d, "root": root, "model_dir": model_dir, "counts": counts}


def test_rouge_l():
    assert rouge_l("The cat sat on the mat.", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("dogs bark", "the cat sat") == 0.0
    assert rouge_l("", "the cat") == 0.0
    # LCS "the cat on the mat" = 5 of 6 words each side: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)


def test_prepare_writes_train_and_scorable_test_files(demo):
    data = demo["dir"] / "data"
    assert demo["counts"] == {"sentiment_train": 24, "sentiment_test": 24, "summary_train": 12, "summary_test": 6,
                              "boolq_train": 16, "boolq_test": 16}
    train = [json.loads(x) for x in (data / "sentiment_train.jsonl").read_text().splitlines()]
    assert set(train[0]) == {"prompt", "response"} and train[0]["response"] in ("positive", "negative")
    test = [json.loads(x) for x in (data / "boolq_test.jsonl").read_text().splitlines()]
    for row in test:
        assert row["choices"][row["gold"]] == row["response"]
        assert row["raw"] in QUESTIONS
    summ = [json.loads(x) for x in (data / "summary_test.jsonl").read_text().splitlines()]
    assert all(r["reference"].startswith("Person1 and Person2 talk") for r in summ)
    assert boolq_question("Please answer ... question: is it?\n\nAnswer format: true/false") == "is it"


def test_choice_logliks_equal_the_adapter_alone_and_the_base(demo):
    """A mixed batch (rows on different skills, one on the base) scores exactly as each model alone."""
    lib = SkillLibrary.open(demo["root"])
    blend = SkillBlend.from_library(lib, device="cpu")
    prompts = ["Classify the sentiment: a fine film", "Summarize this dialogue:\nA: hi\nB: hello there",
               "Classify the sentiment: awful"]
    choices = [["positive", "negative"], ["They greet.", "They argue loudly."], ["positive", "negative"]]
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    got = choice_logliks(blend, prompts, choices, weights, batch_size=2)
    tok = blend.tokenizer
    owners = ["sentiment", "summary", None]
    for i, (p, chs, owner) in enumerate(zip(prompts, choices, owners, strict=True)):
        base, _ = load_base_model(demo["model_dir"], device="cpu")
        model = load_adapter(base, lib.adapter_path(owner)) if owner else base
        text, add_special = render_chat(tok, [{"role": "user", "content": p}])
        reqs = [encode_pair(tok, text, c, add_special_tokens=add_special) for c in chs]
        # max_length: the tiny model declares 64 positions, and loglikelihoods would cut the prompt to fit them
        want = [ll for ll, _ in loglikelihoods(model, tok, reqs, max_length=1024)]
        assert got[i] == pytest.approx(want, abs=1e-4), (i, owner)


def test_embedding_cache_round_trips(demo, tmp_path):
    lib = SkillLibrary.open(demo["root"])
    base, tok = load_base_model(demo["model_dir"], device="cpu")
    spec = lib.manifest["embedder"]
    prompts = ["one prompt", "another prompt", "one prompt"]
    want = embed_prompts(spec, prompts, base=base, tokenizer=tok)
    cache = EmbeddingCache(tmp_path / "cache.safetensors")
    got, fresh = cache.embed(spec, prompts, base=base, tokenizer=tok)
    assert fresh == 2 and torch.allclose(got, want, atol=1e-5)
    again, fresh = EmbeddingCache(tmp_path / "cache.safetensors").embed(spec, prompts[::-1], base=None, tokenizer=None)
    assert fresh == 0 and torch.equal(again, got.flip(0))


def test_evaluate_reports_routing_and_scores(demo):
    res = evaluate(str(demo["root"]), str(demo["dir"] / "data"), route_limit=6,
                   score_limit={"sentiment": 6, "summary": 3}, max_new_tokens=4, mixed_per_source=6,
                   log=lambda s: None)
    assert set(res["routing"]) == {"template", "reworded", "single_free", "mixed"}
    for variant in ("template", "reworded"):
        for name, rec in res["routing"][variant].items():
            assert rec["n"] == 6 and sum(rec["routed_to"].values()) == 6 and 0 <= rec["accuracy"] <= 1, name
    mixed = res["routing"]["mixed"]  # only the held-out mixed prompts asking for sentiment + summary
    assert set(mixed["by_pair"]) == {"sentiment+summary"} and 0 <= mixed["both_weighted_share"] <= 1
    assert mixed["n"] == 6 + 6 + sum(1 for a, _ in heldout.MIXED_FREE if set(a) == {"sentiment", "summary"})
    assert res["routing"]["single_free"]["n"] == 8 and res["score_prompts"] == "reworded"
    for name, rec in res["scores"].items():
        for key in ("base", "own_adapter", "blend_top1", "blend_soft"):
            assert 0 <= rec[key] <= 100, (name, key)
        if rec["blend_top1_rerun_items"] == 0:  # every item routed to its own skill: top-1 is the adapter alone
            assert rec["blend_top1"] == rec["own_adapter"]
    assert rec["metric"] == "rouge_l_f1" and len(rec["examples"]) == 3


def test_compare_gates_reports_every_variant(demo, tmp_path):
    cache = tmp_path / "emb.safetensors"
    res = compare_gates(str(demo["dir"] / "data"), small=True, cache=str(cache), log=lambda s: None)
    assert list(res["variants"]) == [name for name, _, _ in GATE_VARIANTS] and cache.is_file()
    for rec in res["variants"].values():
        assert set(rec) == {"2_skills", "3_skills"}
        three = rec["3_skills"]
        for key in ("evalrew/sentiment", "evalrew/summary", "evalrew/boolq", "free", "mixed_both_ge_0.25@T1",
                    "reworded_mean_own_weight@T3"):
            assert 0 <= three[key] <= 1, key
        assert three["weight_ce@T1.5"] > 0
        assert three["mixed_n"] > rec["2_skills"]["mixed_n"] > 0
    one = next(iter(res["variants"].values()))["3_skills"]
    # a higher gate temperature spreads the weights: less on the requested skill of a single-skill prompt
    assert one["reworded_mean_own_weight@T3"] < one["reworded_mean_own_weight@T1"]
    dev = compare_gates(str(demo["dir"] / "data"), small=True, prompt_set="dev", ends=4, log=lambda s: None,
                        variants=[GATE_VARIANTS[-1][0]])
    assert list(dev["variants"]) == [GATE_VARIANTS[-1][0]] and dev["embedder"]["ends"] == 4
    assert "free" not in dev["variants"][GATE_VARIANTS[-1][0]]["3_skills"]  # the development set has none
    assert dev_items([{"i": i} for i in range(10)], 3) == [{"i": 9}, {"i": 8}, {"i": 7}]  # from the end
    again = compare_gates(str(demo["dir"] / "data"), small=True, cache=str(cache), log=lambda s: None)
    assert again["variants"] == res["variants"]  # the cached embeddings give the same figures


def test_held_out_prompts_are_not_in_the_training_phrasings():
    def norm(t: str) -> str:
        return " ".join(t.replace("{text}", " ").lower().split()).strip(" ?.:\"-")

    seeds = {norm(s) for ss in SEED_INSTRUCTIONS.values() for s in ss}
    held = [t for ts in heldout.REWORDED.values() for t in ts] + [t for _, _, t in heldout.MIXED]
    held += [p for _, p in heldout.MIXED_FREE] + [p for _, p in heldout.SINGLE_FREE]
    assert not {norm(h) for h in held} & seeds
    # only the shortest, most generic seeds ("summarize this", "answer true or false") occur inside them
    inside = {s for s in seeds for h in held if s in norm(h)}
    assert inside == {"summarize this", "classify the sentiment", "answer true or false"}, inside


def test_development_prompts_share_no_wording_with_the_held_out_set_or_the_seeds():
    def norm(t: str) -> str:
        return " ".join(t.replace("{text}", " ").lower().split()).strip(" ?.:\"-")

    def texts(reworded, mixed, free) -> set[str]:
        out = [t for ts in reworded.values() for t in ts] + [t for _, _, t in mixed] + [p for _, p in free]
        return {norm(t) for t in out}

    dev = texts(devset.DEV_REWORDED, devset.DEV_MIXED, devset.DEV_MIXED_FREE)
    held = texts(heldout.REWORDED, heldout.MIXED, heldout.MIXED_FREE) | {norm(p) for _, p in heldout.SINGLE_FREE}
    seeds = {norm(s) for ss in SEED_INSTRUCTIONS.values() for s in ss}
    assert len(dev) == 6 * 3 + len(devset.DEV_MIXED) + len(devset.DEV_MIXED_FREE)
    assert not dev & held and not dev & seeds
    assert not {s for s in seeds | held for d in dev if len(s) > 20 and s in d}
