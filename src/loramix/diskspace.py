"""Full disks: one line naming the directory, the bytes needed and the bytes free, instead of a library's
low-level message; and a look at the free space before a long job starts writing.

A full disk shows up in several shapes: ``OSError`` with ``errno.ENOSPC`` (or ``EDQUOT``, a full quota) from
Python's own writes, safetensors' ``SafetensorError`` whose text carries the OS message, and ``torch.save``'s
``RuntimeError`` from its zip writer ("unexpected pos ...", "PytorchStreamWriter failed writing file"), which
names neither the disk nor the path. :func:`is_disk_full` recognises all of them.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull")
"""What the OS message of a full disk or quota says when a library hands it on as text (safetensors)."""
TORCH_WRITER_TEXTS = ("inline_container.cc", "PytorchStreamWriter failed writing")
"""torch.save's zip writer failed: a full disk when the free space is below what the write needed."""


class DiskFullError(OSError):
    """A write failed, or would fail, for lack of disk space. The message is one line naming the directory,
    the bytes needed and the bytes free; ``saved`` is where whatever could still be saved went (or None)."""

    def __init__(self, message: str, *, directory: str | Path, needed: int, free: int,
                 saved: Path | None = None) -> None:
        super().__init__(message)
        self.directory, self.needed, self.free, self.saved = Path(directory), needed, free, saved

    def __str__(self) -> str:
        return str(self.args[0])


def human(n: int) -> str:
    """``123,456,789 bytes (118 MiB)``."""
    size, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    short = f"{n} bytes" if unit == "bytes" else f"{size:.3g} {unit}"
    return f"{n:,} bytes" + ("" if unit == "bytes" else f" ({short})")


def free_bytes(path: str | Path) -> int:
    """Bytes free for this user on the file system that holds ``path`` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def tensor_bytes(tensors: Iterable[torch.Tensor], dtype: torch.dtype | None = None) -> int:
    """Bytes of the tensors' data (stored as ``dtype`` when given)."""
    size = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    return sum(t.numel() * (size or t.element_size()) for t in tensors)


def _chain(error: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(error: BaseException, directory: str | Path | None = None, needed: int | None = None) -> bool:
    """Whether ``error`` (or an error it came from) says the disk or the quota is full. torch.save's writer
    error counts when the file system of ``directory`` has less than ``needed`` bytes free."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return True
        text = str(e)
        if any(t in text for t in FULL_TEXTS):
            return True
        if directory is not None and any(t in text for t in TORCH_WRITER_TEXTS):
            return free_bytes(directory) < max(needed or 0, 1)
    return False


def full_message(directory: str | Path, needed: int, free: int, what: str, qualifier: str = "") -> str:
    """``<directory>: the disk is full: <what> needs [<qualifier> ]N bytes, M bytes are free``."""
    return f"{directory}: the disk is full: {what} needs {qualifier}{human(needed)}, {human(free)} are free"


def raise_if_disk_full(error: BaseException, directory: str | Path, needed: int, what: str, *,
                       remove: str | Path | None = None, tail: str = "") -> None:
    """Raise a :class:`DiskFullError` (one line, from ``error``) when ``error`` is a full disk, after removing
    ``remove`` (the partial output) so that the free space it reports is what there is to work with; return
    otherwise, for the caller to re-raise ``error``."""
    if not is_disk_full(error, directory, needed):
        return
    if remove is not None and Path(remove).exists():
        shutil.rmtree(remove, ignore_errors=True) if Path(remove).is_dir() else Path(remove).unlink()
    free = free_bytes(directory)
    message = full_message(directory, needed, free, what)
    if remove is not None:
        message += f"; its partial files ({Path(remove).name}) were removed"
    raise DiskFullError(message + tail, directory=directory, needed=needed, free=free) from error


def check_free_space(directory: str | Path, needed: int, what: str, *, wanted: int | None = None,
                     wanted_what: str = "") -> None:
    """Before writing: refuse (``DiskFullError``) when ``directory``'s file system has less than ``needed``
    bytes free; warn when it has less than ``wanted`` (what a whole run may keep at once)."""
    free = free_bytes(directory)
    if free < needed:
        raise DiskFullError(f"{directory}: not enough free disk space: {what} needs about {human(needed)}, "
                            f"{human(free)} are free", directory=directory, needed=needed, free=free)
    if wanted is not None and free < wanted:
        logger.warning("%s: %s needs about %s, %s are free; the run may stop when the disk fills",
                       directory, wanted_what, human(wanted), human(free))
