"""inject() on tiny models of every FFN family: identity at init, training signal, losses, structure."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

import loramix
from helpers.tiny_models import (
    ARCHS,
    EXPERT_TYPES,
    ROUTER_NAMES,
    VOCAB,
    decoder_mlps,
    module_types,
    perturb_adapters,
    random_batch,
    tiny_model,
)
from loramix import FFNNotSupportedError, MixLoraConfig, inject, unload
from loramix.losses import load_balance_loss, router_entropy, z_loss
from loramix.moe_layer import MixLoraFFN

TOL = dict(rtol=1e-5, atol=1e-5)


def logits_of(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def injected(arch: str = "llama", perturb: bool = True, **cfg: object) -> torch.nn.Module:
    model = inject(tiny_model(arch), MixLoraConfig(**cfg))
    if perturb:
        perturb_adapters(model)
    return model


def chosen_experts(model: torch.nn.Module) -> torch.Tensor:
    """(L, T, k) sorted expert ids each MoE layer chose in the last forward."""
    layers = loramix.injection.get_state(model).moe_layers.values()
    return torch.stack([layer.last_routing.indices.sort(dim=-1).values for layer in layers])


def attention_lora_names(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if "lora_" in n and "mixlora_" not in n]


# --- identity at initialisation --------------------------------------------------------------------
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize("router", ROUTER_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_init_logits_equal_base(arch: str, router: str, expert_type: str) -> None:
    """Right after inject (LoRA B = 0, adapter B = 0) the adapted model reproduces the base logits."""
    model = tiny_model(arch)
    ids, mask = random_batch(pad_left=3)
    base = logits_of(model, ids, mask)
    inject(model, MixLoraConfig(num_experts=4, top_k=2, router=router, expert_type=expert_type))
    torch.testing.assert_close(logits_of(model, ids, mask), base, **TOL)


# --- determinism and noise ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "router"),
    [("llama", "noisy_topk"), ("gpt2", "noisy_topk"), ("llama", "switch"), ("qwen2", "top_p")],
)
def test_eval_is_deterministic(arch: str, router: str) -> None:
    """In eval() two forwards give identical logits: router noise, jitter and dropout are all off."""
    model = injected(arch, router=router, num_experts=4, router_jitter=0.2, dropout=0.3, attn_dropout=0.3)
    model.eval()
    ids, mask = random_batch(pad_left=2)
    assert torch.equal(logits_of(model, ids, mask), logits_of(model, ids, mask))


def test_train_mode_router_noise_is_active() -> None:
    """Control for the determinism test: in train() the noisy router's noise alone (no jitter, no dropout, no
    balance bias) changes the output, and the same model with the plain top-k router does not."""
    ids, _ = random_batch()
    for router, noisy in (("noisy_topk", True), ("topk", False)):
        model = injected("llama", router=router, num_experts=4, router_jitter=0.0, dropout=0.0, attn_dropout=0.0,
                         balance_bias_rate=0.0)
        model.train()
        assert torch.equal(logits_of(model, ids), logits_of(model, ids)) != noisy, router


# --- training signal reaches everything ------------------------------------------------------------
@pytest.mark.parametrize("expert_type", EXPERT_TYPES)
@pytest.mark.parametrize("router", ROUTER_NAMES)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_expert_router_and_attention_lora_gets_gradient(
    arch: str, router: str, expert_type: str
) -> None:
    """After a few AdamW steps every router parameter, every expert's A and B (each expert index) and
    every attention LoRA matrix receive a non-zero gradient; base weights receive none."""
    num_experts = 4
    model = injected(arch, perturb=False, num_experts=num_experts, top_k=2, router=router,
                     expert_type=expert_type, balance_coef=0.01)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    ids, mask = random_batch(batch=4, seq=16, seed=5)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
    for stats in loramix.routing_stats(model):  # otherwise an unused expert's zero gradient is expected
        assert (stats["tokens_per_expert"] > 0).all(), stats
    expert_params = [n for n in params if ".lora_A" in n or ".lora_B" in n]
    expert_params = [n for n in expert_params if "mixlora_" in n]
    router_params = [n for n in params if "mixlora_router" in n]
    attn_params = attention_lora_names(model)
    assert expert_params and attn_params
    assert len(router_params) == 2 * (2 if router == "noisy_topk" else 1)
    for name in expert_params:  # (E, ...) stacked: check each expert's slice
        grad = params[name].grad
        assert grad is not None and grad.shape[0] == num_experts, name
        for e in range(num_experts):
            assert grad[e].abs().sum() > 0, f"{name}[{e}] got no gradient"
    for name in router_params + attn_params + [n for n in params if "mixlora_scale" in n]:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, f"{name} got no gradient"
    for name, p in model.named_parameters():
        if name not in params:
            assert p.grad is None, name


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inject_keeps_the_model_mode(arch: str, training: bool) -> None:
    """The added modules follow the model's train/eval mode: injecting into an eval() model must not
    switch on adapter dropout or router noise behind the user's back."""
    model = tiny_model(arch).train(training)
    inject(model, MixLoraConfig(num_experts=4, router="noisy_topk"))
    assert all(m.training == training for m in model.modules())


