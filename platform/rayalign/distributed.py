"""The training worker group's collectives, on the device its process group requires.

NCCL (GPU workers) takes CUDA tensors only; a CPU tensor fails with "No backend
type associated with device type cpu". gloo (CPU workers) takes CPU tensors.
Everything a worker all-reduces goes through :class:`Collective`, which puts the
tensor on the process group's device first, so metrics computed anywhere can be
reduced under either backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def backend_device(backend: str, compute_device: torch.device) -> torch.device:
    """The device a tensor must be on for a collective of ``backend``.

    NCCL: the worker's own accelerator (the device it computes on). Any other backend
    (gloo, mpi): the CPU.
    """
    if backend == "nccl":
        if compute_device.type == "cpu":
            raise ValueError("the NCCL backend needs a CUDA device, but this worker computes on the CPU")
        return compute_device
    return torch.device("cpu")


@dataclass(frozen=True)
class Collective:
    """Collectives of the current ``torch.distributed`` process group, on ``device``."""

    device: torch.device

    @classmethod
    def of_worker_group(cls, compute_device: torch.device | str) -> Collective:
        """For the initialized process group (Ray Train set it up) of a worker computing on ``compute_device``."""
        import torch.distributed as dist

        return cls(backend_device(dist.get_backend(), torch.device(compute_device)))

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over every worker; the result lives on the process group's device."""
        import torch.distributed as dist

        on_group_device = tensor.to(self.device)
        dist.all_reduce(on_group_device, op=dist.ReduceOp.SUM)
        return on_group_device

    def all_reduce_max(self, count: int) -> int:
        """The largest of every worker's ``count``."""
        import torch.distributed as dist

        largest = torch.tensor([count], dtype=torch.long, device=self.device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return int(largest.item())
