"""Atomic writes of results files, and the removal of what a killed write left behind."""
from __future__ import annotations

import glob
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch


TMP_SUFFIX = ".tmp"  # temporary files of the atomic writes below: "<name>.<random>.tmp" beside <name>


def _file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask); mkstemp's own is 0600."""
    try:  # Linux reports the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: str | os.PathLike, mode: str, write) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, flush it to disk, give it the
    permissions of an ordinary new file and rename it over ``path``.

    A process killed at any point leaves either the old file or the new one, never a
    mixture; what it can leave is the temporary file (see :func:`remove_stale_temps`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not every platform can open a folder
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A run killed mid-write leaves the previous file intact, never a truncated one.
    """
    _atomic_write(path, "wb", lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (see :func:`atomic_save`)."""
    _atomic_write(path, "w", lambda fh: fh.write(text))


def remove_stale_temps(folder: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Delete the temporary files that a killed atomic write of any of ``names`` left in ``folder``.

    Only call this while no other process may be writing those files (e.g. holding
    the folder's lock, util/lock.py). Says on stderr how many went; returns them.
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f"{glob.escape(name)}.*{TMP_SUFFIX}"):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    if removed:
        print(f"removed {len(removed)} temporary file(s) left in '{folder}' by an interrupted write",
              file=sys.stderr)
    return removed


def unwritable(path: Path, want_folder: bool) -> Optional[str]:
    """Why ``path`` cannot be written as a file (or a folder of plots), with the fix; None when it can."""
    if want_folder and path.exists() and not path.is_dir():
        return "is a file. Fix: name a folder for the plots (it is created when missing)."
    if not want_folder and path.is_dir():
        return "is a folder. Fix: name a file such as results.md (its folder is created when missing)."
    existing = path if want_folder else path.parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"cannot be created, since '{existing}' is a file. Fix: choose another path."
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: '{existing}' is not writable by this user. Fix: choose a path you can write to."
    return None
