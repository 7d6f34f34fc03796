"""Output files: checked before any work, written so that nothing the user had is lost.

Every command that writes (``-o``, ``--json``, a ``run`` folder, training state) goes through this
module: :func:`check_output` runs before the slow work starts, so a typo in a path costs a second,
not a calibration; :func:`write_atomically` writes a temp file next to the target and renames it
over, so a crash, Ctrl-C or a full disk leaves the previous file as it was.

Stage: a leaf utility. It imports only :mod:`gnsurgeon.errors`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import GNSurgeonError

__all__ = ["check_output", "check_output_dir", "write_atomically", "write_text_atomically"]


def check_output(path: str | Path, suffix: str | None = None, option: str = "output") -> Path:
    """``path`` as a Path, after checking it can be written: right suffix, existing parent folder,
    not a directory. ``option`` names the flag in the one-sentence error (``-o``, ``--json``)."""
    path = Path(path)
    if suffix is not None and path.suffix != suffix:
        raise GNSurgeonError(f"{option} {path} must end in {suffix}")
    if path.is_dir():
        raise GNSurgeonError(f"{option} {path} is a folder, not a file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise GNSurgeonError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise GNSurgeonError(f"{option} {path}: folder {parent} is not writable")
    return path


def check_output_dir(path: str | Path, option: str = "output") -> Path:
    """``path`` as a Path, after checking it can hold a command's outputs (``run -o DIR``): an
    existing writable folder, or a path whose nearest existing ancestor is a writable folder (it is
    created when the work starts, not here, so a failed check leaves nothing behind)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GNSurgeonError(f"{option} {path} exists and is not a folder")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent if str(ancestor.parent) else Path(".")
    if not ancestor.is_dir():
        raise GNSurgeonError(f"{option} {path}: {ancestor} is a file, so the folder cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise GNSurgeonError(f"{option} {path}: folder {ancestor} is not writable")
    return path


def _atomic_target(path: Path) -> tuple[int, str]:
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise GNSurgeonError(f"output directory {directory} does not exist")
    try:
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise GNSurgeonError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_atomically(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it over ``path``.

    A crash or error leaves whatever was at ``path`` before untouched.
    """
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should be an ordinary file
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # writers that replace the file (safetensors) reset the mode
        os.replace(tmp, path)
    except OSError as exc:
        raise GNSurgeonError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text))
