"""Counting what a step costs on an accelerator without one: aten ops (each a kernel launch on a GPU) and the
ops that make the host wait for the device (a host sync), recorded with a ``TorchDispatchMode``.

    with OpCounter() as ops:
        model(**batch).loss.backward()
    ops.total, ops.syncs  # e.g. 1557, {} ; ops.counts is a Counter of every aten op

Views and metadata ops (``view``, ``t``, ``expand``, ...) launch no kernel; :attr:`OpCounter.kernels` leaves
them out.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

# ops whose result the host must read (a device -> host copy that blocks until the queue drains)
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "item", "masked_select", "unique", "_unique2",
                      "unique_consecutive", "repeat_interleave.Tensor", "bincount"})


def _name(func: Any) -> str:
    """``aten.view.default`` -> ``view``; overloads other than ``default`` keep their suffix."""
    packet, overload = func._schema.name.split("::")[-1], func._overloadname
    return packet if overload == "default" else f"{packet}.{overload}"


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside the ``with`` block (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.counts[_name(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def kernels(self) -> int:
        """Ops that launch work: every op but views and metadata-only ones."""
        return sum(n for name, n in self.counts.items() if not _is_view(name))

    @property
    def syncs(self) -> dict[str, int]:
        """The ops that force a host sync, with their counts ({} when there are none)."""
        return {name: n for name, n in self.counts.items() if name.split(".")[0] in SYNC_OPS or name in SYNC_OPS}


_VIEW_OPS = frozenset({"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
                       "select", "slice", "as_strided", "alias", "detach", "reshape", "split", "split_with_sizes",
                       "unbind", "_reshape_alias", "view_as", "narrow", "diagonal", "unfold", "lift_fresh"})


def _is_view(name: str) -> bool:
    return name.split(".")[0] in _VIEW_OPS
