"""Text generation with a base or adapted model: one-shot ``generate``, an interactive ``chat_loop`` and
``load_for_inference`` (base model alone, or base + a loramix / PEFT LoRA adapter).

Prompts are rendered exactly as training renders them (``loramix.data.render_messages``: the tokenizer's
chat template when it has one, otherwise the plain ``### Instruction:`` template), so an adapter sees at
inference the format it was trained on. Generation always uses the KV cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, TextStreamer

from .models import context_limit, model_device

logger = logging.getLogger(__name__)

Message = dict[str, str]
StreamArg = bool | Callable[[str], Any] | None

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


# --------------------------------------------------------------------------------------------------
# prompt rendering
# --------------------------------------------------------------------------------------------------
def render_chat(
    tokenizer: Any,
    messages: list[Message],
    *,
    chat_template: bool = True,
) -> tuple[str, bool]:
    """Render ``messages`` plus the assistant generation prompt as training does.

    Returns ``(text, add_special_tokens)``: chat templates write their own BOS, the plain template does
    not, so the caller must tokenize with ``add_special_tokens`` as returned.
    """
    from .data import render_messages, uses_chat_template

    text = render_messages(tokenizer, messages, add_generation_prompt=True, use_chat_template=chat_template)
    return text, not uses_chat_template(tokenizer, chat_template)


def _as_messages(prompt: str | list[Message], system: str | None) -> list[Message]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def _encode_prompt(
    tokenizer: Any, prompt: str | list[Message], *, chat_template: bool, system: str | None
) -> list[int]:
    """Token ids of the prompt. A plain string without chat template is used verbatim (raw LM use)."""
    if not chat_template and isinstance(prompt, str) and system is None:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    text, add_special = render_chat(tokenizer, _as_messages(prompt, system), chat_template=chat_template)
    return tokenizer(text, add_special_tokens=add_special)["input_ids"]


# --------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------
class CallbackStreamer(TextStreamer):
    """A ``TextStreamer`` that hands each finished piece of text to a callback instead of printing it."""

    def __init__(self, tokenizer: Any, callback: Callable[[str], Any], **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt=True, **decode_kwargs)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.callback(text)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the model's generation eos ids plus the tokenizer's eos."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


def generation_config(
    model: Any,
    tokenizer: Any,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    min_new_tokens: int | None = None,
) -> GenerationConfig:
    """A fresh ``GenerationConfig`` (sampling when ``temperature > 0``, greedy otherwise).

    Built from scratch rather than from ``model.generation_config`` so a checkpoint's sampling defaults
    never leak into greedy decoding.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": eos or None,
        "pad_token_id": pad,
        "use_cache": True,
        "repetition_penalty": repetition_penalty,
    }
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        kwargs.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=50)
    return GenerationConfig(**kwargs)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | list[Message],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 50,
    chat_template: bool = True,
    stream: StreamArg = None,
    system: str | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> str:
    """Generate a reply to ``prompt`` and return only the new text (special tokens removed).

    Args:
        prompt: a user message, or a whole chat ``[{"role", "content"}, ...]`` ending with a user turn.
        temperature: 0 means greedy decoding; > 0 samples with ``top_p`` / ``top_k``.
        chat_template: render through the tokenizer's chat template (or the plain instruction template when
            it has none). ``False`` with a string prompt feeds the string verbatim (plain LM continuation).
        stream: ``None``/``False``: no streaming; ``True``: print tokens to stdout as they come; a callable:
            called with each new piece of text.
        system: optional system message prepended to the chat.
        seed: seeds torch before sampling, for reproducible samples.
    """
    ids = _encode_prompt(tokenizer, prompt, chat_template=chat_template, system=system)
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    device = model_device(model)
    input_ids = torch.tensor([ids], device=device)
    cfg = generation_config(
        model,
        tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
    )
    streamer = None
    if stream is True:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    elif callable(stream):
        streamer = CallbackStreamer(tokenizer, stream, skip_special_tokens=True)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=cfg,
            streamer=streamer,
        )
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


def _trim_history(
    model: Any, tokenizer: Any, history: list[Message], *, max_new_tokens: int, chat_template: bool
) -> list[Message]:
    """Drop the oldest exchanges until prompt + reply fit in the model's context window."""
    limit = context_limit(model)
    if limit is None:
        return history
    msgs = list(history)
    system = [m for m in msgs[:1] if m["role"] == "system"]
    turns = msgs[len(system) :]
    while len(turns) > 1:
        n = len(_encode_prompt(tokenizer, system + turns, chat_template=chat_template, system=None))
        if n + max_new_tokens <= limit:
            break
        turns = turns[2:] if len(turns) > 2 else turns[-1:]  # drop one user/assistant pair
    return system + turns


