"""generation.py: generate (greedy/sampled/streamed), chat_loop and load_for_inference on tiny models."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import loramix
from helpers.tiny_models import tiny_model
from helpers.tiny_tokenizer import tiny_tokenizer
from loramix import generation
from loramix.generation import adapter_kind, chat_loop, generate, load_for_inference


def _greedy_by_hand(model, ids: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding without KV cache: the reference the cached generate() must reproduce."""
    out: list[int] = []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            seq.append(nxt)
    return out


def test_greedy_generate_matches_uncached_argmax_loop():
    model, tok = tiny_model("llama", seed=1), tiny_tokenizer()
    text = generate(model, tok, "hello world", max_new_tokens=8, temperature=0.0)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hello world"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    expected = tok.decode(_greedy_by_hand(model, ids, 8, tok.eos_token_id), skip_special_tokens=True)
    assert text == expected
    assert isinstance(text, str)


def test_raw_prompt_without_chat_template_is_used_verbatim():
    model, tok = tiny_model("llama", seed=2), tiny_tokenizer()
    text = generate(model, tok, "the cat sat on", max_new_tokens=5, temperature=0.0, chat_template=False)
    ids = tok("the cat sat on")["input_ids"]
    expected = tok.decode(_greedy_by_hand(model, ids, 5, tok.eos_token_id), skip_special_tokens=True)
    assert text == expected


def test_sampling_is_seeded_and_streaming_yields_the_same_text():
    model, tok = tiny_model("llama", seed=3), tiny_tokenizer()
    a = generate(model, tok, "hello", max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    pieces: list[str] = []
    b = generate(
        model,
        tok,
        "hello",
        max_new_tokens=12,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=7,
        stream=pieces.append,
    )
    assert a == b
    assert "".join(pieces).strip() == b.strip()
    assert len(pieces) >= 1


def test_stream_true_prints_to_stdout(capsys):
    model, tok = tiny_model("llama", seed=4), tiny_tokenizer()
    text = generate(model, tok, "hello", max_new_tokens=6, temperature=0.0, stream=True)
    assert capsys.readouterr().out.strip() == text.strip()


def test_generate_rejects_bad_arguments():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tok, "hi", temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, "hi", max_new_tokens=0)


def test_generate_works_on_an_injected_model_and_keeps_train_mode():
    model, tok = tiny_model("llama", seed=5), tiny_tokenizer()
    loramix.inject(model, loramix.MixLoraConfig(num_experts=4, top_k=2, r=4, attn_r=4))
    model.train()
    out = generate(model, tok, "hello world", max_new_tokens=4, temperature=0.0)
    assert isinstance(out, str)
    assert model.training  # restored


class _Console:
    def __init__(self, lines: list[str]) -> None:
        self.lines = list(lines)
        self.printed: list[str] = []

    def input(self, prompt: str) -> str:
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)

    def print(self, *args, end: str = "\n", flush: bool = False) -> None:
        self.printed.append(" ".join(str(a) for a in args) + end)


def test_chat_loop_keeps_history_and_reset_clears_it(monkeypatch):
    model, tok = tiny_model("llama", seed=6), tiny_tokenizer()
    seen: list[list[dict]] = []
    real = generation.generate

    def spy(model, tokenizer, prompt, **kw):
        seen.append([dict(m) for m in prompt])
        return real(model, tokenizer, prompt, **kw)

    monkeypatch.setattr(generation, "generate", spy)
    console = _Console(["hello", "how are you", "/reset", "again", "/exit", "never read"])
    history = chat_loop(model, tok, input_fn=console.input, print_fn=console.print, max_new_tokens=4, temperature=0.0)
    assert [m["content"] for m in seen[0]] == ["hello"]
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"]  # history sent with turn 2
    assert seen[1][0]["content"] == "hello" and seen[1][2]["content"] == "how are you"
    assert [m["content"] for m in seen[2]] == ["again"]  # /reset dropped the first two turns
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"] == "again"
    assert console.lines == ["never read"]  # /exit stopped reading
    assert any("history cleared" in p for p in console.printed)


def test_chat_loop_streams_the_reply_and_ends_on_eof():
    model, tok = tiny_model("llama", seed=7), tiny_tokenizer()
    console = _Console(["hello world"])
    history = chat_loop(
        model,
        tok,
        input_fn=console.input,
        print_fn=console.print,
        max_new_tokens=6,
        temperature=0.0,
        system="you are good",
    )
    reply = history[-1]["content"]
    assert history[0] == {"role": "system", "content": "you are good"}
    expected = generate(
        model,
        tok,
        [{"role": "system", "content": "you are good"}, {"role": "user", "content": "hello world"}],
        max_new_tokens=6,
        temperature=0.0,
    )
    assert reply == expected.strip()
    streamed = "".join(p for p in console.printed[1:])  # after the banner
    assert reply in streamed.replace("\n", " ").strip() or reply == ""


def test_chat_loop_drops_old_turns_beyond_the_context():
    model, tok = tiny_model("llama", seed=8), tiny_tokenizer()  # 64 positions
    long = " ".join(["cat"] * 20)
    console = _Console([long, long, long, "/exit"])
    history = chat_loop(model, tok, input_fn=console.input, print_fn=console.print, max_new_tokens=8, temperature=0.0)
    assert len(history) < 6  # the oldest exchanges were dropped
    assert history[-2]["content"] == long


@pytest.fixture()
def saved_base(tmp_path):
    model, tok = tiny_model("llama", seed=9), tiny_tokenizer()
    path = tmp_path / "base"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def test_load_for_inference_base_and_loramix_adapter(saved_base, tmp_path):
    path, model, tok = saved_base
    ids = torch.tensor([[4, 6, 51, 52, 5]])
    base, tok2 = load_for_inference(str(path), device="cpu", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, model(input_ids=ids).logits)
    adapted = loramix.inject(copy.deepcopy(model), loramix.MixLoraConfig(num_experts=4, top_k=2, r=4, attn_r=4))
    with torch.no_grad():  # non-zero B so the adapter changes the output
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    adapted.eval()
    loramix.save_adapter(adapted, tmp_path / "adapter")
    assert adapter_kind(tmp_path / "adapter") == "loramix"
    loaded, _ = load_for_inference(str(path), tmp_path / "adapter", device="cpu", dtype="float32")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, want)
        assert (want - model(input_ids=ids).logits).abs().max() > 1e-3
    merged, _ = load_for_inference(str(path), tmp_path / "adapter", device="cpu", dtype="float32", merge=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)


def test_load_for_inference_peft_adapter(saved_base, tmp_path):
    from peft import LoraConfig, get_peft_model

    path, model, _ = saved_base
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "peft")
    assert adapter_kind(tmp_path / "peft") == "peft"
    ids = torch.tensor([[4, 6, 51, 52, 5]])
    loaded, _ = load_for_inference(str(path), tmp_path / "peft", device="cpu", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits)


def test_adapter_kind_rejects_non_adapters(tmp_path):
    with pytest.raises(FileNotFoundError):
        adapter_kind(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"foo": 1}')
    with pytest.raises(ValueError):
        adapter_kind(tmp_path)


@pytest.mark.slow
def test_default_model_answers():
    if os.environ.get("LORAMIX_SKIP_DEFAULT_MODEL"):
        pytest.skip("default model disabled")
    model, tok = load_for_inference(None, device="cpu")
    text = generate(model, tok, "What is the capital of France?", max_new_tokens=16, temperature=0.0)
    assert "Paris" in text
