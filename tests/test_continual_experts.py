"""Growable experts: the mixture against a per-expert reference, attach/detach, per-row routing, and the
continual learner's guards (freeze / L2 / none), dense -> sparse maturity switch and save/load."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from helpers.tiny_lm import byte_lm
from helpers.tiny_models import module_types, perturb_adapters, randomize_biases, tiny_model
from loramix.continual import (
    ContinualLearner,
    ExpertBank,
    HiddenStateEmbedder,
    HybridRouter,
    NoveltyDetector,
    build_stream,
    load_continual,
    route_weights,
    synthetic_tasks,
)

ARCHS = ["llama", "gpt2"]


def expert_ffn(layer, x: torch.Tensor, e: int | None) -> torch.Tensor:
    """Full FFN of expert ``e`` (None = the frozen base), written out directly."""
    expert = layer.experts[e] if e is not None else None

    def proj(role: str, inp: torch.Tensor) -> torch.Tensor:
        y = layer.proj(role)(inp)
        if expert is not None and role in layer.targets:
            y = y + expert.delta(role, inp)
        return y

    up = proj("up", x)
    h = layer.act(proj("gate", x)) * up if layer.spec.gated else layer.act(up)
    return proj("down", h)


def setup_bank(arch: str, experts: int = 2) -> tuple[torch.nn.Module, ExpertBank]:
    model = tiny_model(arch)
    if arch == "gpt2":
        randomize_biases(model)  # zero biases would hide wrong bias handling in the mixture
    bank = ExpertBank(model, r=4, alpha=8.0, dropout=0.0)
    for _ in range(experts):
        bank.add_expert()
    perturb_adapters(model)
    return model.eval(), bank


@pytest.mark.parametrize("arch", ARCHS)
def test_mixture_matches_per_expert_reference(arch):
    model, bank = setup_bank(arch)
    layer = bank.layers[0]
    x = torch.randn(4, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 0.0], [0.2, 0.3]])  # last row: half the base FFN
    layer.weights = w
    got = layer(x)
    e0, e1, base = expert_ffn(layer, x, 0), expert_ffn(layer, x, 1), expert_ffn(layer, x, None)
    want = w[:, 0, None, None] * e0 + w[:, 1, None, None] * e1 + (1 - w.sum(-1))[:, None, None] * base
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(e0, base, atol=1e-3)  # the experts really differ from the base
    layer.weights = torch.tensor([0.0, 1.0])  # one vector for every row
    assert torch.allclose(layer(x), e1, atol=1e-5)
    layer.weights = None
    assert torch.allclose(layer(x), base, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_new_expert_is_identity_and_detach_restores(arch):
    model = tiny_model(arch)
    types = module_types(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
    bank = ExpertBank(model, dropout=0.0)
    assert all(not p.requires_grad for p in model.parameters())
    bank.add_expert()
    with torch.no_grad(), bank.route(torch.ones(1)):
        assert torch.allclose(model(ids).logits, base, atol=1e-5)  # B = 0: the new expert is the base FFN
    perturb_adapters(model)
    with torch.no_grad(), bank.route(torch.ones(1)):
        assert not torch.allclose(model(ids).logits, base, atol=1e-3)
    with torch.no_grad(), bank.disabled():
        assert torch.allclose(model(ids).logits, base, atol=1e-6)
    bank.detach()
    assert module_types(model) == types
    assert all(p.requires_grad for p in model.parameters())  # restored
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, base, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_per_row_weights_equal_separate_forwards(arch):
    model, bank = setup_bank(arch)
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(2))
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.0, 1.0]])
    with torch.no_grad():
        with bank.route(w):
            together = model(ids).logits
        for row in range(3):
            with bank.route(w[row]):
                assert torch.allclose(together[row], model(ids[row : row + 1]).logits[0], atol=1e-5)


def test_bank_checks_and_l2_penalty():
    model, bank = setup_bank("llama")
    with pytest.raises(ValueError, match="entries"):
        bank.set_weights(torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        bank.set_weights(torch.tensor([-0.5, 1.5]))
    with pytest.raises(ValueError, match="another ExpertBank"):
        ExpertBank(model)
    assert float(bank.l2_penalty().detach()) == 0.0
    bank.take_snapshot(0)
    assert float(bank.l2_penalty().detach()) == 0.0
    p = bank.expert_parameters(0)[0]
    with torch.no_grad():
        p[0, 0] += 0.5
        p[0, 1] -= 0.25
    assert float(bank.l2_penalty().detach()) == pytest.approx(0.5**2 + 0.25**2)
    bank.set_trainable(0, False)
    assert not bank.is_trainable(0) and bank.is_trainable(1)
    assert len(bank.trainable_parameters()) == len(bank.expert_parameters(1))


# --- the learner ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stream_setup():
    model, tok = byte_lm("llama")
    tasks = synthetic_tasks(2, train_per_task=24, test_per_task=4, seed=1)
    return model, tok, tasks


def make_learner(model, tok, *, guard="freeze", l2_coef=1.0, min_examples=1000, patience=1, min_delta=0.0,
                 train_lag=0, quarantine=0, learning_rate=1e-2, restore_best=False, val_size=2, val_every=4,
                 eval_every=2):
    torch.manual_seed(0)
    bank = ExpertBank(model, r=4, alpha=8.0, dropout=0.0)
    router = HybridRouter("hybrid", temperature=0.05, min_examples=min_examples, patience=patience,
                          min_delta=min_delta)
    embedder = HiddenStateEmbedder(model, tok, disable=bank.disabled)
    try:
        return ContinualLearner(model, tok, bank, embedder, NoveltyDetector(0.8, 4), router, guard=guard,
                                l2_coef=l2_coef, learning_rate=learning_rate, batch_size=4, steps_per_batch=2,
                                val_size=val_size,
                                val_every=val_every, eval_every=eval_every, train_lag=train_lag,
                                quarantine=quarantine, restore_best=restore_best)
    except ValueError:
        bank.detach()  # a rejected option must not leave experts on the shared model
        raise


def drift_of_first_expert(stream_setup, **kw) -> tuple[float, ExpertBank]:
    model, tok, tasks = stream_setup
    stream = build_stream(tok, tasks)
    learner = make_learner(model, tok, **kw)
    learner.observe(stream.examples[:24])
    learner.flush()
    bank = learner.bank
    assert bank.num_experts == 1
    before = bank.expert_state(0)
    assert any(float(v.abs().max()) > 0 for k, v in before.items() if "lora_B" in k)  # expert 0 learned
    learner.observe(stream.examples[24:])
    learner.flush()
    assert bank.num_experts == 2
    after, new = bank.expert_state(0), bank.expert_state(1)
    assert any(float(v.abs().max()) > 0 for k, v in new.items() if "lora_B" in k)  # expert 1 learned
    drift = sum(float((after[k] - before[k]).pow(2).sum()) for k in before) ** 0.5
    bank.detach()
    return drift, bank


def test_guards_freeze_l2_none(stream_setup):
    frozen, _ = drift_of_first_expert(stream_setup, guard="freeze")
    free, _ = drift_of_first_expert(stream_setup, guard="none")
    anchored, _ = drift_of_first_expert(stream_setup, guard="l2", l2_coef=100.0)
    assert frozen == 0.0  # bit-identical
    assert free > 0.0
    assert 0.0 < anchored < free


def test_dense_until_mature_then_sparse_and_dense_again(stream_setup):
    model, tok, tasks = stream_setup
    stream = build_stream(tok, tasks)
    # min_delta huge: the second validation loss is a plateau; maturity then waits for 8 examples
    learner = make_learner(model, tok, min_examples=8, patience=1, min_delta=100.0)
    probe = torch.stack([HiddenStateEmbedder(model, tok)([ex.prompt for ex in t.test]) for t in tasks]).flatten(0, 1)
    learner.observe(stream.examples[:5])  # the window creates expert 0; nothing trained yet
    assert learner.bank.num_experts == 1 and learner.mode == "dense"
    learner.observe(stream.examples[5:24])
    learner.flush()
    kinds = [e["event"] for e in learner.events]
    assert kinds.count("val_loss") >= 2 and "mature" in kinds
    mature = next(e for e in learner.events if e["event"] == "mature")
    assert mature["examples"] >= 8 and mature["mode"] == "sparse"
    assert learner.mode == "sparse"
    learner.observe(stream.examples[24:30])  # task 2's window: a new, immature expert
    assert learner.bank.num_experts == 2 and learner.mode == "dense"
    w = learner.routing_weights(probe)
    # the first expert's task has ended: its prompts go to it alone; the newest skill's prompts are dense
    assert w[:4].tolist() == [[1.0, 0.0]] * 4
    assert bool((w[4:] > 0).all())  # dense: every expert contributes
    learner.observe(stream.examples[30:])
    learner.flush()
    assert learner.mode == "sparse"
    w = learner.routing_weights(probe)
    assert torch.equal(w, torch.nn.functional.one_hot(w.argmax(-1), 2).float())
    assert w.argmax(-1).tolist() == [0] * 4 + [1] * 4  # each task's test prompts go to their own expert
    learner.bank.detach()


def test_plateau_compares_validation_losses_on_the_same_validation_set(stream_setup):
    """The held-out set grows while a skill's first examples arrive; a loss on 3 examples does not compare
    with one on 4, so maturity must not come from such a comparison (it did: the demo's first experts
    "plateaued" because a loss on a larger validation set was higher)."""
    model, tok, tasks = stream_setup
    stream = build_stream(tok, tasks)
    torch.manual_seed(0)
    bank = ExpertBank(model, r=4, alpha=8.0, dropout=0.0)
    # min_delta huge: any second loss on the same set is a plateau
    router = HybridRouter("hybrid", temperature=0.05, min_examples=0, patience=1, min_delta=100.0)
    learner = ContinualLearner(model, tok, bank, HiddenStateEmbedder(model, tok, disable=bank.disabled),
                               NoveltyDetector(0.8, 4), router, learning_rate=1e-2, batch_size=4, val_size=4,
                               val_every=2, eval_every=1)
    learner.observe(stream.examples[:24])
    learner.flush()
    evals = [e for e in learner.events if e["event"] == "val_loss"]
    assert [e["val_examples"] for e in evals[:2]] == [3, 4]  # the set grew between the first two losses
    assert [e["restarted"] for e in evals[:3]] == [True, True, False]
    mature = next(e for e in learner.events if e["event"] == "mature")
    at = next(e for e in evals if e["step"] == mature["step"])
    assert at["val_examples"] == 4 and not at["restarted"]  # decided on two losses of the full set
    assert mature["step"] == evals[2]["step"]
    assert router.newest.history == [e["loss"] for e in evals]
    bank.detach()


def _learner_with_validation_set(stream_setup, val_rows, **kw):
    """A learner whose first expert exists and whose validation set is ``val_rows`` (full: nothing more is
    held out), so every later example of the first task trains."""
    model, tok, tasks = stream_setup
    stream = build_stream(tok, tasks)
    learner = make_learner(model, tok, val_size=2, val_every=1, eval_every=1, **kw)
    learner.observe(stream.examples[:4])  # the window creates expert 0
    assert learner.bank.num_experts == 1
    for ex, emb in zip(val_rows, learner.embedder([ex.prompt for ex in val_rows]), strict=True):
        ex.embedding = emb
    learner.val = list(val_rows)
    return learner, stream


def test_a_stopping_expert_keeps_the_weights_of_its_lowest_validation_loss(stream_setup):
    """Validation examples of another task: their loss first falls, then rises while the expert trains on its
    own task; the expert must end with the weights of the lowest loss, and best_weights() shows them before
    the end without changing the training weights."""
    _, tok, tasks = stream_setup
    stream = build_stream(tok, tasks)
    other = [dataclasses.replace(stream.examples[i], embedding=None) for i in (30, 31)]
    finals = {}
    for restore in (True, False):
        learner, stream = _learner_with_validation_set(stream_setup, other, restore_best=restore)
        learner.observe(stream.examples[4:24])
        learner.flush()
        losses = [e["loss"] for e in learner.events if e["event"] == "val_loss"]
        last = learner.validation_loss()
        assert last == pytest.approx(losses[-1]) and min(losses) < last - 1e-3  # the loss went back up
        if restore:
            with learner.best_weights():
                assert learner.validation_loss() == pytest.approx(min(losses))
            assert learner.validation_loss() == pytest.approx(last)  # training weights back
        learner.finish()
        finals[restore] = learner.validation_loss()
        restored = [e for e in learner.events if e["event"] == "restored"]
        if restore:
            assert finals[True] == pytest.approx(min(losses))
            assert len(restored) == 1 and restored[0]["from_step"] == losses.index(min(losses)) + 1
            learner.finish()  # a second call changes nothing
            assert learner.validation_loss() == pytest.approx(min(losses))
        else:
            assert finals[False] == pytest.approx(last) and not restored
        learner.bank.detach()


def test_an_expert_that_only_hurt_its_validation_set_goes_back_to_untrained_before_it_is_frozen(stream_setup):
    """Validation targets the task never produces: every step raises their loss, so the untrained expert (the
    first candidate) is kept when the next skill arrives and expert 0 is frozen adding nothing."""
    _, tok, tasks = stream_setup
    stream = build_stream(tok, tasks)
    odd = [dataclasses.replace(stream.examples[i], target_ids=[100, 101, 102, 103], embedding=None) for i in (22, 23)]
    for restore in (True, False):
        learner, stream = _learner_with_validation_set(stream_setup, odd, restore_best=restore)
        learner.observe(stream.examples[4:22])
        learner.flush()
        assert learner.validation_loss() > [e["loss"] for e in learner.events if e["event"] == "val_loss"][0]
        learner.observe(stream.examples[24:])  # task 2: expert 1 is created, expert 0 frozen
        assert learner.bank.num_experts == 2
        b = [v for k, v in learner.bank.expert_state(0).items() if "lora_B" in k]
        restored = [e for e in learner.events if e["event"] == "restored"]
        if restore:
            assert all(float(v.abs().max()) == 0.0 for v in b)  # B = 0: the expert equals the base FFN
            assert [(e["expert"], e["from_step"]) for e in restored] == [(0, None)]
            assert restored[0]["step"] < next(e["step"] for e in learner.events if e["event"] == "new_expert"
                                              and e["expert"] == 1) + 1
        else:
            assert any(float(v.abs().max()) > 0.0 for v in b) and not restored
        learner.bank.detach()


def test_save_and_load_restore_routing_and_outputs(stream_setup, tmp_path):
    model, tok, tasks = stream_setup
    stream = build_stream(tok, tasks)
    learner = make_learner(model, tok)
    learner.observe(stream.examples)
    learner.flush()
    prompts = [ex.prompt for t in tasks for ex in t.test]
    emb = learner.embedder(prompts)
    w = learner.routing_weights(emb)
    rows = [tok(prompts[0])["input_ids"], tok(prompts[-1])["input_ids"]]  # one prompt of each task
    n = min(len(r) for r in rows)
    ids = torch.tensor([r[:n] for r in rows])
    with torch.no_grad(), learner.bank.route(w[[0, -1]]), learner.best_weights():  # the weights save() writes
        want = model(ids).logits
    learner.save(tmp_path / "cl")
    learner.bank.detach()

    fresh, _ = byte_lm("llama")  # same seed: the same base weights
    bank, library, router = load_continual(fresh, tmp_path / "cl")
    assert bank.num_experts == 2 and len(library) == 2 and router.mode == learner.mode
    assert not any(p.requires_grad for p in fresh.parameters())
    emb2 = HiddenStateEmbedder(fresh, tok, disable=bank.disabled)(prompts)
    w2 = router.weights(library.similarities(emb2))
    assert torch.allclose(w2, w, atol=1e-5)
    with torch.no_grad(), bank.route(w2[[0, -1]]):
        assert torch.allclose(fresh(ids).logits, want, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_routed_scoring_matches_teammates_scorer_item_by_item(arch):
    """The batched per-row routed scorer gives the log-likelihoods of loramix.evaluation's scorer run on
    each item alone under its own routing."""
    from loramix.continual.run import routed_multiple_choice
    from loramix.continual.stream import mc_items
    from loramix.evaluation import score_multiple_choice

    model, tok = byte_lm(arch)
    bank = ExpertBank(model, r=4, alpha=8.0, dropout=0.0)
    bank.add_expert()
    bank.add_expert()
    perturb_adapters(model, scale=0.5)
    model.eval()
    tasks = synthetic_tasks(2, train_per_task=1, test_per_task=3, words=(3, 9), seed=3)
    items = mc_items(tok, [ex for t in tasks for ex in t.test])
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])
    got = routed_multiple_choice(model, tok, items, weights, bank, batch_size=4)
    accs = []
    for k, item in enumerate(items):
        with bank.route(weights[k]):
            ref = score_multiple_choice(model, tok, [item], progress=False)
        assert got["loglikelihoods"][k] == pytest.approx(ref["predictions"][0]["loglikelihoods"], abs=1e-3)
        accs.append(ref["acc"])
    assert got["acc"] == pytest.approx(sum(accs) / len(accs))
    # routing matters: the same items under the other expert score differently
    other = routed_multiple_choice(model, tok, items, 1.0 - weights, bank)
    diff = torch.tensor(other["loglikelihoods"]) - torch.tensor(got["loglikelihoods"])
    assert float(diff.abs().max()) > 1e-2
    bank.detach()


@pytest.mark.parametrize("arch", ARCHS)
def test_routed_scoring_shares_one_forward_per_item_when_choices_differ_in_the_last_token(arch):
    """Choices ``ans1/ans2/ans3`` give the same model input (the last token is only a target), so each
    item costs one forward row; the log-likelihoods still equal loramix.evaluation's per-request scorer,
    routed and unrouted (weights=None: the model as it is)."""
    from loramix.continual import Example
    from loramix.continual.run import routed_multiple_choice
    from loramix.continual.stream import mc_items
    from loramix.evaluation import score_multiple_choice

    model, tok = byte_lm(arch)
    bank = ExpertBank(model, r=4, alpha=8.0, dropout=0.0)
    bank.add_expert()
    bank.add_expert()
    perturb_adapters(model, scale=0.5)
    model.eval()
    prompts = ["abc def gh", "0123 45 6701 2", "KLM NOPQ R", "stu vw xyz st"]
    items = mc_items(tok, [Example(p, ["ans1", "ans2", "ans3"], k % 3) for k, p in enumerate(prompts)])
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [1.0, 0.0]])
    try:
        got = routed_multiple_choice(model, tok, items, weights, bank, batch_size=3)
        assert sum(rows) == len(items)  # not len(items) * 3
        rows.clear()
        with bank.route(torch.tensor([0.5, 0.5])):
            unrouted = routed_multiple_choice(model, tok, items, None, None, batch_size=3)
        assert sum(rows) == len(items)
    finally:
        hook.remove()
    for k, item in enumerate(items):
        with bank.route(weights[k]):
            ref = score_multiple_choice(model, tok, [item], progress=False)["predictions"][0]["loglikelihoods"]
        assert got["loglikelihoods"][k] == pytest.approx(ref, abs=1e-3)
        assert len(set(ref)) == 3  # the choices really score differently
    with bank.route(torch.tensor([0.5, 0.5])):
        ref_all = score_multiple_choice(model, tok, items, progress=False)
    for k in range(len(items)):
        assert unrouted["loglikelihoods"][k] == pytest.approx(ref_all["predictions"][k]["loglikelihoods"], abs=1e-3)
    assert unrouted["acc"] == pytest.approx(ref_all["acc"])
    bank.detach()


def test_training_lag_waits_and_hands_early_examples_of_a_new_task_to_its_expert(stream_setup):
    """With train_lag, assigned examples train only once the stream is that far past them; examples of the
    next task that went to the old skill before the boundary was detected go to the new expert instead."""
    model, tok, tasks = stream_setup
    stream = build_stream(tok, tasks)
    first, second = stream.examples[:24], stream.examples[24:]
    lagged = make_learner(model, tok, train_lag=10)
    lagged.observe(first)
    assert len(lagged.queue) >= lagged.batch_size  # without a lag, a full batch would have trained
    assert all(ex.index > first[-1].index - 10 - lagged.batch_size for ex, _ in lagged.queue)
    assert lagged.bank.num_experts == 1
    # the next task's first examples, assigned to skill 0 as if the detector had not noticed them yet
    early = second[:3]
    for ex in early:
        ex.embedding = lagged.embedder([ex.prompt])[0]
        lagged.queue.append((ex, 0))
    trained_before = lagged.counts["trained"]
    lagged.observe(second[3:])
    lagged.flush()
    assert lagged.bank.num_experts == 2
    reclaimed = [e for e in lagged.events if e["event"] == "reclaimed"]
    assert len(reclaimed) == 1 and reclaimed[0]["expert"] == 1
    assert sorted(reclaimed[0]["indices"]) == [ex.index for ex in early]  # none of the first task's examples
    assert lagged.counts["trained"] > trained_before
    lagged.bank.detach()
    with pytest.raises(ValueError, match="train_lag"):
        make_learner(model, tok, train_lag=-1)


def test_quarantine_drops_the_queued_examples_just_before_a_detected_boundary(stream_setup):
    """Queued examples of the old skill that arrived within ``quarantine`` positions before the new skill's
    first member never train (nor move to the new expert); the rest of the old task still trains."""
    model, tok, tasks = stream_setup
    stream = build_stream(tok, tasks)
    first, second = stream.examples[:24], stream.examples[24:]
    learner = make_learner(model, tok, train_lag=10, quarantine=6)
    learner.observe(first)
    queued_old = sorted(ex.index for ex, _ in learner.queue)
    assert queued_old and learner.bank.num_experts == 1
    trained = []
    original = learner._train
    learner._train = lambda items: (trained.extend(ex.index for ex, _ in items), original(items))[1]
    decisions = learner.observe(second)
    learner.flush()
    assert learner.bank.num_experts == 2
    first_member = min(next(d for d in decisions if d.decision == "new_skill").members)
    quarantined = [e for e in learner.events if e["event"] == "quarantined"]
    assert len(quarantined) == 1
    dropped = quarantined[0]["indices"]
    assert dropped and learner.counts["quarantined"] == len(dropped)
    assert set(dropped) <= set(queued_old)  # old-task examples still queued at detection
    assert not set(dropped) & set(trained)  # ... that never trained
    assert all(first_member - 6 <= i < first_member for i in dropped)
    assert set(queued_old) - set(dropped) <= set(trained)  # the rest of the old queue trained
    learner.bank.detach()
    with pytest.raises(ValueError, match="quarantine"):
        make_learner(model, tok, train_lag=2, quarantine=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixture_under_autocast_matches_reference_and_trains(arch, dtype):
    """Under CPU autocast the growable mixture runs in the autocast dtype, equals the per-expert reference to that
    dtype's precision, and gives finite gradients to the experts (kept float32)."""
    model, bank = setup_bank(arch)
    layer = bank.layers[0]
    x = torch.randn(4, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 0.0], [0.2, 0.3]])
    layer.weights = w
    with torch.autocast("cpu", dtype=dtype):
        got = layer(x)
        e0, e1, base = expert_ffn(layer, x, 0), expert_ffn(layer, x, 1), expert_ffn(layer, x, None)
    want = (w[:, 0, None, None] * e0.float() + w[:, 1, None, None] * e1.float()
            + (1 - w.sum(-1))[:, None, None] * base.float())
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() <= 16 * torch.finfo(dtype).eps * want.abs().max()
    got.float().square().sum().backward()
    grads = [p.grad for p in bank.trainable_parameters()]
    assert all(p.dtype == torch.float32 for p in bank.trainable_parameters())
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_flush_trains_a_long_queue_in_mini_batches(stream_setup):
    """With a training lag the queue holds more than a batch; flushing it (before an evaluation, or when a
    new expert is created) trains it batch by batch, never as one oversized batch."""
    model, tok, tasks = stream_setup
    stream = build_stream(tok, tasks)
    learner = make_learner(model, tok, train_lag=20)
    sizes = []
    original = learner._train
    learner._train = lambda items: (sizes.append(len(items)), original(items))[1]
    learner.observe(stream.examples[:24])
    queued = len(learner.queue)
    assert queued > learner.batch_size
    learner.flush()
    assert not learner.queue and sizes and max(sizes) <= learner.batch_size and sum(sizes) >= queued
    learner.bank.detach()


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass while ``fn()`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


@pytest.mark.parametrize("arch", ARCHS)
def test_training_forward_keeps_no_expert_activations_and_gradients_are_unchanged(arch):
    """Training memory: with checkpointing the experts' (tokens x intermediate) activations are recomputed in
    backward, so what autograd keeps does not grow with the number of experts that run (dense routing over
    several experts stored about ten such tensors per expert and layer: 11-18 GiB on the 135M model); the
    gradients, with dropout, are the same as without checkpointing, and the recomputation uses the weights of
    the forward even when the routing context has ended before backward()."""
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    results = {}
    for experts in (1, 3):
        for ckpt in (False, True):
            model = tiny_model(arch)
            torch.manual_seed(0)
            bank = ExpertBank(model, r=4, alpha=8.0, dropout=0.1)
            for _ in range(experts):
                bank.add_expert()
            perturb_adapters(model)
            for layer in bank.layers:
                layer.checkpoint = ckpt
                layer.expert_dropout.p = 0.1
            model.train()
            params = bank.trainable_parameters()
            w = torch.full((2, experts), 1.0 / experts)
            torch.manual_seed(1)

            def forward(model=model, bank=bank, w=w):
                with bank.route(w):
                    return model(ids).logits.pow(2).mean()

            nbytes, loss = saved_bytes(forward)
            loss.backward()  # outside the routing context
            results[experts, ckpt] = nbytes, [p.grad.clone() for p in params]
    for experts in (1, 3):
        plain, ckpt = results[experts, False], results[experts, True]
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain[1], ckpt[1], strict=True))
    assert results[3, False][0] > 1.5 * results[1, False][0]  # without checkpointing: grows with the experts
    # with it: the same up to the routing weights' few bytes, whatever the number of experts
    assert results[3, True][0] < results[1, True][0] + 1024
    assert results[3, True][0] < results[3, False][0] / 2


@pytest.mark.parametrize("arch", ARCHS)
def test_target_loss_projects_only_the_target_positions(arch):
    from loramix.continual.learner import batch_tensors, target_loss
    from loramix.continual.stream import EncodedExample

    model = tiny_model(arch).eval()
    rows = [EncodedExample(index=i, prompt="p", context_ids=list(range(3, 3 + n)), target_ids=[7, 9, 11][: 1 + i])
            for i, n in enumerate((5, 9, 2))]
    batch = batch_tensors(rows, 0, torch.device("cpu"))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    head = model.get_output_embeddings()
    seen = []
    hook = head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        got = target_loss(model, batch)
    finally:
        hook.remove()
    assert torch.allclose(got, want, atol=1e-5)
    assert seen == [(6, logits.shape[-1])]  # 1 + 2 + 3 target tokens, not 3 x 12 positions


def test_hybrid_routes_prompts_of_ended_experts_sparsely_while_the_newest_is_immature():
    """A prompt whose nearest skill is an older expert (its task ended, so it is frozen) goes top-1 to that
    expert even while the newest expert is immature: on short tasks no validation loss plateaus, and dense
    routing gave later experts a share of every earlier task's prompts. Prompts nearest the immature newest
    skill stay dense; the dense / sparse policies are unchanged."""
    sims = torch.tensor([[0.95, 0.90, 0.91], [0.90, 0.96, 0.93], [0.91, 0.92, 0.97]])
    router = HybridRouter("hybrid", temperature=0.05, min_examples=1000)
    for _ in range(3):
        router.new_expert()
    assert [t.ended for t in router.trackers] == [True, True, False]
    assert router.mode == "dense"
    w = router.weights(sims)
    assert w[:2].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    assert bool((w[2] > 0).all()) and float(w[2].sum()) == pytest.approx(1.0)
    assert torch.equal(router.weights(sims, "dense"), route_weights(sims, "dense", temperature=0.05))
    router.newest.mature = True
    assert router.mode == "sparse" and torch.equal(router.weights(sims), torch.eye(3))
    for policy in ("dense", "sparse"):
        fixed = HybridRouter(policy, temperature=0.05)
        for _ in range(3):
            fixed.new_expert()
        assert torch.equal(fixed.weights(sims), route_weights(sims, policy, temperature=0.05))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_base_trains_through_checkpointed_experts_and_the_target_only_head(arch, dtype):
    """A bf16 / fp16 base (experts float32): the training step (checkpointed mixture, LM head on the target
    positions only) gives a loss close to the float32 base's and finite float32 expert gradients equal in
    direction to the float32 ones."""
    from loramix.continual.learner import batch_tensors, target_loss
    from loramix.continual.stream import EncodedExample

    rows = [EncodedExample(index=i, prompt="p", context_ids=list(range(3, 3 + n)), target_ids=[7, 9, 11][: 1 + i])
            for i, n in enumerate((5, 9, 2))]
    batch = batch_tensors(rows, 0, torch.device("cpu"))
    results = {}
    for dt in (torch.float32, dtype):
        model, bank = setup_bank(arch)
        model.to(dt)
        for layer in bank.layers:  # the base in dt, the experts kept float32
            layer.experts.float()
        model.train()
        with bank.route(torch.tensor([[0.6, 0.4], [1.0, 0.0], [0.0, 1.0]])):
            loss = target_loss(model, batch)
        loss.backward()
        params = bank.trainable_parameters()
        assert all(p.dtype == torch.float32 for p in params) and all(p.grad is not None for p in params)
        results[dt] = (float(loss), torch.cat([p.grad.flatten() for p in params]))
        bank.detach()
    (ref_loss, ref_grad), (loss, grad) = results[torch.float32], results[dtype]
    assert torch.isfinite(grad).all() and abs(loss - ref_loss) < 0.05 * abs(ref_loss)
    assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.98


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_restore_best_on_a_half_precision_base(dtype):
    """bf16 / fp16 base, float32 experts: the kept weights are measured and restored in the experts' dtype,
    best_weights() shows the loss finish() ends at, and that loss is the lowest of the candidates measured."""
    model, tok = byte_lm("llama")
    model.to(dtype)
    tasks = synthetic_tasks(2, train_per_task=24, test_per_task=4, seed=1)
    stream = build_stream(tok, tasks)
    learner = make_learner(model, tok, val_size=2, val_every=1, eval_every=1, restore_best=True)
    learner.observe(stream.examples[:4])
    other = [dataclasses.replace(stream.examples[i], embedding=None) for i in (30, 31)]  # another task's rows
    for ex, emb in zip(other, learner.embedder([ex.prompt for ex in other]), strict=True):
        ex.embedding = emb
    learner.val = other
    learner.observe(stream.examples[4:24])
    learner.flush()
    losses = [e["loss"] for e in learner.events if e["event"] == "val_loss"]
    assert losses and all(math.isfinite(v) for v in losses)
    with learner.best_weights():
        shown = learner.validation_loss()
    learner.finish()
    final = learner.validation_loss()
    assert final == pytest.approx(shown) and final <= min(losses) + 1e-6
    assert min(losses) < losses[-1] and [e["expert"] for e in learner.events if e["event"] == "restored"] == [0]
    assert all(p.dtype == torch.float32 for p in learner.bank.expert_parameters(0))
    learner.bank.detach()
