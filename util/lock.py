"""One writer per run folder: an OS lock held for the life of the process that writes it.

``with folder_lock(folder): ...`` takes an exclusive ``flock`` on ``folder/.lock``
and writes who holds it (pid, host, command, start time) into that file, for
the message a second writer gets. The kernel drops the lock when the holder's
file is closed, so a process that dies in any way (SIGKILL included) frees
the folder at once: there is no stale lock to delete by hand. The lock file
itself stays behind; it is what gets locked, and deleting it while a writer
holds it would let a second writer lock a new file of the same name.

Anything that writes into a run folder takes this lock: the training loop
(:meth:`train.engine.CodedRun.fit`), and in a distributed launch (torchrun,
Ray workers) the one rank or worker that writes the folder. The lock is
per open file, so threads of one process share nothing through it; a forked
child inherits the holder's open file and keeps the folder locked while it lives.
On a file system without ``flock`` (some network mounts) the lock is refused
with a message rather than silently skipped.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

from util.errors import UserError

try:
    import fcntl
except ImportError:  # not a POSIX system: no locking
    fcntl = None

LOCK_NAME = ".lock"


class FolderBusy(UserError):
    """Another process holds the folder's lock."""


def busy_error(folder: Path, who: str, what: str = "run folder") -> FolderBusy:
    if what != "run folder":
        return FolderBusy(f"The {what} '{folder}' is in use by {who}: a folder has one writer at a time. Fix: "
                          f"wait for that process to finish (or stop it), then rerun.")
    return FolderBusy(f"The {what} '{folder}' is in use by {who}: a folder has one writer at a time. Fix: wait for "
                      f"that process to finish (or stop it), then rerun with --resume; to run the same config "
                      f"twice at once, give the second another 'save_dir'.")


def _holder_text(raw: str) -> str:
    try:
        info = json.loads(raw)
        return (f"process {info['pid']} on {info['host']} (running '{info['command']}' since "
                f"{info['since']})")
    except (ValueError, KeyError, TypeError):
        return "another process (it left no details)"


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])[:300],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


class FolderLock:
    """An exclusive lock on ``folder/.lock``; :meth:`acquire` raises :class:`FolderBusy` naming the holder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def acquire(self, what: str = "run folder") -> "FolderLock":
        if self.fd is not None or fcntl is None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raw = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise busy_error(self.folder, _holder_text(raw), what) from None
            raise UserError(f"Could not lock the {what} '{self.folder}' ({exc.strerror}); its file system may not "
                            f"support file locks. Fix: put 'save_dir' on a local disk.") from None
        info = (json.dumps(_me()) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # the details would only mislead once the lock is free
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor drops the flock

    def __del__(self) -> None:  # a lock object dropped without release() frees the folder too
        try:
            self.release()
        except Exception:  # at interpreter exit; the kernel frees the lock with the process anyway
            pass

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run folder") -> Iterator[FolderLock]:
    """Hold ``folder``'s lock inside the ``with`` block (see the module docstring)."""
    lock = FolderLock(folder).acquire(what)
    try:
        yield lock
    finally:
        lock.release()


def holder(folder: str | os.PathLike) -> Optional[str]:
    """Who holds ``folder``'s lock now (a phrase for messages), or None when nobody does.

    Probes by taking the lock for an instant, so it never waits.
    """
    path = Path(folder) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder_text(os.pread(fd, 4096, 0).decode(errors="replace"))
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
