"""Ctrl-C and SIGTERM at any moment of a command that starts Ray: one line, exit 130 / 143, no Ray left behind.

Three stages, each with its own handling:

* before anything is started (imports, reading the config): :func:`exit_at_once`,
  installed first thing by the command's entry point, prints one line and exits:
  there is nothing to clean up;
* around calls into Ray that must not be cut (``ray.init``, actors starting):
  :func:`deferred` notes the signal and raises it when the call has returned,
  since an exception raised inside Ray's own code leaves its processes half
  started (or ends in a ``SystemError``);
* the rest: :func:`raising` turns SIGTERM into :class:`Terminated` and Ctrl-C
  into ``KeyboardInterrupt``, so every ``finally`` (Ray's shutdown) runs.

:func:`ray_processes` and :func:`kill_left` make sure a stopped Ray's helper
processes (its agents, started by the raylet) go with it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_TERMINATED = 143   # 128 + SIGTERM
STOPS = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` (Ray's shutdown) runs."""


def raise_terminated(signum, frame):
    raise Terminated()


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def exit_at_once(command: str) -> None:
    """Until the command installs its own handling: a signal prints one line and exits (nothing started yet)."""
    def stop(signum, frame):
        how = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "terminated (SIGTERM)"
        sys.stderr.write(f"{how} while {command} was starting: nothing was started or written\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_TERMINATED)

    if _main_thread():
        for s in STOPS:
            signal.signal(s, stop)


def raising() -> None:
    """SIGTERM raises :class:`Terminated`, Ctrl-C ``KeyboardInterrupt`` (in the main thread)."""
    if _main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, raise_terminated)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM are noted, not raised; on leaving, the first one noted is raised
    (``KeyboardInterrupt`` or :class:`Terminated`) and the handlers from before are back."""
    if not _main_thread():
        yield
        return
    noted = []
    before = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in STOPS}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if noted:
        raise KeyboardInterrupt() if noted[0] == signal.SIGINT else Terminated()


@contextlib.contextmanager
def ignored() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM are ignored (a clean-up a second Ctrl-C must not cut short)."""
    if not _main_thread():
        yield
        return
    before = {s: signal.signal(s, signal.SIG_IGN) for s in STOPS}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, exited but not yet reaped, does not), read from /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, read from Linux's /proc (empty elsewhere)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def ray_processes() -> set[int]:
    """This process's descendants that are Ray's (GCS, raylet, its agents, workers)."""
    ray = set()
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):
            if b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes():
                ray.add(pid)
    return ray


def kill_left(pids: set[int]) -> None:
    """SIGKILL those of ``pids`` still running (Ray's agents outlive a raylet stopped while it started them)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
