"""Adapter checkpoints: trainable weights as safetensors + adapter_config.json, verified on load.

Loading checks everything before touching the model: the config keys, the base architecture's
fingerprint, the weights file's SHA-256 and every tensor's name and shape. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .adapter_tensors import TRAINABLE_MARKERS as TRAINABLE_MARKERS  # the rule of what an adapter holds
from .adapter_tensors import base_weights_digest, is_trainable_name
from .config import ConfigError, MixLoraConfig
from .injection import STATE_ATTR, architecture_fingerprint, get_state, inject, unload

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "loramix"
FORMAT_VERSION = 1
TOP_LEVEL_KEYS = {
    "format",
    "format_version",
    "loramix_version",
    "base_model_name_or_path",
    "architecture",
    "weights_file",
    "weights_sha256",
    "config",
    "base_weights",
}


class AdapterLoadError(ValueError):
    """An adapter directory cannot be loaded onto this base model; nothing was changed."""


@dataclass(frozen=True)
class AdapterFormat:
    """Another implementation's adapter format that :func:`load_adapter` reads: ``detect(directory)`` says
    whether a directory is in this format; ``load(base_model, directory)`` injects it into ``base_model`` and
    returns the adapted model. Readers register themselves with :func:`register_adapter_format` when imported;
    the modules named in ``FORMAT_MODULES`` are imported on the first :func:`load_adapter` (the official
    ``mixlora`` format is registered by ``loramix.interop``)."""

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[nn.Module, Path], nn.Module]


ADAPTER_FORMATS: list[AdapterFormat] = []
"""The registered foreign formats, asked in order before a directory is read as a loramix checkpoint."""

FORMAT_MODULES: list[str] = ["loramix.interop"]
"""Modules that register a format when imported: imported by name (like entry points) when an adapter is loaded,
so neither ``import loramix`` nor this module has to import them."""


def adapter_formats() -> list[AdapterFormat]:
    """The registered formats, after importing every module of ``FORMAT_MODULES``."""
    for module in FORMAT_MODULES:
        importlib.import_module(module)
    return ADAPTER_FORMATS


def register_adapter_format(fmt: AdapterFormat) -> None:
    """Let :func:`load_adapter` read ``fmt`` (a format registered again under its name replaces the old one)."""
    ADAPTER_FORMATS[:] = [f for f in ADAPTER_FORMATS if f.name != fmt.name] + [fmt]


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


OPTIONAL_BUFFERS = (".balance_bias", ".balance_pending")
"""Router buffers a checkpoint may lack (written as zeros on load): adapters saved without the balance bias."""


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own tensors (names with a ``lora_`` / ``mixlora_`` marker), whole.

    A tensor sharded by FSDP2 (a DTensor) is gathered: with a sharded model every rank must call this.
    """
    from torch.distributed.tensor import DTensor

    tensors = {n: t for n, t in model.state_dict().items() if is_trainable_name(n)}
    return {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in tensors.items()}


def current_umask() -> int:
    """The process umask."""
    try:  # Linux: read it without changing it (os.umask would change it for every thread meanwhile)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_file_mode() -> int:
    """The permission bits ``open()`` gives a new file under the current umask (0o666 & ~umask)."""
    return 0o666 & ~current_umask()


def umask_dir_mode() -> int:
    """The permission bits ``mkdir`` gives a new directory under the current umask (0o777 & ~umask)."""
    return 0o777 & ~current_umask()


def apply_umask_modes(directory: Path) -> None:
    """Give ``directory`` and everything under it the modes a plain ``mkdir`` / ``open`` would under the
    current umask: ``tempfile.mkdtemp`` makes a staging directory 0700 and safetensors writes files 0600."""
    dir_mode, file_mode = umask_dir_mode(), umask_file_mode()
    for p in [directory, *directory.rglob("*")]:
        if not p.is_symlink():
            p.chmod(dir_mode if p.is_dir() else file_mode)


def atomic_write(path: Path, write: Any) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it into place; the file gets the
    umask's mode (``mkstemp`` would leave it readable by its owner only)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, umask_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` written atomically and with the umask's mode (safetensors itself
    creates files readable by their owner only)."""
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_adapter(model: nn.Module, directory: str | Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write only the trainable weights and the metadata needed to rebuild the model.

    ``tensors``: the adapter's whole tensors when they were gathered already. With an FSDP-sharded model,
    gather them on every rank with :func:`trainable_state_dict` and save from one rank with ``tensors``;
    nothing here then communicates between ranks (the base-weights digest was taken at ``inject``).
    """
    state = get_state(model)
    if state.config.attn_r > 0 and not state.attn_targets:  # the config would re-create attention LoRA
        raise ValueError(
            "the attention LoRA was merged into the base weights (merge_attention); this adapter can no "
            "longer be saved on its own: save the merged model with save_pretrained instead"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tensors is None:
        tensors = trainable_state_dict(model)
    else:  # names only: reading the model's state dict could gather shards on this rank alone
        other = sorted(n for n in tensors if not is_trainable_name(n))
        if not tensors or other:
            raise ValueError(f"save_adapter: tensors must be the adapter's (trainable_state_dict), got {len(tensors)} "
                             f"tensors, of which not the adapter's: {other[:5]}")
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    weights = directory / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "producer": FORMAT}))
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "loramix_version": __version__,
        "base_model_name_or_path": state.base_model_name,
        "architecture": state.fingerprint,
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": sha256_file(weights),
        "config": state.config.to_dict(),
        "base_weights": state.base_weights or base_weights_digest(model),
    }
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return directory


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """Parse and check ``adapter_config.json`` (unknown keys are refused)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {directory}")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(f"{path} is missing: not an adapter directory")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterLoadError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object")
    if meta.get("format") != FORMAT:
        raise AdapterLoadError(f"{path}: not a loramix adapter (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterLoadError(f"{path}: format_version {meta['format_version']} is newer than this loramix")
    unknown = sorted(set(meta) - TOP_LEVEL_KEYS)
    if unknown:
        raise AdapterLoadError(f"{path}: unknown keys {unknown}")
    try:
        meta["config"] = MixLoraConfig.from_dict(meta["config"])
    except (ConfigError, TypeError, KeyError) as e:
        raise AdapterLoadError(f"{path}: bad 'config': {e}") from e
    return meta


def pickle_refused(path: str | Path, error: BaseException) -> AdapterLoadError:
    """The error for a pickled weights file that PyTorch's safe (tensors-only) loading refused: it holds
    Python objects other than tensors. Such a file is never unpickled fully: it could run arbitrary code."""
    import re

    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    what = f"it references the Python object {found.group(1)}" if found else "it is not a plain file of tensors"
    return AdapterLoadError(
        f"{path}: refused: {what}, and loramix loads pickled weights only when they hold nothing but tensors "
        "(a pickle can run code); get the adapter as safetensors (adapter_model.safetensors) from its source"
    )


def _read_weights(directory: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = directory / meta.get("weights_file", WEIGHTS_NAME)
    if not path.is_file():
        raise AdapterLoadError(f"weights file missing: {path}")
    digest = sha256_file(path)
    if digest != meta.get("weights_sha256"):
        raise AdapterLoadError(
            f"{path} does not match the checksum in {CONFIG_NAME} (truncated or altered file): "
            f"expected {meta.get('weights_sha256')}, got {digest}"
        )
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise AdapterLoadError(f"{path} is not a readable safetensors file: {e}") from e


def _model_name(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _check_base(meta: dict[str, Any], model: nn.Module, directory: Path, strict: bool) -> None:
    """Warn (``strict``: refuse) when the base differs from the one the adapter was trained on: different
    weights by the recorded digest, or, for adapters without a digest, a different model name."""
    trained_on, given = meta.get("base_model_name_or_path"), _model_name(model)
    recorded = meta.get("base_weights")
    problem = None
    if isinstance(recorded, dict):
        actual = base_weights_digest(model)
        if actual["tensors"] == recorded.get("tensors") and actual["sample_sha256"] != recorded.get("sample_sha256"):
            problem = "its weights differ from those the adapter was trained on"
    elif trained_on and given and trained_on != given:
        problem = "the model names differ (this adapter records no weight digest to compare)"
    if problem is None:
        return
    msg = (f"{directory} was trained on base {trained_on!r} but is being loaded onto {given!r}: {problem}; "
           "its outputs will not be those of the trained adapter")
    if strict:
        raise AdapterLoadError(msg + " (strict_base)")
    warnings.warn(msg + " (pass strict_base=True / --strict-base to refuse)", stacklevel=3)


def _check_not_adapted(model: nn.Module, directory: Path) -> None:
    if getattr(model, STATE_ATTR, None) is not None:
        raise AdapterLoadError(
            f"cannot load {directory}: the model already carries a loramix adapter; load it onto a fresh base "
            "model, or remove the current adapter first with loramix.unload(model)"
        )
    adapted = next((n for n, _ in model.named_parameters() if is_trainable_name(n)), None)
    if adapted is not None:
        raise AdapterLoadError(
            f"cannot load {directory}: the model already carries adapter weights (e.g. {adapted}); load it onto "
            "a fresh base model"
        )


def _check_architecture(expected: dict[str, Any], model: nn.Module) -> None:
    actual = architecture_fingerprint(model)
    diff = {k: (v, actual.get(k)) for k, v in expected.items() if actual.get(k) != v}
    if diff:
        details = "; ".join(f"{k}: adapter has {a!r}, model has {b!r}" for k, (a, b) in diff.items())
        raise AdapterLoadError(f"adapter was trained for another architecture ({details})")


def load_adapter(
    base_model: nn.Module, directory: str | Path, *, trainable: bool = False, strict_base: bool = False
) -> nn.Module:
    """Rebuild the adapted model on ``base_model`` (modified in place) with the saved weights.

    Everything is verified before the model changes; if the injected model's tensors do not match the
    file, the injection is undone. ``trainable=False`` leaves every parameter frozen (inference).
    ``base_model`` must be a base model without adapters. A base whose weights differ from the one the
    adapter was trained on (same architecture, e.g. another fine-tune) gives a warning naming both, or
    with ``strict_base=True`` an :class:`AdapterLoadError`.
    """
    directory = Path(directory)
    _check_not_adapted(base_model, directory)
    foreign = next((fmt for fmt in adapter_formats() if fmt.detect(directory)), None)
    if foreign is not None:  # another implementation's format (e.g. the official `mixlora` package)
        model = foreign.load(base_model, directory)
        if not trainable:
            for p in model.parameters():
                p.requires_grad_(False)
        return model
    meta = read_adapter_config(directory)
    _check_architecture(meta["architecture"], base_model)
    tensors = _read_weights(directory, meta)
    _check_base(meta, base_model, directory, strict_base)
    model = inject(base_model, meta["config"])
    try:
        _assign(model, tensors, directory)
    except AdapterLoadError:
        unload(model)
        raise
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _assign(model: nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Copy ``tensors`` into the model's adapter weights after checking names and shapes match exactly."""
    state = trainable_state_dict(model)
    expected = {n: t.shape for n, t in state.items()}
    # an adapter without balance-bias buffers loads with a zero bias (its router as trained)
    tensors = {**{n: torch.zeros_like(t) for n, t in state.items() if n.endswith(OPTIONAL_BUFFERS)}, **tensors}
    # a 0-dim adapter-expert scale is read as shape (1,) (FSDP2 shards no 0-dim tensors)
    tensors = {n: t.reshape(1) if n.endswith(".mixlora_scale") and t.dim() == 0 else t for n, t in tensors.items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(n for n in set(expected) & set(tensors) if tensors[n].shape != expected[n])
    if missing or unexpected or wrong:
        raise AdapterLoadError(
            f"{directory}: tensors do not match the adapter config: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), wrong shape {wrong[:5]} ({len(wrong)})"
        )
    model.load_state_dict(tensors, strict=False)


def verify_adapter(directory: str | Path) -> dict[str, Any]:
    """Check an adapter directory's config and weights file (checksum, readable) without a model;
    returns the parsed config. Raises :class:`AdapterLoadError` naming the damaged file."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    _read_weights(directory, meta)
    return meta


def load_adapter_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a checkpoint's weights into an already adapted model with the same config (resume, best model)."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    saved, current = meta["config"].to_dict(), get_state(model).config.to_dict()
    differing = [f"{k} (checkpoint {saved[k]!r}, model {current[k]!r})" for k in saved if saved[k] != current[k]]
    if differing:
        raise AdapterLoadError(
            f"{directory}: adapter config differs from the model's loramix config in {', '.join(differing)}"
        )
    _assign(model, _read_weights(directory, meta), directory)
    return model
