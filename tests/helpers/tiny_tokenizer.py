"""A tiny word-level tokenizer with a chat template, built in-process (no downloads), for tests."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_WORD_LIST = (
    "user assistant system the correct answer is answer1 answer2 answer3 answer4 true false "
    "please choose to question format answer: a b c d e f g h i j k l m n o p q r s t u v w x y "
    "z hello world again how are you cat dog sat on mat and it was good bad . , ? ! 0 1 2 3 4 5 "
    "6 7 8 9 10 12 42 plus minus equals what"
)
WORDS = _WORD_LIST.split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tiny_tokenizer(vocab_size: int = 128, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer; every id is below ``vocab_size`` (the tiny models' vocab)."""
    vocab: dict[str, int] = {}
    for w in SPECIALS + WORDS:
        if w not in vocab:
            vocab[w] = len(vocab)
    assert len(vocab) <= vocab_size, len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast
