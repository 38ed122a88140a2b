"""The one memory probe: how much memory this machine can give a command, and refusals measured against it.

Serving (``serve/core/limits.py``: plans, Ray actors), training (``train/preflight.py``: coder parameters) and
the N-worker runs (``train/nworker.py``: K, N and the batches) estimate what a config needs before any
work and refuse, naming the key, when it is more than :func:`available_memory`.
"""
from __future__ import annotations

import os

from util.errors import ConfigError


def available_memory() -> int:
    """Memory this process can have now without swapping: MemAvailable, else physical memory (0: unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return physical_memory()


def physical_memory() -> int:
    """This machine's physical memory (0 when the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def size(n: float) -> str:
    """``n`` bytes for people: ``"1.5 GiB"``, ``"12.0 MiB"``, ``"3 KiB"``."""
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2 ** 10:,.0f} KiB"


def check_memory(need: float, what: str, key: str, fix: str, have=None) -> None:
    """A ConfigError naming ``key`` when ``what`` needs more than the memory available (``have``: the probe
    to use, :func:`available_memory` by default; an unknown amount refuses nothing)."""
    have = (have or available_memory)()
    if have and need > have:
        raise ConfigError(f"Config key '{key}': {what} needs about {size(need)} of memory, more than the "
                          f"{size(have)} this machine has available. Fix: {fix}")
