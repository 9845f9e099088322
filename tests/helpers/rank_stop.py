"""A worker of tests/test_train.py: two gloo processes agree on a stop request that reached one of them."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
import torch.distributed as dist


def stop_flags_of_two_ranks(rank: int, out: str) -> None:
    """Step 1 ends with no signal anywhere; before step 2 ends, process 1 alone gets SIGTERM. Writes what each
    process agreed at each step end to ``out/rank<r>.json``."""
    from loramix.stopping import StopSignals

    dist.init_process_group("gloo", init_method=f"file://{Path(out) / 'rendezvous'}", rank=rank, world_size=2)
    stop = StopSignals()
    before = stop.agreed(torch.device("cpu"))
    if rank == 1:
        stop.handle(signal.SIGTERM)  # as the signal handler does
    after = stop.agreed(torch.device("cpu"))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"before": before, "after": after}))
    dist.destroy_process_group()
