"""Where a process sits in a torchrun job, and the collectives every training run needs.

Outside torchrun every function here is a no-op (rank 0 of 1), so one code path serves both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import default_device


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); a no-op outside torchrun."""
    base = torch.device(device) if device else default_device()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(), base
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if base.type == "cuda":
        base = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(base)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if base.type == "cuda" else "gloo")
    return info, base


def leave_distributed() -> None:
    """Leave the process group (torchrun); harmless otherwise."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over the ranks of a torchrun job (every rank must call this); unchanged when alone."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values = values / dist.get_world_size()
    return values


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the parameters' gradients over ranks: one all-reduce of them all, flattened (cheap for the
    few trainable weights of adapters, with none of DDP's hooks)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = mean_over_ranks(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


def parallelize(model: torch.nn.Module, info: DistInfo, device: torch.device, fsdp: bool = False
                ) -> torch.nn.Module:
    """The module a training step calls under torchrun: `model` sharded in place with FSDP2 (block by
    block, then the whole), or wrapped in DDP (replicated weights); `model` itself when alone."""
    if info.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(model, "layers", ()):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
