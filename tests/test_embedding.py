"""loramix.embedding: mean pooling and the sentence encoder loaded from a local directory."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from helpers.tiny_tokenizer import tiny_tokenizer
from loramix.embedding import SentenceEmbedder, ends_pool, mean_pool, pool


def test_mean_pool_averages_only_the_masked_positions():
    hidden = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)  # (B, L, H)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))
    assert torch.equal(mean_pool(hidden, torch.zeros(2, 3)), torch.zeros(2, 2))  # no real token: zeros


@pytest.mark.parametrize("side", ["right", "left"])
def test_ends_pool_is_the_mean_and_the_means_of_the_first_and_last_tokens(side):
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 3)  # (B, L, H)
    lengths = [7, 4]
    mask = torch.zeros(2, 7, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, 7 - n:] = 1
    out = ends_pool(hidden, mask, 2)  # (B, 3H)
    for b in range(2):
        real = hidden[b][mask[b].bool()]  # (n, H)
        want = torch.cat([real.mean(0), real[:2].mean(0), real[-2:].mean(0)])
        torch.testing.assert_close(out[b], want)
    wide = ends_pool(hidden, mask, 100)  # ends past the length: all three parts are the mean
    torch.testing.assert_close(wide[:, 3:6], wide[:, :3])
    torch.testing.assert_close(wide[:, 6:], wide[:, :3])
    unit = pool(hidden, mask, ends=2)
    torch.testing.assert_close(unit.view(2, 3, 3).norm(dim=-1), torch.ones(2, 3))


def test_end_pooling_keeps_a_short_request_that_the_mean_over_a_long_text_dilutes():
    torch.manual_seed(0)
    text = torch.randn(1, 200, 8).expand(2, 200, 8)  # the same long text in two prompts
    request = torch.randn(2, 4, 8)  # two different four-token requests after it
    hidden, mask = torch.cat([text, request], 1), torch.ones(2, 204)  # (2, 204, 8)
    mean = pool(hidden, mask)  # (2, 8)
    ends = pool(hidden, mask, ends=4).view(2, 3, 8)  # (2, [mean, head, tail], 8)
    assert float(mean[0] @ mean[1]) > 0.95  # the mean barely sees the request
    assert float(ends[0, 2] @ ends[1, 2]) < 0.8  # the tail mean is the request itself
    torch.testing.assert_close(ends[:, 2], torch.nn.functional.normalize(request.mean(1), dim=-1))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny BERT encoder and its tokenizer saved as a local encoder directory."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("encoder")
    BertModel(BertConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(path)
    tiny_tokenizer(chat_template=False).save_pretrained(path)
    return path


def test_local_encoder_gives_unit_rows_that_do_not_depend_on_the_batch(encoder_dir):
    embed = SentenceEmbedder(str(encoder_dir), batch_size=2)
    texts = ["hello world", "the cat sat on the mat and it was good", "hello world"]
    out = embed(texts)
    assert out.shape == (3, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out[0], out[2])  # padding in another batch does not change a text's embedding
    torch.testing.assert_close(embed(["hello world"])[0], out[0], rtol=1e-5, atol=1e-6)


def test_local_encoder_with_end_pooling(encoder_dir):
    texts = ["hello world", "the cat sat on the mat and it was good"]
    plain = SentenceEmbedder(str(encoder_dir))(texts)
    ends = SentenceEmbedder(str(encoder_dir), ends=2, batch_size=1)(texts)
    assert ends.shape == (2, 48)
    torch.testing.assert_close(ends[:, :16], plain, rtol=1e-5, atol=1e-6)  # the first part is the plain embedding
    torch.testing.assert_close(ends.view(2, 3, 16).norm(dim=-1), torch.ones(2, 3))
    assert not torch.allclose(ends[1, 16:32], ends[1, 32:])  # head and tail of a long text differ
    with pytest.raises(ValueError, match="end pooling"):
        SentenceEmbedder("someone/hub-model", ends=2)


def test_missing_local_encoder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="sentence encoder directory .*nowhere does not exist"):
        SentenceEmbedder(str(tmp_path / "nowhere"))


def test_hidden_state_embedder_pools_one_layer_and_restores_the_mode():
    """Skills and continual learning share this embedder: the masked mean of a layer's hidden states, unit rows
    unless normalize=False, independent of batching, the model's mode restored, adapters off under disable."""
    from helpers.tiny_models import tiny_model
    from loramix.embedding import HiddenStateEmbedder, encode_head_tail

    model, tok = tiny_model("llama").train(), tiny_tokenizer()
    texts = ["hello world", "the cat sat on the mat", "hello world"]
    entered = []

    class Guard:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    embed = HiddenStateEmbedder(model, tok, layer=1, batch_size=2, disable=Guard)
    out = embed(texts)
    assert out.shape == (3, 32) and entered == [True] and model.training
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out[0], out[2])
    raw = HiddenStateEmbedder(model, tok, layer=1, normalize=False)(texts[:1])
    enc, _ = encode_head_tail(tok, texts[:1], 256)
    with torch.no_grad():
        want = model.eval()(**enc, output_hidden_states=True).hidden_states[1].mean(1)
    torch.testing.assert_close(raw, want)
    with pytest.raises(ValueError, match="nothing to embed"):
        embed([])


def test_head_tail_cut_keeps_both_ends_of_a_long_text_and_reads_an_empty_one():
    from loramix.embedding import encode_head_tail

    tok = tiny_tokenizer()
    long_text = " ".join(["a"] * 20 + ["b"] * 20)
    enc, cut = encode_head_tail(tok, [long_text, "hello", ""], 10)
    ids = enc["input_ids"][0].tolist()
    assert cut == [True, False, False] and ids[:5] == tok("a a a a a")["input_ids"] and ids[5:] == tok(
        "b b b b b")["input_ids"]
    assert enc["attention_mask"].sum(1).tolist() == [10, 1, 1]  # the empty text reads as one pad token


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hidden_state_embedder_on_a_half_precision_base(dtype):
    """A bf16 / fp16 base (and bf16 autocast) gives float32 unit rows close to the float32 base's."""
    from helpers.tiny_models import tiny_model
    from loramix.embedding import HiddenStateEmbedder

    tok, texts = tiny_tokenizer(), ["hello world", "the cat sat on the mat and it was good"]
    ref = HiddenStateEmbedder(tiny_model("llama"), tok)(texts)
    half = HiddenStateEmbedder(tiny_model("llama").to(dtype), tok)(texts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = HiddenStateEmbedder(tiny_model("llama"), tok)(texts)
    for out in (half, auto):
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))
        assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.99
    ends_ref = HiddenStateEmbedder(tiny_model("llama"), tok, ends=2)(texts)  # (2, 3H): mean, head, tail
    ends_half = HiddenStateEmbedder(tiny_model("llama").to(dtype), tok, ends=2)(texts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ends_auto = HiddenStateEmbedder(tiny_model("llama"), tok, ends=2)(texts)
    for out in (ends_half, ends_auto):
        assert out.dtype == torch.float32 and out.shape == ends_ref.shape and torch.isfinite(out).all()
        parts, ref_parts = out.view(2, 3, -1), ends_ref.view(2, 3, -1)  # (texts, part, H)
        torch.testing.assert_close(parts.norm(dim=-1), torch.ones(2, 3))
        assert torch.nn.functional.cosine_similarity(parts, ref_parts, dim=-1).min() > 0.99