def test_only_adapter_parameters_are_trainable() -> None:
    """inject freezes the base: exactly the parameters named lora_* / mixlora_* require grad."""
    model = injected("llama", num_experts=4)
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in name or "mixlora_" in name), name


# --- losses and statistics -------------------------------------------------------------------------
def hf_style_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Causal-LM cross entropy as transformers computes it: shift by one, ignore -100."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_is_lm_loss_plus_aux_loss(arch: str, reduction: str) -> None:
    """out.loss == causal-LM cross entropy + out.aux_loss, and aux_loss is the weighted sum (or mean) over
    layers of the balance loss, z-loss and entropy of the routing it reports."""
    cfg = dict(num_experts=4, top_k=2, balance_coef=0.1, z_loss_coef=0.01, entropy_coef=0.05)
    model = injected(arch, aux_layer_reduction=reduction, **cfg)
    ids, mask = random_batch(pad_left=3)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    lm = hf_style_lm_loss(out.logits, labels)
    torch.testing.assert_close(out.loss, lm + out.aux_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.lm_loss, lm, rtol=1e-6, atol=1e-6)  # the LM loss alone, for validation
    routings = [m.last_routing for m in decoder_mlps(model)]
    combine = torch.sum if reduction == "sum" else torch.mean
    expected = sum(
        cfg[c] * combine(torch.stack([fn(r) for r in routings]))
        for c, fn in [
            ("balance_coef", lambda r: load_balance_loss(r.probs, r.indices, r.mask, r.token_mask)),
            ("z_loss_coef", lambda r: z_loss(r.logits, r.token_mask)),
            ("entropy_coef", lambda r: router_entropy(r.probs, r.token_mask)),
        ]
    )
    torch.testing.assert_close(out.aux_loss, expected)
    assert out.aux_loss > 0.05 * (len(routings) if reduction == "sum" else 1)  # balance >= 1 per layer


def test_aux_loss_has_gradient_to_routers() -> None:
    """aux_loss alone back-propagates into the routers (it is a training term, not a statistic)."""
    model = injected("llama", perturb=False, num_experts=4)
    model.train()
    ids, _ = random_batch()
    out = model(input_ids=ids)  # no labels: loss is None but aux_loss is returned in training
    assert out.loss is None
    out.aux_loss.backward()
    for mlp in decoder_mlps(model):
        assert mlp.mixlora_router.weight.grad.abs().sum() > 0


def test_no_aux_loss_in_eval_without_labels() -> None:
    """Plain eval forwards (generation) skip the aux-loss computation and return the base output type."""
    model = injected("llama", num_experts=4)
    ids, _ = random_batch()
    out = model(input_ids=ids)
    assert out.loss is None and "aux_loss" not in out


