"""Novelty detection: the skill prototypes and detector on hand-made embeddings, then on a synthetic task
stream embedded by tiny random llama / gpt2 models (separability checked first)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers.tiny_lm import byte_lm, byte_tokenizer
from loramix.continual import (
    HiddenStateEmbedder,
    NoveltyDetector,
    SkillPrototypes,
    boundary_detection,
    build_embedder,
    similarity_report,
    synthetic_tasks,
)

THRESHOLD, WINDOW = 0.8, 4


def unit(*xs: float) -> torch.Tensor:
    return F.normalize(torch.tensor(xs, dtype=torch.float32), dim=0)


# --- hand-made embeddings ---------------------------------------------------------------------------
def test_library_running_mean_prototypes():
    lib = SkillPrototypes()
    assert lib.similarities(unit(1, 0)).shape == (1, 0)
    s = lib.add(torch.stack([unit(1, 0), unit(0, 1)]))
    assert s == 0 and lib.counts == [2]
    assert torch.allclose(lib.prototypes()[0], unit(1, 1))
    lib.update(0, unit(1, 0))  # mean of (1,0),(0,1),(1,0) = (2/3, 1/3)
    assert torch.allclose(lib.prototypes()[0], unit(2, 1))
    sims = lib.similarities(torch.stack([unit(2, 1), unit(-2, -1)]))
    assert torch.allclose(sims[:, 0], torch.tensor([1.0, -1.0]), atol=1e-6)


def test_detector_needs_a_sustained_novel_stretch():
    det = NoveltyDetector(threshold=0.9, window=3)
    a, b = unit(1, 0, 0), unit(0, 1, 0)
    log = []
    for i in range(3):  # empty library: everything is novel; the 3rd creates skill 0
        log.append(det.observe(i, a)[0].decision)
    assert log == ["novel", "novel", "new_skill"] and det.created_at == [2]
    dec, assigned = det.observe(3, unit(1, 0.1, 0))
    assert dec.decision == "known" and dec.matched_skill == 0 and assigned == [(3, 0)]
    # two novel examples, then a known one: the stretch was not sustained -> outliers, no new skill
    assert det.observe(4, b)[0].decision == "novel"
    assert det.observe(5, b)[0].decision == "novel"
    dec, assigned = det.observe(6, a)
    assert dec.decision == "known" and assigned == [(4, 0), (5, 0), (6, 0)]
    assert [d.decision for d in det.log if d.index in (4, 5) and d.decision == "outlier"] == ["outlier"] * 2
    assert len(det.library) == 1 and det.library.counts == [5]  # 3 + 2 known; outliers are not counted
    # a sustained novel stretch creates skill 1 from all its members
    decs = [det.observe(i, b)[0] for i in range(7, 10)]
    assert [d.decision for d in decs] == ["novel", "novel", "new_skill"]
    assert decs[-1].members == [7, 8, 9] and decs[-1].skill == 1 and det.created_at == [2, 9]
    assert decs[0].best_similarity == pytest.approx(0.0, abs=0.05) and decs[0].matched_skill == 0
    assert det.observe(10, unit(0.1, 1, 0))[0].skill == 1
    rec = det.log[-1].to_dict()
    assert set(rec) >= {"index", "best_similarity", "matched_skill", "decision"}


def test_detector_rejects_bad_settings():
    with pytest.raises(ValueError):
        NoveltyDetector(threshold=2.0)
    with pytest.raises(ValueError):
        NoveltyDetector(window=0)
    with pytest.raises(ValueError):
        build_embedder("word2vec", None, None)


def test_sentence_embedder_is_lazy_and_explains_a_missing_package():
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="sentence-transformers"):
            build_embedder("sentence:some-org/some-encoder", None, None)
    else:
        pytest.skip("sentence-transformers is installed; the error path cannot be checked")


def test_sentence_embedder_from_a_local_encoder_directory(tmp_path):
    from transformers import BertConfig, BertModel

    tok = byte_tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    embed = build_embedder(f"sentence:{tmp_path}", None, None)
    out = embed(["abc abc", "0123 4567", "abc abc"])
    assert out.shape == (3, 16) and torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(out[0], out[2], atol=1e-6) and not torch.allclose(out[0], out[1], atol=1e-3)


# --- tiny models on a synthetic stream --------------------------------------------------------------
@pytest.fixture(scope="module")
def tasks():
    return synthetic_tasks(3, train_per_task=40, test_per_task=4, seed=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_synthetic_tasks_are_separable_and_detected(arch, tasks):
    model, tok = byte_lm(arch)
    texts = [ex.prompt for t in tasks for ex in t.train]
    labels = [i for i, t in enumerate(tasks) for _ in t.train]
    emb = HiddenStateEmbedder(model, tok, batch_size=16)(texts)
    assert emb.shape == (len(texts), model.config.hidden_size)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)
    # separability first: every example is closer than the threshold to its own task's mean embedding
    # and farther than the threshold from every other task's
    rep = similarity_report(emb, labels, THRESHOLD)
    assert rep["own_above_threshold"] == 1.0 and rep["other_below_threshold"] == 1.0, rep
    # the detector (no labels) finds every boundary, with no spurious expert
    det = NoveltyDetector(THRESHOLD, WINDOW)
    for i, e in enumerate(emb):
        det.observe(i, e)
    boundaries = [0, 40, 80]
    res = boundary_detection(det.created_at, boundaries, tolerance=2 * WINDOW)
    assert res["precision"] == 1.0 and res["recall"] == 1.0, res
    assert det.created_at == [b + WINDOW - 1 for b in boundaries]  # as early as the window allows
    # every assignment went to the skill of the example's own task
    skill_of_task = {}
    for d in det.log:
        if d.skill is not None:
            for j in d.members or [d.index]:
                assert skill_of_task.setdefault(labels[j], d.skill) == d.skill
    assert sorted(skill_of_task.values()) == [0, 1, 2]


def test_embedding_ignores_padding_and_batching():
    model, tok = byte_lm("llama")
    texts = ["abc def", "abcdefgh abcdefgh abcdefgh", "0123"]
    together = HiddenStateEmbedder(model, tok, batch_size=3)(texts)
    alone = torch.cat([HiddenStateEmbedder(model, tok, batch_size=1)([t]) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)
    first_layer = HiddenStateEmbedder(model, tok, layer=0)(texts)
    assert not torch.allclose(first_layer, together, atol=1e-3)


def test_old_continual_skill_library_name_still_imports():
    """loramix.continual.SkillLibrary (renamed SkillPrototypes) resolves, with a DeprecationWarning."""
    import loramix.continual as continual

    with pytest.warns(DeprecationWarning, match="SkillPrototypes"):
        assert continual.SkillLibrary is SkillPrototypes
