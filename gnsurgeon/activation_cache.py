"""Calibration's activation cache: which blocks of a model form a chain the cache can follow, how many
bytes caching needs and how many there is room for, and where the cached tensors live.

Why a cache: streamed calibration re-runs each model up to the layer (block) being fitted for every
layer fit and every tuning step, so its cost grows with depth² × images × steps. Block-wise
reconstruction for quantization does not pay that (GPTQ, AIMET AdaRound, BRECQ): it keeps the
inputs at a block boundary, fits the block on them, and pushes them through the fitted block to get
the next block's inputs, which is linear in depth. That is only right where the next block really
reads this block's output, and nothing in a module tree says so; :func:`probe_boundaries` watches
one forward and records, per block, whether its input *is* the previous block's output (the same
tensor object, not modified in place in between), and whether the block, run alone on the input it
received, gives the output it gave (a cache that silently differs would ruin calibration quietly).

Memory is the other half: the cache holds images × (a block's input + output) × 2 models. AIMET
checks that against a fraction of the free memory and re-runs the prefix when it does not fit;
here the ladder is float32 in memory, float16 in memory, memory-mapped files in a temporary folder
(removed on exit, error or Ctrl-C), and only then streaming (:func:`choose_cache`).

Stage: calibration (the cache under calibration.py). It imports: errors, hooks.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import GNSurgeonError, first_line
from .hooks import Call, detached_clone, registered

try:  # ru_maxrss: Unix only
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

__all__ = [
    "ActivationStore",
    "Boundary",
    "CACHE_MODES",
    "CacheChoice",
    "Room",
    "budget_bytes",
    "cache_bytes_needed",
    "cache_rooms",
    "choose_cache",
    "free_disk_bytes",
    "free_memory_bytes",
    "open_store",
    "peak_memory",
    "probe_boundaries",
]

CACHE_MODES = ("auto", "off", "ram", "disk")
DISK_FRACTION = 0.5  # of the free space in the temporary folder
HOST_FRACTION = 0.5  # of the free RAM, when the cache spills off a GPU
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e\d+)?)\s*(%|[kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


# ---------------------------------------------------------------- budgets


def budget_bytes(spec: int | str, free: int, option: str = "--calib-cache-mem") -> int:
    """Bytes allowed by ``spec``: a byte count (``8000000000``, ``"8G"``, ``"512MiB"``: powers of
    1024) or a share of the ``free`` bytes (``"50%"``); a malformed ``spec`` is an error naming
    ``option``."""
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise GNSurgeonError(f"{option} {spec!r} is not a size such as 8G, 512M or 50%")
    if isinstance(spec, int):
        if spec < 0:
            raise GNSurgeonError(f"{option} {spec} is negative")
        return spec
    match = _SIZE.match(spec)
    if not match:
        raise GNSurgeonError(f"{option} {spec!r} is not a size such as 8G, 512M or 50%")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        if number > 100:
            raise GNSurgeonError(f"{option} {spec!r} is more than 100% of the free memory")
        return int(free * number / 100)
    return int(number * _UNITS[unit])


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where ``device`` computes: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - neither Linux nor POSIX
        return 0


def free_disk_bytes(directory: str) -> int:
    """Free bytes on the file system holding ``directory`` (where a disk cache would go)."""
    return shutil.disk_usage(directory).free


def peak_memory(device: torch.device) -> dict[str, float]:
    """The process's peak resident memory so far (MiB; ru_maxrss, for the whole process, not just
    calibration), and on CUDA the peak GPU memory torch allocated."""
    peak: dict[str, float] = {}
    if resource is not None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        peak["peak_rss_mb"] = round(rss / 2**20 if sys.platform == "darwin" else rss / 2**10, 1)
    if device.type == "cuda":
        peak["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


@dataclass(frozen=True)
class Room:
    """One place the cache may go, with the bytes it may take there."""

    mode: str  # "ram" (memory of ``device``) or "disk"
    device: torch.device  # where cached tensors live (files are read back to the host)
    budget: int


def cache_rooms(memory_spec: int | str, device: torch.device) -> list[Room]:
    """Where a cache may go, best first: the calibration device's memory (the GPU's on CUDA, under
    ``memory_spec``), then on CUDA the host's RAM, then a temporary folder on disk."""
    cpu = torch.device("cpu")
    rooms = [Room("ram", device, budget_bytes(memory_spec, free_memory_bytes(device)))]
    if device.type == "cuda":
        rooms.append(Room("ram", cpu, int(HOST_FRACTION * free_memory_bytes(cpu))))
    rooms.append(Room("disk", cpu, int(DISK_FRACTION * free_disk_bytes(tempfile.gettempdir()))))
    return rooms