@pytest.mark.parametrize(("router", "per_token"), [("topk", 2), ("switch", 1), ("dense", 4)])
def test_routing_stats_shapes_and_padding(router: str, per_token: int) -> None:
    """routing_stats (output and loramix.routing_stats) has one row per MoE layer and one count per
    expert; the counts cover exactly the real tokens (padding is never routed)."""
    model = injected("llama", num_experts=4, top_k=2, router=router, capacity_factor=4.0)
    ids, mask = random_batch(batch=3, seq=10, pad_left=4)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    table = out.routing_stats["tokens_per_expert"]
    assert table.shape == (2, 4) and table.dtype == torch.long
    assert out.routing_stats["router_entropy"].shape == (2,)
    real = int(mask.sum())
    assert table.sum(dim=1).tolist() == [real * per_token] * 2
    stats = loramix.routing_stats(model)
    assert len(stats) == 2
    for row, s in zip(table, stats, strict=True):
        assert s["tokens_per_expert"].shape == (4,) and torch.equal(s["tokens_per_expert"], row)
        assert 0.0 <= s["entropy"] <= math.log(4) + 1e-6


def test_return_dict_false_adds_aux_to_the_loss() -> None:
    """With return_dict=False the tuple's loss also includes the aux loss."""
    model = injected("llama", num_experts=4, balance_coef=0.5)
    ids, _ = random_batch()
    tup = model(input_ids=ids, labels=ids, return_dict=False)
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(tup[0], out.loss)
    torch.testing.assert_close(tup[0], hf_style_lm_loss(tup[1], ids) + out.aux_loss)


# --- errors that explain the model -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "cfg", "error", "must_mention"),
    [
        ("gpt2", dict(expert_targets=["gate"]), FFNNotSupportedError, ["gate", "c_fc", "c_proj"]),
        ("llama", dict(expert_targets=["up"], ffn_names={"up": "w3", "down": "w2"}), FFNNotSupportedError,
         ["w3", "gate_proj", "up_proj", "down_proj"]),
        ("gpt2", dict(ffn_names={"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
         FFNNotSupportedError, ["c_fc", "c_proj"]),
        ("llama", dict(mlp_name="feed_forward"), ValueError, ["feed_forward", "mlp", "self_attn"]),
        ("gpt2", dict(mlp_name="ffn"), ValueError, ["ffn", "mlp", "attn"]),
        ("llama", dict(attn_targets=["query"]), ValueError, ["query", "q_proj", "o_proj"]),
    ],
    ids=["gpt2-gate", "llama-ffn-names", "gpt2-llama-names", "llama-mlp-name", "gpt2-mlp-name",
         "attn-targets"],
)
def test_missing_modules_raise_an_error_listing_what_the_model_has(arch, cfg, error, must_mention) -> None:
    """Asking for modules the model lacks fails with a message naming the request and what exists,
    and leaves the model unchanged."""
    model = tiny_model(arch)
    before = module_types(model)
    with pytest.raises(error) as info:
        inject(model, MixLoraConfig(num_experts=4, **cfg))
    for word in must_mention:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"
    assert module_types(model) == before
    assert not hasattr(model, "loramix_state")
    assert all(p.requires_grad for p in model.parameters())


def test_inject_twice_is_refused() -> None:
    """A model that already has loramix adapters cannot be injected again."""
    model = injected("llama", num_experts=2)
    with pytest.raises(ValueError, match="already"):
        inject(model, MixLoraConfig(num_experts=2))


# --- layer-wise expert counts ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "counts"),
    [
        (dict(num_experts=[3, 0]), [3, 0]),
        (dict(num_experts={1: 2}, default_num_experts=0), [0, 2]),
        (dict(num_experts={0: 5}, default_num_experts=2), [5, 2]),
        (dict(num_experts=[2, 4]), [2, 4]),
    ],
    ids=["list-with-zero", "dict-default-zero", "dict-default-two", "list"],
)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_layer_expert_counts(arch: str, cfg: dict, counts: list[int]) -> None:
    """List and dict counts give each layer its own number of experts; 0 leaves the layer's FFN the
    original module; stats are zero-padded to the widest layer."""
    model = tiny_model(arch)
    originals = decoder_mlps(model)
    inject(model, MixLoraConfig(top_k=2, **cfg))
    perturb_adapters(model)
    for orig, mlp, n in zip(originals, decoder_mlps(model), counts, strict=True):
        if n == 0:
            assert mlp is orig and not any(p.requires_grad for p in mlp.parameters())
        else:
            assert isinstance(mlp, MixLoraFFN) and mlp.num_experts == n and mlp.base is orig
    ids, _ = random_batch()
    out = model(input_ids=ids, labels=ids)
    moe_counts = [n for n in counts if n]
    table = out.routing_stats["tokens_per_expert"]
    assert table.shape == (len(moe_counts), max(moe_counts))
    for row, n in zip(table, moe_counts, strict=True):
        assert row[n:].sum() == 0 and row[:n].sum() == ids.numel() * 2
    assert torch.isfinite(out.loss)


