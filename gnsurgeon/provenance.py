"""Files a checkpoint's history names, recorded so they can be found again, and only opened if safe.

A convert entry in ``gnsurgeon.history`` names the weights file the BN original came from, and
``finetune --teacher source`` opens it again to distil from. As given on the command line the path
is relative to wherever convert ran, so the teacher was found only from that directory. New
checkpoints therefore also record ``weights_file``: the path relative to the checkpoint's own
folder, which holds wherever the command runs and when the folder moves with its weights. A
history carried into another checkpoint (fine-tuning, converting a checkpoint further) is rebased
to that checkpoint's folder (:func:`rebase_history`).

A checkpoint is input, and its metadata can name any path (``/etc/passwd``): a recorded file is
opened only when it is a regular file with a weights suffix (:data:`WEIGHTS_SUFFIXES`), its own
name and the name it resolves to (a symlink) alike; anything else is refused in one sentence.

Old checkpoints (only ``weights``, as given) stay readable: an absolute path is taken as it is, a
relative one is looked for next to the checkpoint, then in the current directory (where the old
reading looked).

Stage: a leaf utility. It imports only :mod:`gnsurgeon.errors`.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import GNSurgeonError

__all__ = ["WEIGHTS_SUFFIXES", "rebase_history", "recorded_weights", "relative_to_checkpoint"]

WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def relative_to_checkpoint(path: str | Path, checkpoint: str | Path) -> str:
    """``path`` relative to the folder of ``checkpoint`` (both may not exist yet), POSIX-style."""
    folder = Path(os.path.abspath(checkpoint)).parent
    return Path(os.path.relpath(os.path.abspath(path), folder)).as_posix()


def rebase_history(history: list, old: str | Path, new: str | Path) -> list:
    """``history`` (read from checkpoint ``old``) for checkpoint ``new``: every ``weights_file``
    rewritten relative to ``new``'s folder. Entries are copied, never changed in place."""
    old_folder = Path(os.path.abspath(old)).parent
    out = []
    for entry in history:
        if isinstance(entry, dict) and isinstance(entry.get("weights_file"), str):
            entry = {**entry, "weights_file": relative_to_checkpoint(old_folder / entry["weights_file"], new)}
        out.append(entry)
    return out


def _candidates(entry: dict, checkpoint: Path) -> list[Path]:
    folder = Path(os.path.abspath(checkpoint)).parent
    if isinstance(entry.get("weights_file"), str):
        return [folder / entry["weights_file"]]
    given = Path(str(entry["weights"]))
    return [given] if given.is_absolute() else [folder / given, Path.cwd() / given]


def recorded_weights(entry: dict, checkpoint: str | Path, what: str) -> Path:
    """The weights file a history ``entry`` of ``checkpoint`` names, found as this module describes;
    a :class:`GNSurgeonError` naming ``what`` (e.g. ``--teacher source``) when it is not a weights
    file or cannot be found."""
    checkpoint = Path(checkpoint)
    recorded = entry.get("weights_file") or entry.get("weights")
    for path in _candidates(entry, checkpoint):
        names = {path.suffix.lower(), Path(os.path.realpath(path)).suffix.lower()}
        if not names <= set(WEIGHTS_SUFFIXES):
            raise GNSurgeonError(
                f"{what}: checkpoint {checkpoint} records weights {recorded!r}, which is not a weights file "
                f"({', '.join(WEIGHTS_SUFFIXES)}); pass --teacher-weights FILE"
            )
        if path.is_file():
            return path
        if path.exists():
            raise GNSurgeonError(
                f"{what}: {path}, recorded in checkpoint {checkpoint}, is not a regular file; "
                "pass --teacher-weights FILE"
            )
    looked = " or ".join(str(p) for p in _candidates(entry, checkpoint))
    raise GNSurgeonError(
        f"{what}: the weights checkpoint {checkpoint} was converted from ({recorded}) are not at {looked}; "
        "pass --teacher-weights FILE"
    )
