"""Stopping a run by signal: the first Ctrl-C (SIGINT) or SIGTERM asks for a stop after the current step, a
second one aborts; the processes of a distributed run agree on the request (``any_rank_max``).

Kept free of transformers so that it loads fast; ``loramix.train.InterruptCallback`` puts it into the Trainer.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Signals that stop a run after the current step with a checkpoint: Ctrl-C and a scheduler's preemption."""
REPEAT_WINDOW_S = 2.0
"""A SIGTERM repeated within this many seconds of the first counts as the same request (a launcher such as
``accelerate launch`` / torchrun passes on the SIGTERM that the scheduler may have sent to every process)."""


class StopAborted(KeyboardInterrupt):
    """A second stop signal: the run ends at once, without a checkpoint of the current step."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def any_rank_max(value: int, device: Any) -> int:
    """The largest ``value`` over every process of a distributed run (``value`` itself in a single process):
    every rank must call it at the same point."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    flag = torch.tensor([value], dtype=torch.int64, device=device)  # (1,)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


class StopSignals:
    """Handlers for SIGINT and SIGTERM: the first records the request (``received``), a second raises
    :class:`StopAborted`, except a SIGTERM within ``REPEAT_WINDOW_S`` of a first SIGTERM."""

    def __init__(self) -> None:
        self.received = 0  # the first stop signal this process received (0: none)
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any = None) -> None:
        if self.received:
            if signum == self.received == signal.SIGTERM and time.monotonic() - self._first_at < REPEAT_WINDOW_S:
                return  # the same preemption, passed on once more by a launcher
            raise StopAborted(signum)
        self.received, self._first_at = signum, time.monotonic()
        what = "Interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{what}: saving a checkpoint after this step (Ctrl-C or SIGTERM again to abort)", flush=True)

    def install(self) -> None:
        """Set the handlers (from the main thread only; elsewhere signals keep their handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self.handle)

    def restore(self) -> None:
        """Put back the handlers that were set before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def agreed(self, device: Any) -> int:
        """The signal any process received (the largest number; 0: none). Every process must call it."""
        return any_rank_max(self.received, device)
