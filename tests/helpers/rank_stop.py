"""A worker of tests/test_train.py: two gloo processes run InterruptCallback's step end, a signal on one only."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from transformers import TrainerControl


def stop_flags_of_two_ranks(rank: int, out: str) -> None:
    """Step 1 ends with no signal anywhere; before step 2 ends, process 1 alone gets SIGTERM. Writes what
    each process's step end decided (``should_training_stop`` and ``should_save``) to ``out/rank<r>.json``."""
    from loramix.train import InterruptCallback

    dist.init_process_group("gloo", init_method=f"file://{Path(out) / 'rendezvous'}", rank=rank, world_size=2)
    args = SimpleNamespace(world_size=2, device=torch.device("cpu"))
    cb = InterruptCallback()
    control = TrainerControl()
    cb.on_step_end(args, None, control)
    before = [control.should_training_stop, control.should_save]
    if rank == 1:
        cb.handle(signal.SIGTERM)  # as the signal handler does
    cb.on_step_end(args, None, control)
    after = [control.should_training_stop, control.should_save]
    name = signal.Signals(cb.signum).name if cb.signum else None
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"before": before, "after": after, "signal": name}))
    dist.destroy_process_group()