@dataclass(frozen=True)
class CacheChoice:
    """Where calibration keeps its block-boundary activations, and why there."""

    mode: str  # "ram", "disk" or "off" (streaming)
    device: torch.device | None = None  # where the cached tensors live ("disk": read back to the CPU)
    dtype: torch.dtype | None = None  # float16 halves the bytes of float32 activations
    needed: int = 0  # bytes the cache needs at float32
    budget: int = 0  # bytes allowed where it went (for "off": the memory budget)
    reason: str = ""

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "device": str(self.device) if self.device is not None and self.mode == "ram" else None,
            "dtype": str(self.dtype).removeprefix("torch.") if self.dtype is not None else None,
            "bytes_needed_fp32": self.needed,
            "budget_bytes": self.budget,
            "reason": self.reason,
        }


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def choose_cache(forced: str, needed: int, rooms: list[Room], unusable: str = "") -> CacheChoice:
    """The first of float32 then float16 in each of ``rooms`` (in order) where ``needed`` bytes (at
    float32) fit; ``forced`` ("ram"/"disk") limits the rooms and, when none fits, takes the last of
    them at float16 anyway; "off", no room, or a cache the model cannot use (``unusable`` says why):
    streaming."""
    if forced not in CACHE_MODES:
        raise GNSurgeonError(f"calibration cache mode {forced!r} is not one of {', '.join(CACHE_MODES)}")
    memory = rooms[0].budget if rooms else 0
    if forced == "off":
        return CacheChoice("off", needed=needed, budget=memory, reason="streaming: the cache is off")
    if unusable:
        return CacheChoice("off", needed=needed, budget=memory, reason=f"streaming: {unusable}")
    allowed = [r for r in rooms if forced == "auto" or r.mode == forced]
    for room in allowed:
        for dtype, size in ((torch.float32, needed), (torch.float16, math.ceil(needed / 2))):
            if size <= room.budget:
                return CacheChoice(room.mode, room.device, dtype, needed, room.budget, _why(room, dtype, needed))
    if forced != "auto" and allowed:
        room = allowed[-1]
        why = f"forced {forced}, float16: {_gb(needed)} at float32, over the {_gb(room.budget)} budget"
        return CacheChoice(room.mode, room.device, torch.float16, needed, room.budget, why)
    budgets = ", ".join(f"{r.mode} {_gb(r.budget)}" for r in rooms)
    why = f"streaming: {_gb(needed)} fit no budget ({budgets})"
    return CacheChoice("off", needed=needed, budget=memory, reason=why)


def _why(room: Room, dtype: torch.dtype, needed: int) -> str:
    where = f"{room.device} memory" if room.mode == "ram" else "memory-mapped files in a temporary folder"
    if dtype == torch.float16:
        return f"float16 in {where}: {_gb(needed)} at float32 is over the {_gb(room.budget)} budget"
    return f"float32 in {where}: {_gb(needed)} within the {_gb(room.budget)} budget"


# ---------------------------------------------------------------- the store


@dataclass
class _Stored:
    """One cached tensor: kept as ``tensor``, or in the .npy file at ``path``; ``dtype`` is the
    tensor's own (float16 storage is cast back on reading)."""

    dtype: torch.dtype
    nbytes: int
    tensor: torch.Tensor | None = None
    path: Path | None = None