def test_zero_experts_everywhere_is_attention_only_lora() -> None:
    """num_experts=0 keeps every FFN, trains only attention LoRA and returns the plain LM loss."""
    model = tiny_model("llama")
    originals = decoder_mlps(model)
    inject(model, MixLoraConfig(num_experts=0))
    assert all(a is b for a, b in zip(originals, decoder_mlps(model), strict=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "mixlora_" not in n for n in trainable)
    perturb_adapters(model)
    ids, _ = random_batch()
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, hf_style_lm_loss(out.logits, ids))
    assert loramix.routing_stats(model) == []


def test_attention_lora_off() -> None:
    """attn_r=0 adds no attention LoRA: only mixlora_* parameters are trainable."""
    model = injected("llama", num_experts=2, attn_r=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("mixlora_" in n for n in trainable)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


# --- ordinary nn.Module behaviour ------------------------------------------------------------------
@pytest.mark.parametrize("router", ["topk", "noisy_topk"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_to_dtype(dtype: torch.dtype, router: str) -> None:
    """model.to(dtype) converts the adapters too; forward and backward run and match the float32 logits to the
    precision of the coarser of the two dtypes."""
    model = injected("llama", num_experts=4, router=router, dropout=0.0, attn_dropout=0.0)
    ids, _ = random_batch()
    ref = logits_of(model, ids)
    ref_experts = chosen_experts(model)
    model.to(dtype)
    assert all(p.dtype == dtype for p in model.parameters())
    got = logits_of(model, ids)
    assert got.dtype == dtype
    # A token near a top-k tie may pick another expert in the other dtype; that changes its logits and, through
    # attention, those of the later tokens of its row, by more than rounding: those tokens are left out.
    flipped = (chosen_experts(model) != ref_experts).any(dim=-1).any(dim=0).reshape(ids.shape)  # (B, L)
    same = ~flipped.cummax(dim=1).values
    assert same.float().mean() >= 0.75
    # The logits' error is a small multiple of the coarser dtype's eps times their scale (measured on this model:
    # up to 5 eps for bfloat16, 9 eps for the float32 reference against float64); 16 eps leaves room for other
    # summation orders.
    eps = torch.finfo(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32).eps
    torch.testing.assert_close(got.float()[same], ref[same], rtol=0.0, atol=16 * eps * float(ref.abs().max()))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in model.parameters() if p.requires_grad)


def test_state_dict_contains_the_trainable_keys() -> None:
    """state_dict holds every trainable parameter under its name: routers, every expert projection
    and the attention LoRA, plus the frozen base weights."""
    model = injected("llama", num_experts=4, router="noisy_topk")
    sd = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(sd)
    buffers = {k for k in sd if k.endswith((".balance_bias", ".balance_pending"))}  # saved, not trained
    assert trainable == {k for k in sd if "lora_" in k or "mixlora_" in k} - buffers
    assert len(buffers) == 4
    for i in range(2):
        prefix = f"model.layers.{i}.mlp."
        assert {prefix + "mixlora_router.weight", prefix + "mixlora_router.noise.weight"} <= trainable
        for role in ("gate", "up", "down"):
            assert sd[prefix + f"mixlora_experts.{role}.lora_A"].shape[0] == 4
            assert sd[prefix + f"mixlora_experts.{role}.lora_B"].shape[0] == 4
        assert prefix + "base.up_proj.weight" in sd
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert f"model.layers.{i}.self_attn.{proj}.lora_A.default.weight" in trainable


def test_state_dict_round_trips_into_a_second_injected_model() -> None:
    """load_state_dict of one injected model's state into another reproduces its logits exactly."""
    a = injected("llama", num_experts=4)
    b = injected("llama", perturb=False, num_experts=4)
    ids, _ = random_batch()
    assert not torch.equal(logits_of(a, ids), logits_of(b, ids))
    b.load_state_dict(a.state_dict())
    assert torch.equal(logits_of(a, ids), logits_of(b, ids))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_works_and_cache_matches_no_cache(arch: str) -> None:
    """generate() runs on an injected model with left padding; greedy decoding with the KV cache
    (one new token per step, mask longer than the input) equals decoding without it."""
    model = injected(arch, num_experts=4, top_k=2)
    ids, mask = random_batch(batch=2, seq=6, pad_left=2)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (2, 12)
    assert torch.equal(cached, uncached)
    assert (cached[:, 6:] < VOCAB).all()


def test_compile_eager_backend_matches_eager() -> None:
    """torch.compile (dynamo capture, eager backend) of an injected model gives the eager logits.

    One layer and two experts: dynamo needs ~10 s per layer here (the routed dispatch has
    data-dependent shapes, so the graph breaks several times per MoE layer)."""
    model = inject(tiny_model("llama", num_hidden_layers=1), MixLoraConfig(num_experts=2, top_k=1))
    perturb_adapters(model)
    ids, mask = random_batch(pad_left=2)
    ref = logits_of(model, ids, mask)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(logits_of(compiled, ids, mask), ref, **TOL)


@pytest.mark.slow
def test_compile_default_backend_matches_eager() -> None:
    """torch.compile with the default (inductor) backend gives the eager logits (slow on CPU)."""
    torch._dynamo.reset()
    model = injected("llama", num_experts=4)
    ids, mask = random_batch(pad_left=2)
    ref = logits_of(model, ids, mask)
    start = time.perf_counter()
    compiled = torch.compile(model)
    torch.testing.assert_close(logits_of(compiled, ids, mask), ref, **TOL)
    print(f"inductor compile + first forward: {time.perf_counter() - start:.1f}s")


# --- unload ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_unload_restores_the_base_exactly(arch: str) -> None:
    """unload() gives back the exact base logits, module types, parameters, requires_grad flags and
    attributes (no leftover adapter state)."""
    model = tiny_model(arch)
    model.lm_head.weight.requires_grad_(False)  # a user-frozen parameter must stay frozen
    ids, mask = random_batch(pad_left=2)
    base = logits_of(model, ids, mask)
    types, keys, attrs = module_types(model), set(model.state_dict()), set(vars(model))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    inject(model, MixLoraConfig(num_experts=4))
    perturb_adapters(model)
    assert not torch.equal(logits_of(model, ids, mask), base)
    unload(model)
    assert torch.equal(logits_of(model, ids, mask), base)
    assert module_types(model) == types
    assert set(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert set(vars(model)) == attrs
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_inject_after_unload_works() -> None:
    """A model can be injected again after unload() (e.g. to try another config)."""
    model = injected("llama", num_experts=2)
    unload(model)
    inject(model, MixLoraConfig(num_experts=3, top_k=1, attn_r=4))
    assert [m.num_experts for m in decoder_mlps(model)] == [3, 3]
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 4
    ids, _ = random_batch()
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
