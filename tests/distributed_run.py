"""One rank of a multi-process training run, for tests/test_distributed.py.

``trainer`` (under ``accelerate launch``) trains through ``loramix.train.train`` with the options given as JSON
(``--options``) and writes, per rank, ``<output_dir>/rank_counts/rank<i>.json``: the tokens each expert of each
MoE layer received on this rank over the training forwards, and whether the model was sharded (FSDP).

``loop`` (under ``torchrun``, gloo) trains a tiny in-process Llama with a plain loop wrapped in torch DDP or FSDP2
(``fully_shard`` per decoder layer and at the root), each rank on its own batches, and writes
``<out>/<mode>_rank<i>.json`` (tokens per expert, losses) and ``<out>/<mode>_rank<i>.safetensors`` (the full
adapter weights, gathered from the shards on every rank with ``loramix.checkpoint.trainable_state_dict``).

In both, ``--starve-rank R --starve-expert E`` makes rank R's routers never pick expert E (its selection score
gets -1e4; the weights stay the same on every rank), so that expert receives no token there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from loramix.injection import get_state
from loramix.losses import tokens_per_expert
from loramix.routers import update_balance_biases


def starve(model: torch.nn.Module, expert: int) -> None:
    """Make every router of ``model`` never select ``expert`` (selection only: weights and mixing unchanged)."""
    for layer in get_state(model).moe_layers.values():
        router = layer.mixlora_router
        plain = router.selection_scores
        bias = torch.zeros(layer.num_experts)
        bias[expert] = -1e4
        router.selection_scores = lambda logits, plain=plain, bias=bias: plain(logits) + bias.to(logits)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the model's parameters are FSDP shards (DTensor: FSDP2; FlatParameter / FSDP modules: FSDP1)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or type(p).__name__ == "FlatParameter" for p in model.parameters()) or any(
        type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()
    )


class RankCounts(TrainerCallback):
    """Count this rank's tokens per expert in training forwards; starve one expert on one rank."""

    def __init__(self, out: Path, starve_rank: int | None, starve_expert: int) -> None:
        self.out, self.starve_rank, self.starve_expert = out, starve_rank, starve_expert
        self.counts: dict[str, torch.Tensor] = {}
        self.rank = 0
        self.sharded = False
        self.distributed_type = "unknown"

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        self.rank = args.process_index
        self.sharded = is_sharded(model)
        self.distributed_type = str(args.distributed_state.distributed_type)
        for name, layer in get_state(model).moe_layers.items():
            self.counts[name] = torch.zeros(layer.num_experts, dtype=torch.long)
            layer.register_forward_hook(self._counter(name))
        if self.rank == self.starve_rank:
            starve(model, self.starve_expert)

    def _counter(self, name: str):
        def hook(module, args, output):  # noqa: ANN001
            r = module.last_routing
            if module.training and r is not None:
                self.counts[name] += tokens_per_expert(r.indices, r.mask, module.num_experts).detach().cpu()

        return hook

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
        folder = self.out / "rank_counts"
        folder.mkdir(parents=True, exist_ok=True)
        counts = {name: c.tolist() for name, c in self.counts.items()}
        report = {"counts": counts, "sharded": self.sharded, "distributed_type": self.distributed_type}
        (folder / f"rank{self.rank}.json").write_text(json.dumps(report))


class TermAt(TrainerCallback):
    """Send SIGTERM to this process alone when step ``step`` begins on rank ``rank`` (a signal that reached
    one process only, or reached it a step before the others)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        import os
        import signal

        if args.process_index == self.rank and state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def full_disk_at(step: int) -> None:
    """torch.save in this process fails as on a full disk for the files of checkpoint ``step``."""
    import errno

    real = torch.save

    def save(obj, f, *args, **kwargs):  # noqa: ANN001
        if f".tmp-checkpoint-{step}" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *args, **kwargs)

    torch.save = save


def run_trainer(args: argparse.Namespace) -> None:
    import os

    from loramix.train import train

    if args.full_disk_rank is not None and os.environ.get("RANK") == str(args.full_disk_rank):
        full_disk_at(args.full_disk_step)
    options = json.loads(args.options)
    counter = RankCounts(Path(options["output_dir"]), args.starve_rank, args.starve_expert)
    callbacks = [counter] + ([TermAt(args.term_rank, args.term_step)] if args.term_rank is not None else [])
    summary = train(callbacks=callbacks, **options)
    rank = counter.rank
    (Path(options["output_dir"]) / "rank_counts" / f"summary{rank}.json").write_text(json.dumps(
        {k: summary[k] for k in ("steps", "interrupted", "stop_signal")}))


def run_loop(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    import loramix
    from helpers.tiny_models import tiny_model
    from loramix.checkpoint import trainable_state_dict

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = loramix.inject(tiny_model("llama", seed=0), loramix.MixLoraConfig(
        num_experts=4, top_k=2, r=4, attn_r=4, dropout=0.0, attn_dropout=0.0, expert_type=args.expert_type))
    model.train()
    layers = get_state(model).moe_layers
    counts = {name: torch.zeros(layer.num_experts, dtype=torch.long) for name, layer in layers.items()}
    if rank == args.starve_rank:
        starve(model, args.starve_expert)
    if args.mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    elif args.mode == "fsdp1":
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={type(model.model.layers[0])})
        wrapped = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True,
                                           device_id=torch.device("cpu"))
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(args.steps):
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(100 * step + rank))
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        update_balance_biases(list(layers.values()))  # as the Trainer does at every step end
        losses.append(float(loss.detach()))
        for name, layer in layers.items():
            r = layer.last_routing
            counts[name] += tokens_per_expert(r.indices, r.mask, layer.num_experts)
    tensors = trainable_state_dict(model)  # every rank: gathers FSDP shards
    out = Path(args.out)
    if rank == 0:  # as loramix.train saves the adapter: on the main process, from the gathered tensors
        loramix.save_adapter(model, out / f"{args.mode}_adapter", tensors)
    dist.barrier()
    save_file({n: t.contiguous() for n, t in tensors.items()}, out / f"{args.mode}_rank{rank}.safetensors")
    report = {"counts": {n: c.tolist() for n, c in counts.items()}, "losses": losses, "sharded": is_sharded(model)}
    (out / f"{args.mode}_rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["trainer", "loop"])
    parser.add_argument("--options", help="trainer: JSON object of loramix.train.train options")
    parser.add_argument("--mode", choices=["ddp", "fsdp1", "fsdp2"], default="ddp", help="loop: the wrapper")
    parser.add_argument("--expert-type", default="mixlora", help="loop: MixLoraConfig.expert_type")
    parser.add_argument("--steps", type=int, default=4, help="loop: optimiser steps")
    parser.add_argument("--out", help="loop: output folder")
    parser.add_argument("--starve-rank", type=int, default=None)
    parser.add_argument("--starve-expert", type=int, default=0)
    parser.add_argument("--term-rank", type=int, default=None, help="trainer: this rank alone gets SIGTERM ...")
    parser.add_argument("--term-step", type=int, default=2, help="trainer: ... during this step")
    parser.add_argument("--full-disk-rank", type=int, default=None, help="trainer: torch.save fails on this rank ...")
    parser.add_argument("--full-disk-step", type=int, default=2, help="trainer: ... for this checkpoint's files")
    args = parser.parse_args()
    run_trainer(args) if args.command == "trainer" else run_loop(args)


if __name__ == "__main__":
    main()
