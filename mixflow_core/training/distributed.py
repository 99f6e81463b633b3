"""Where training runs: device resolution, and the distributed context under torchrun.

`resolve_device` is the one place a device name ("cpu", "cuda", "cuda:N", "auto") becomes a
torch.device; fit, the run directories and the CLI all call it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["resolve_device", "DistContext", "setup_distributed"]


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; a CUDA device must exist. Under torchrun, 'cuda' is this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here; use cpu")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@dataclass(frozen=True)
class DistContext:
    """This process's place in a distributed run (rank, world size); the single-process default is rank 0 of 1."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: torch.device) -> DistContext:
    """Under torchrun (WORLD_SIZE > 1) initialise the process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if device.type == "cuda":  # nccl's object collectives (all_gather_object) and barrier use the current device
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size())