def chat_loop(
    model: Any,
    tokenizer: Any,
    *,
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[..., Any] = print,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 50,
    chat_template: bool = True,
    repetition_penalty: float = 1.0,
    prompt_str: str = ">>> ",
) -> list[Message]:
    """Interactive chat: the reply streams as it is generated and the conversation history is kept.

    Commands: ``/reset`` clears the history, ``/exit`` (or ``/quit``, end of input, Ctrl-C) quits. Empty
    lines are ignored. Oldest exchanges are dropped when the history outgrows the model's context.
    ``input_fn`` / ``print_fn`` default to ``input`` / ``print`` and can be replaced (tests, other UIs);
    ``print_fn`` must accept ``print``'s ``end`` and ``flush`` keywords. Returns the final history.
    """
    history: list[Message] = [] if system is None else [{"role": "system", "content": system}]
    print_fn("Chat started. Commands: /reset clears the history, /exit quits.")
    while True:
        try:
            line = input_fn(prompt_str)
        except (EOFError, KeyboardInterrupt):
            print_fn("")
            break
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            history = history[:1] if history and history[0]["role"] == "system" else []
            print_fn("[history cleared]")
            continue
        history.append({"role": "user", "content": line})
        history = _trim_history(model, tokenizer, history, max_new_tokens=max_new_tokens, chat_template=chat_template)
        pieces: list[str] = []

        def emit(piece: str, pieces: list[str] = pieces) -> None:
            pieces.append(piece)
            print_fn(piece, end="", flush=True)

        try:
            reply = generate(
                model,
                tokenizer,
                history,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                chat_template=chat_template,
                stream=emit,
                repetition_penalty=repetition_penalty,
            )
        except KeyboardInterrupt:  # stop this reply, keep what was streamed
            reply = "".join(pieces)
        print_fn("")
        history.append({"role": "assistant", "content": reply.strip()})
    return history


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def adapter_kind(adapter_dir: str | Path) -> str:
    """``"loramix"`` or ``"peft"``, read from ``adapter_config.json``; raises if it is neither."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {adapter_dir} is not an adapter directory")
    meta = json.loads(path.read_text())
    if meta.get("format") == "loramix" or str(meta.get("peft_type", "")).upper() == "MIXLORA":
        return "loramix"  # loramix.load_adapter also reads official MixLoRA adapters
    if "peft_type" in meta:
        return "peft"
    raise ValueError(f"{path}: neither a loramix adapter (format=loramix) nor a PEFT adapter (peft_type)")


def load_for_inference(
    model_spec: Any = None,
    adapter_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    merge: bool = False,
    compile_decode: bool = False,
    strict_base: bool = False,
) -> tuple[Any, Any]:
    """Load a model ready for generation/evaluation: the base alone, or base + adapter.

    Args:
        model_spec: anything ``loramix.models.load_base_model`` accepts (``None`` = the default model).
        adapter_dir: a loramix adapter (``loramix.save_adapter``) or a PEFT LoRA adapter directory.
        merge: for loramix adapters, fold the attention LoRA into the base weights
            (``loramix.merge_attention``); for PEFT adapters, ``merge_and_unload``. Faster decoding,
            same outputs up to rounding.
        compile_decode: for loramix adapters, ``torch.compile`` each MixLoRA layer's per-token decoding path
            (``loramix.compiled.compile_decoding``); ignored for the base model and PEFT adapters.
        strict_base: refuse (instead of warning about) a loramix adapter trained on a base whose weights
            differ from this one's.

    Returns ``(model, tokenizer)`` with the model in eval mode and every parameter frozen.
    """
    from .models import load_base_model

    model, tokenizer = load_base_model(model_spec, cache_dir=cache_dir, dtype=dtype, device=device)
    if adapter_dir is not None:
        kind = adapter_kind(adapter_dir)
        if kind == "loramix":
            from .checkpoint import load_adapter

            model = load_adapter(model, adapter_dir, strict_base=strict_base)
            if merge:
                from .merge import merge_attention

                model = merge_attention(model)
            if compile_decode:
                from .compiled import compile_decoding

                compile_decoding(model)
        else:
            import pickle

            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, str(adapter_dir))
            except pickle.UnpicklingError as e:  # a pickled adapter_model.bin holding more than tensors
                from .checkpoint import pickle_refused

                raise pickle_refused(Path(adapter_dir) / "adapter_model.bin", e) from None
            if merge:
                model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer
