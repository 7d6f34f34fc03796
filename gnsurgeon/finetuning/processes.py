"""Where a fine-tuning process runs: its place in a torchrun job, its device, and the two device
mechanics every forward needs (moving a batch there, autocast).

The same entry point runs alone or under ``torchrun`` (gloo on CPU, NCCL on GPU). Everything that
differs between the two is here: sums and gathers are no-ops for one process, so the trainer and
the evaluation are written once for both.

Stage: finetune's runtime. It imports torch (distributed) and :mod:`gnsurgeon.devices`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..devices import resolve_device

__all__ = ["Processes", "autocast", "setup_processes", "to_device"]


@dataclass
class Processes:
    """This process's place in a torchrun job (rank 0 of 1 when launched plainly)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over all processes (float64, so counts stay exact)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """``obj`` from every process, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this run created it (a caller's own group is left alone)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_processes(device: str) -> Processes:
    """Join the torchrun job when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU); else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(device=resolve_device(device))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank=local_rank)
    owns = False
    if not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
        owns = True
    return Processes(dist.get_rank(), dist.get_world_size(), resolved, owns)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; nothing when AMP is off."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch on ``device``; with ``channels_last``, images (N, C, H, W) in channels_last and clips
    (N, C, T, H, W) in channels_last_3d (the 2-d format raises on a 5-d tensor)."""
    images = images.to(device, non_blocking=True)
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    if not channels_last or images.dim() not in formats:
        return images
    return images.contiguous(memory_format=formats[images.dim()])
