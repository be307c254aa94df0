"""Data-parallel training through ``torchrun``: one process per GPU (or per CPU slot with gloo), any number of nodes.

``torchrun`` sets RANK, LOCAL_RANK and WORLD_SIZE; :func:`init_distributed` reads them, joins the
process group (NCCL on CUDA, gloo on CPU) and pins the process to its GPU. Without them training
runs as one plain process. Only rank 0 logs to MLflow and writes checkpoints and metrics.

Example (two processes on one CPU machine, two GPUs on each of two nodes)::

    torchrun --standalone --nproc_per_node 2 -m kocr.cli train --data data/prepared --out models/candidate
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 2 --rdzv_endpoint host0:29500 -m kocr.cli train ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """True inside a ``torchrun`` job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_rank() -> int:
    """This process's global rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def init_distributed(device: torch.device) -> DistContext:
    """Join the torchrun process group when launched by torchrun; else a single-process context on ``device``."""
    if not launched_by_torchrun():
        return DistContext(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, local, device)


def all_agree(flag: bool, ctx: DistContext) -> bool:
    """True only when ``flag`` is true on every rank (e.g. 'my loss is finite'), so all ranks take the same branch."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32,
                         device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_flag(flag: bool, ctx: DistContext) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. rank 0 decided to stop early)."""
    if not ctx.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32,
                         device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.broadcast(value, src=0)
    return bool(value.item())


def sum_over_ranks(value: float, ctx: DistContext) -> float:
    """The sum of a number over all ranks (e.g. images seen)."""
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return float(tensor.item())


def gather(value: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not ctx.enabled:
        return [value]
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (after a final barrier)."""
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