@dataclass
class ActivationStore:
    """Tensors put aside between passes, where a :class:`CacheChoice` says: in memory at its dtype, or
    as memory-mapped .npy files in ``directory``. Every read comes back on ``device`` in the tensor's
    own dtype; ``held`` and ``peak`` count the bytes stored."""

    choice: CacheChoice
    device: torch.device  # where calibration computes: every read lands here
    directory: Path | None = None
    held: int = 0
    peak: int = 0
    files: int = field(default=0, repr=False)

    def put(self, value: Any) -> Any:
        """``value`` (tensors, nested in tuples/lists/dicts) with each tensor stored; keep the result
        and hand it to :meth:`get` / :meth:`drop`."""
        return tree_map(lambda t: self._put(t) if isinstance(t, torch.Tensor) else t, value)

    def get(self, stored: Any, copy: bool = True) -> Any:
        """The stored value back on the compute device. ``copy``: every tensor is the caller's own
        (a block that works in place cannot corrupt the cache); without it a read may share memory
        with the cache (for read-only uses such as targets)."""
        return tree_map(lambda s: self._get(s, copy) if isinstance(s, _Stored) else s, stored)

    def drop(self, stored: Any) -> None:
        """Free what :meth:`put` stored (files are deleted)."""
        for leaf in tree_flatten(stored)[0]:
            if isinstance(leaf, _Stored):
                self.held -= leaf.nbytes
                if leaf.path is not None:
                    leaf.path.unlink(missing_ok=True)
                leaf.tensor = leaf.path = None

    def _put(self, t: torch.Tensor) -> _Stored:
        kept = t.detach()
        if kept.is_floating_point() and self.choice.dtype is not None:
            kept = kept.to(self.choice.dtype)
        nbytes = kept.numel() * kept.element_size()
        self.held += nbytes
        self.peak = max(self.peak, self.held)
        if self.directory is None:
            return _Stored(t.dtype, nbytes, tensor=kept.to(self.choice.device))
        if kept.dtype == torch.bfloat16:  # numpy has no bfloat16
            kept = kept.float()
        self.files += 1
        path = self.directory / f"{self.files:07d}.npy"
        np.save(path, kept.cpu().numpy())
        return _Stored(t.dtype, nbytes, path=path)

    def _get(self, stored: _Stored, copy: bool) -> torch.Tensor:
        if stored.path is not None:
            source = torch.from_numpy(np.load(stored.path, mmap_mode="c"))  # copy-on-write: the file stays
        elif stored.tensor is not None:
            source = stored.tensor
        else:
            raise GNSurgeonError("a calibration cache entry was read after it was dropped")
        out = source.to(self.device, stored.dtype)
        return out.clone() if copy and out.data_ptr() == source.data_ptr() else out


@contextlib.contextmanager
def open_store(choice: CacheChoice, device: torch.device) -> Iterator[ActivationStore | None]:
    """The store for ``choice`` (None when streaming). A disk cache lives in a temporary folder that
    is removed on leaving, whether the calibration finished, raised or was interrupted (Ctrl-C)."""
    if choice.mode == "off":
        yield None
    elif choice.mode == "disk":
        with tempfile.TemporaryDirectory(prefix="gnsurgeon-calib-cache-", ignore_cleanup_errors=True) as folder:
            yield ActivationStore(choice, device, Path(folder))
    else:
        yield ActivationStore(choice, device)


# ---------------------------------------------------------------- the probe


@dataclass
class Boundary:
    """What one watched forward showed about one block: whether it ran, whether its input is exactly
    the previous block's output (then the cache can follow the chain) or exactly the previous
    block's input (branches reading one tensor, as in Inception), the bytes per image at its input
    and output, and why the cache cannot stand in for it ("" when it can)."""

    path: str
    calls: int = 0
    follows: bool = False
    shares: bool = False
    in_bytes: int = 0
    out_bytes: int = 0
    unusable: str = ""


@dataclass
class _Seen:
    """The raw records of one block's first call during the probe (kept alive, so ids stay unique)."""

    call: Call | None = None  # cloned arguments, to replay the block alone
    raw_inputs: tuple = ()  # (the argument leaves, their structure, the tensors' version counters)
    output: Any = None  # cloned output
    raw_output: Any = None
    version: int = -1  # the output tensor's in-place version counter when the block returned it
    start: int = 0
    end: int = 0


def probe_boundaries(model: nn.Module, blocks: list[tuple[str, list[str]]], x: torch.Tensor) -> list[Boundary]:
    """Watch one forward of ``model`` on ``x`` (a small batch) and describe each of ``blocks`` (block
    path, its layer paths; in execution order) as a :class:`Boundary`.

    A block *follows* when it is called once, with the previous block's output (called once too) as
    its only argument, the very tensor object, unmodified since (its version counter unchanged); it
    *shares* the previous block's input when its arguments are the very objects that block received,
    unmodified since. A block is *unusable* for the cache when run alone on its recorded input it does not give its
    recorded output, or when one of its layers first runs outside the block's first call.
    """
    bounds = [Boundary(path) for path, _ in blocks]
    seen = [_Seen() for _ in blocks]
    layer_event: dict[str, int] = {}
    clock = iter(range(1, 2**62))
    handles = []
    for k, (path, layers) in enumerate(blocks):
        module = model.get_submodule(path)
        handles.append(module.register_forward_pre_hook(_on_enter(k, bounds, seen, clock), with_kwargs=True))
        handles.append(module.register_forward_hook(_on_leave(k, bounds, seen, clock), with_kwargs=True))
        for layer in layers:
            handles.append(model.get_submodule(layer).register_forward_pre_hook(_on_layer(layer, layer_event, clock)))
    with registered(handles), torch.no_grad():
        model(x)
    images = max(1, len(x))
    for k, (path, layers) in enumerate(blocks):
        bound, rec = bounds[k], seen[k]
        if not bound.calls:
            continue
        once = bound.calls == 1 and bounds[k - 1].calls == 1
        bound.follows, bound.shares = bound.follows and once, bound.shares and once and not bound.follows
        bound.in_bytes = _tensor_bytes((rec.call.args, rec.call.kwargs)) // images
        bound.out_bytes = _tensor_bytes(rec.output) // images
        bound.unusable = _outside(layers, layer_event, rec) or _replay_differs(model.get_submodule(path), rec)
        if bound.unusable:
            bound.unusable = f"block {path!r} {bound.unusable}"
    return bounds


