"""Which torch device a stage runs on, resolved once: ``auto`` means CUDA when present, else CPU.

Stage: a leaf utility. It imports only torch and :mod:`gnsurgeon.errors`.
"""

from __future__ import annotations

import torch

from .errors import GNSurgeonError

__all__ = ["resolve_device"]


def resolve_device(name: str, option: str = "--device", local_rank: int | None = None) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> a torch device; a bad name, or CUDA asked for
    where there is none, is a one-sentence error naming ``option``. Under torchrun (``local_rank``
    given) a CUDA device is the process's own GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise GNSurgeonError(f"{option} {name!r} is not a torch device (auto, cpu, cuda, cuda:0)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GNSurgeonError(f"{option} {name} but no CUDA device is available (use {option} cpu)")
        if local_rank is not None:  # torchrun: one GPU per local process
            return torch.device("cuda", local_rank)
    return device
