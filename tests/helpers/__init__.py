"""Test helpers: tiny in-process models and tokenizers (``tiny_models``, ``tiny_lm``, ``tiny_tokenizer``) and
the MixLoraFFN fixtures shared by several test files (``moe_layers``). Test files import them as
``from helpers.tiny_models import tiny_model``: pytest puts ``tests/`` on the path of the tests it collects."""