def _on_enter(k: int, bounds: list[Boundary], seen: list[_Seen], clock: Iterator[int]):
    def hook(_module, args, kwargs):
        event = next(clock)
        bounds[k].calls += 1
        if bounds[k].calls > 1:
            return
        rec = seen[k]
        leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
        versions = [t._version if isinstance(t, torch.Tensor) else None for t in leaves]
        rec.start, rec.raw_inputs = event, (leaves, spec, versions)
        rec.call = Call(detached_clone(tuple(args)), detached_clone(dict(kwargs)))
        if k > 0:
            prev = seen[k - 1]
            only_arg = len(args) == 1 and not tree_flatten(kwargs)[0]
            same = only_arg and prev.raw_output is not None and args[0] is prev.raw_output
            bounds[k].follows = same and isinstance(args[0], torch.Tensor) and args[0]._version == prev.version
            bounds[k].shares = _same_objects(prev.raw_inputs, rec.raw_inputs)

    return hook


def _same_objects(before: tuple, now: tuple) -> bool:
    """Whether two recorded argument lists are the very same objects, tensors unmodified in between."""
    if not before or before[1] != now[1] or not any(isinstance(t, torch.Tensor) for t in now[0]):
        return False
    pairs = zip(before[0], now[0], before[2], now[2], strict=True)
    return all(a is b and (va is None or va == vb) for a, b, va, vb in pairs)


def _on_leave(k: int, bounds: list[Boundary], seen: list[_Seen], clock: Iterator[int]):
    def hook(_module, _args, _kwargs, output):
        event = next(clock)
        rec = seen[k]
        if rec.end:
            return
        rec.end, rec.raw_output, rec.output = event, output, detached_clone(output)
        rec.version = output._version if isinstance(output, torch.Tensor) else -1

    return hook


def _on_layer(path: str, layer_event: dict[str, int], clock: Iterator[int]):
    def hook(_module, _args):
        layer_event.setdefault(path, next(clock))

    return hook


def _outside(layers: list[str], layer_event: dict[str, int], rec: _Seen) -> str:
    for layer in layers:
        event = layer_event.get(layer)
        if event is not None and not rec.start < event < rec.end:
            return f"runs its layer {layer!r} outside its own forward"
    return ""


def _replay_differs(module: nn.Module, rec: _Seen) -> str:
    """Why ``module`` run alone on its recorded arguments does not reproduce its recorded output ("" if it does)."""
    try:
        with torch.no_grad():
            again = module(*detached_clone(rec.call.args), **detached_clone(rec.call.kwargs))
    except Exception as exc:  # a block that only works inside its model's forward
        return f"fails when run alone on its recorded input ({first_line(exc)})"
    want, want_spec = tree_flatten(rec.output)
    got, got_spec = tree_flatten(again)
    if want_spec != got_spec:
        return "returns a different structure when run alone on its recorded input"
    for a, b in zip(want, got, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return "returns a different structure when run alone on its recorded input"
        if isinstance(a, torch.Tensor):
            scale = a.detach().abs().max().item() if a.numel() and a.is_floating_point() else 1.0
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-30)):
                return "gives a different output when run alone on its recorded input"
    return ""


def _tensor_bytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))


def cache_bytes_needed(bounds: list[Boundary], images: int) -> int:
    """Bytes a float32 cache needs for ``images`` images: at most one block's input and output for
    each of the two models are live at once (student input, teacher input or output, student
    output), so 2 × (input + output) of the largest block."""
    live = max((2 * (b.in_bytes + b.out_bytes) for b in bounds if b.calls), default=0)
    return images * live
