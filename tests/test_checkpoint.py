"""save_adapter / load_adapter: exact round trips, minimal files, and clean failure on bad checkpoints."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loramix.checkpoint
from helpers.tiny_models import module_types, perturb_adapters, random_batch, tiny_model
from loramix import AdapterLoadError, MixLoraConfig, get_config, inject, load_adapter, save_adapter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

SAVE_CASES = [
    ("llama", dict(num_experts=4, top_k=2)),
    ("llama", dict(num_experts={1: 3}, default_num_experts=0, router="noisy_topk", expert_type="adapter")),
    ("gpt2", dict(num_experts=4, router="switch", capacity_factor=1.0)),
    ("gpt2", dict(num_experts=[2, 3], router="dense", expert_type="adapter", expert_targets=None)),
    ("qwen2", dict(num_experts=3, top_k=1, expert_targets=["up", "down"], attn_r=0)),
]


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = random_batch(pad_left=3)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def adapted(arch: str, **cfg: object) -> torch.nn.Module:
    """An injected model whose LoRA B, routers and scales are random (so a bad load shows in the logits)."""
    model = inject(tiny_model(arch), MixLoraConfig(**cfg))
    perturb_adapters(model)
    return model


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory) -> Path:
    """A valid llama adapter directory; tests copy it before damaging it."""
    directory = tmp_path_factory.mktemp("llama_adapter")
    save_adapter(adapted("llama", num_experts=4, router="noisy_topk"), directory)
    return directory


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rewrite_meta(directory: Path, change: Callable[[dict], None]) -> None:
    meta = json.loads((directory / CONFIG).read_text())
    change(meta)
    (directory / CONFIG).write_text(json.dumps(meta))


def fix_checksum(directory: Path) -> None:
    """Make the recorded SHA-256 match the (edited) weights file, so a later check has to catch the edit."""
    digest = hashlib.sha256((directory / WEIGHTS).read_bytes()).hexdigest()
    rewrite_meta(directory, lambda m: m.__setitem__("weights_sha256", digest))


def rewrite_tensors(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(directory / WEIGHTS)
    change(tensors)
    save_file(tensors, directory / WEIGHTS)
    fix_checksum(directory)


def assert_load_fails_cleanly(base: torch.nn.Module, directory: Path, error: type = AdapterLoadError,
                              match: str | None = None) -> None:
    """load_adapter raises ``error`` and the base model is exactly as before."""
    logits, types, attrs = logits_of(base), module_types(base), set(vars(base))
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    with pytest.raises(error, match=match):
        load_adapter(base, directory)
    assert not hasattr(base, "loramix_state")
    assert module_types(base) == types
    assert set(vars(base)) == attrs
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert not base._forward_hooks and not base._forward_pre_hooks
    assert torch.equal(logits_of(base), logits)


# --- round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "cfg"), SAVE_CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(SAVE_CASES)])
def test_save_load_round_trips_logits_exactly(tmp_path, arch: str, cfg: dict) -> None:
    """save_adapter then load_adapter on a fresh base gives bit-identical logits and an equal config."""
    model = adapted(arch, **cfg)
    expected = logits_of(model)
    assert not torch.equal(expected, logits_of(tiny_model(arch)))  # the adapter is not a no-op
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(tiny_model(arch), tmp_path / "a")
    assert torch.equal(logits_of(loaded), expected)
    assert get_config(loaded) == get_config(model)


def test_saved_files_hold_only_the_trainable_tensors(tmp_path) -> None:
    """The directory holds exactly adapter_model.safetensors and adapter_config.json; the weights file
    holds exactly the trainable tensors (no frozen base weights), with their values, plus each router's
    balance-bias buffers."""
    model = adapted("llama", num_experts=4)
    save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([CONFIG, WEIGHTS])
    tensors = load_file(tmp_path / "a" / WEIGHTS)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    trainable |= {n: b for n, b in model.named_buffers() if n.endswith((".balance_bias", ".balance_pending"))}
    assert set(tensors) == set(trainable)
    assert all("lora_" in n or "mixlora_" in n for n in tensors)
    for name, t in tensors.items():
        assert torch.equal(t, trainable[name].detach())
    meta = json.loads((tmp_path / "a" / CONFIG).read_text())
    assert meta["weights_sha256"] == hashlib.sha256((tmp_path / "a" / WEIGHTS).read_bytes()).hexdigest()
    assert MixLoraConfig.from_dict(meta["config"]) == get_config(model)


def test_loaded_adapter_is_frozen_unless_trainable(saved_llama: Path) -> None:
    """load_adapter freezes everything by default (inference); trainable=True unfreezes exactly the
    adapter."""
    frozen = load_adapter(tiny_model("llama"), saved_llama)
    assert not any(p.requires_grad for p in frozen.parameters())
    live = load_adapter(tiny_model("llama"), saved_llama, trainable=True)
    for name, p in live.named_parameters():
        assert p.requires_grad == ("lora_" in name or "mixlora_" in name), name


def test_loaded_model_keeps_eval_mode(saved_llama: Path) -> None:
    """Loading onto an eval() base gives a deterministic eval() model (no adapter dropout or router noise)."""
    loaded = load_adapter(tiny_model("llama"), saved_llama)
    assert not any(m.training for m in loaded.modules())
    assert torch.equal(logits_of(loaded), logits_of(loaded))


def test_resave_is_identical(tmp_path, saved_llama: Path) -> None:
    """Saving a loaded adapter again writes the same tensors (nothing is lost or renamed in a round trip)."""
    save_adapter(load_adapter(tiny_model("llama"), saved_llama), tmp_path / "again")
    a, b = load_file(saved_llama / WEIGHTS), load_file(tmp_path / "again" / WEIGHTS)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- bad checkpoints ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "overrides", "mentions"),
    [
        ("llama", dict(hidden_size=48), "hidden_size"),
        ("llama", dict(num_hidden_layers=3), "num_hidden_layers"),
        ("llama", dict(intermediate_size=96), "intermediate_size"),
        ("llama", dict(vocab_size=256), "vocab_size"),
        ("qwen2", {}, "model_type"),
        ("gpt2", {}, "model_type"),
    ],
    ids=["hidden", "layers", "intermediate", "vocab", "qwen2", "gpt2"],
)
def test_other_architecture_is_refused(saved_llama: Path, arch: str, overrides: dict, mentions: str) -> None:
    """An adapter trained for another architecture is refused (naming the mismatch); the base is untouched."""
    assert_load_fails_cleanly(tiny_model(arch, **overrides), saved_llama, match=mentions)


def test_truncated_weights_are_refused(tmp_path, saved_llama: Path) -> None:
    """A truncated weights file fails the checksum."""
    d = copy_adapter(saved_llama, tmp_path / "a")
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    assert_load_fails_cleanly(tiny_model("llama"), d, match="checksum")


def test_altered_bytes_are_refused(tmp_path, saved_llama: Path) -> None:
    """Changing a single byte of tensor data (file still a valid safetensors) fails the checksum."""
    d = copy_adapter(saved_llama, tmp_path / "a")
    data = bytearray((d / WEIGHTS).read_bytes())
    data[-3] ^= 0x40
    (d / WEIGHTS).write_bytes(bytes(data))
    load_file(d / WEIGHTS)  # the damage is invisible to the format itself
    assert_load_fails_cleanly(tiny_model("llama"), d, match="checksum")


def test_garbage_with_matching_checksum_is_refused(tmp_path, saved_llama: Path) -> None:
    """A file that is not safetensors at all is refused even when its checksum was updated."""
    d = copy_adapter(saved_llama, tmp_path / "a")
    (d / WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json header at all")
    fix_checksum(d)
    assert_load_fails_cleanly(tiny_model("llama"), d, match="safetensors")


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        (lambda t: t.pop(sorted(k for k in t if "mixlora_experts" in k)[0]), r"missing \[.+\] \(1\)"),
        (lambda t: t.pop(sorted(k for k in t if "mixlora_router.noise" in k)[-1]), r"missing \[.+\] \(1\)"),
        (lambda t: t.pop(sorted(k for k in t if "self_attn" in k)[0]), r"missing \[.+\] \(1\)"),
        (lambda t: t.__setitem__("model.layers.0.mlp.mixlora_extra", torch.zeros(2)),
         r"unexpected \[.+\] \(1\)"),
        (lambda t: t.__setitem__(sorted(t)[0], torch.zeros(3, 3)), r"wrong shape \[.+\] \(1\)"),
    ],
    ids=["missing-expert", "missing-router-noise", "missing-attention", "unexpected", "wrong-shape"],
)
def test_tensor_mismatch_is_refused(tmp_path, saved_llama: Path, change, mentions: str) -> None:
    """A weights file with a missing, extra or wrongly shaped tensor (checksum fixed so the tensor
    check is what fires) is refused and the injection it needed is undone."""
    d = copy_adapter(saved_llama, tmp_path / "a")
    rewrite_tensors(d, change)
    assert_load_fails_cleanly(tiny_model("llama"), d, match=mentions)


def test_base_is_reusable_after_a_failed_load(tmp_path, saved_llama: Path) -> None:
    """After a load fails at the tensor check (inject + undo), the same base accepts a good adapter."""
    d = copy_adapter(saved_llama, tmp_path / "bad")
    rewrite_tensors(d, lambda t: t.pop(sorted(t)[0]))
    base = tiny_model("llama")
    with pytest.raises(AdapterLoadError):
        load_adapter(base, d)
    loaded = load_adapter(base, saved_llama)
    assert torch.equal(logits_of(loaded), logits_of(load_adapter(tiny_model("llama"), saved_llama)))


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        (lambda m: m["config"].__setitem__("num_expert", 4), "num_expert"),
        (lambda m: m["config"].__setitem__("router", "mystery"), "router"),
        (lambda m: m.__setitem__("comment", "hi"), "comment"),
        (lambda m: m.__setitem__("format", "peft"), "format"),
        (lambda m: m.__setitem__("format_version", 99), "format_version"),
        (lambda m: m.pop("config"), "config"),
        (lambda m: m.__setitem__("weights_sha256", "0" * 64), "checksum"),
    ],
    ids=["unknown-config-key", "bad-config-value", "unknown-top-level-key", "format", "version",
         "no-config", "sha"],
)
def test_bad_metadata_is_refused(tmp_path, saved_llama: Path, change, mentions: str) -> None:
    """Each kind of bad adapter_config.json is refused with AdapterLoadError naming the problem."""
    d = copy_adapter(saved_llama, tmp_path / "a")
    rewrite_meta(d, change)
    assert_load_fails_cleanly(tiny_model("llama"), d, match=mentions)


@pytest.mark.parametrize("text", ['{"format": "loramix", ', "[1, 2]", "\xff\xfe garbage"],
                         ids=["truncated-json", "json-list", "not-utf8"])
def test_corrupt_json_is_refused(tmp_path, saved_llama: Path, text: str) -> None:
    """A corrupt or non-object adapter_config.json is refused with AdapterLoadError."""
    d = copy_adapter(saved_llama, tmp_path / "a")
    (d / CONFIG).write_bytes(text.encode("latin-1"))
    assert_load_fails_cleanly(tiny_model("llama"), d)


@pytest.mark.parametrize("missing", [CONFIG, WEIGHTS])
def test_missing_file_is_refused(tmp_path, saved_llama: Path, missing: str) -> None:
    """A directory without the config or without the weights file is refused with AdapterLoadError."""
    d = copy_adapter(saved_llama, tmp_path / "a")
    (d / missing).unlink()
    assert_load_fails_cleanly(tiny_model("llama"), d, match="missing")


def test_wrong_path_raises_file_not_found(tmp_path) -> None:
    """A directory that does not exist raises FileNotFoundError and changes nothing."""
    assert_load_fails_cleanly(tiny_model("llama"), tmp_path / "nowhere", error=FileNotFoundError)


def test_checkpoint_code_never_unpickles() -> None:
    """The checkpoint module never calls torch.load or pickle (adapters are safetensors + JSON only)."""
    source = inspect.getsource(loramix.checkpoint)
    for forbidden in (r"torch\.load\b", r"\bimport pickle\b", r"\bpickle\.", r"\bweights_only\b"):
        assert not re.search(forbidden, source), forbidden


def test_loading_weights_into_a_model_with_another_config_names_the_field(saved_llama: Path) -> None:
    """load_adapter_weights (resume, best-model reload) refuses a checkpoint whose config differs, naming the
    differing fields with both values; with the same config the saved weights are restored exactly."""
    from loramix.checkpoint import load_adapter_weights, trainable_state_dict

    other = inject(tiny_model("llama"), MixLoraConfig(num_experts=4, router="noisy_topk", top_k=1, r=4))
    with pytest.raises(AdapterLoadError, match=r"top_k \(checkpoint 2, model 1\), r \(checkpoint 8, model 4\)"):
        load_adapter_weights(other, saved_llama)
    same = inject(tiny_model("llama"), MixLoraConfig(num_experts=4, router="noisy_topk"))
    load_adapter_weights(same, saved_llama)
    saved = load_file(saved_llama / WEIGHTS)
    restored = trainable_state_dict(same)
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)


def test_saved_files_get_the_umask_mode(tmp_path) -> None:
    """Adapter files are created as open() would create them (0644 under umask 022), not 0600."""
    import os

    old = os.umask(0o022)
    try:
        save_adapter(adapted("llama", num_experts=2), tmp_path / "a")
    finally:
        os.umask(old)
    for name in (CONFIG, WEIGHTS):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o644, name


def test_loading_onto_an_adapted_model_says_so(saved_llama: Path) -> None:
    """A model that already carries adapters is refused with what is wrong (not 'another architecture')."""
    model = adapted("llama", num_experts=4, router="noisy_topk")
    with pytest.raises(AdapterLoadError, match="already carries a loramix adapter.*fresh base model"):
        load_adapter(model, saved_llama)
    with pytest.raises(AdapterLoadError, match="already carries a loramix adapter"):
        load_adapter(load_adapter(tiny_model("llama"), saved_llama), saved_llama)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_base_weights_digest_is_the_same_before_and_after_injection(arch: str) -> None:
    """The recorded digest is computed on the adapted model at save time and on the bare base at load time."""
    from loramix.checkpoint import base_weights_digest

    bare = base_weights_digest(tiny_model(arch))
    assert base_weights_digest(adapted(arch, num_experts=2)) == bare
    assert base_weights_digest(tiny_model(arch, seed=1)) != bare


def test_another_base_of_the_same_architecture_warns_or_is_refused(saved_llama: Path) -> None:
    """An adapter put on a base with other weights warns naming both bases; strict_base refuses it; the base
    it was trained on loads silently, whatever its name."""
    import warnings

    other = tiny_model("llama", seed=7)
    other.config._name_or_path = "someone/else"
    with pytest.warns(UserWarning, match=r"trained on base 'tiny-llama' but is being loaded onto 'someone/else'"):
        load_adapter(other, saved_llama)
    other = tiny_model("llama", seed=7)
    with pytest.raises(AdapterLoadError, match="weights differ"):
        load_adapter(other, saved_llama, strict_base=True)
    assert not hasattr(other, "loramix_state")  # refused before the model changed
    same = tiny_model("llama")
    same.config._name_or_path = "/a/local/copy"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(same, saved_llama, strict_base=True)
