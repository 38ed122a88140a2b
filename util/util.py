"""Shape, device and file helpers shared across packages."""
from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch


def get_flattened_dim(in_dim: Sequence[int]) -> int:
    """H*W for an image size ``[-1, C, H, W]`` (one channel), or D for ``[-1, D]``.

    Encoders see one channel at a time, so the channel count is left out.
    """
    dims = list(in_dim)
    if len(dims) == 4:
        return int(dims[2] * dims[3])
    if len(dims) == 2:
        return int(dims[1])
    if len(dims) == 3:  # [-1, H, W]
        return int(dims[1] * dims[2])
    raise ValueError(f"in_dim must be [-1, C, H, W] or [-1, D]; got {dims}")


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_ALLOCATOR_TUNED = False


def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks of up to 32 MiB for reuse instead of returning them to the OS.

    A CPU training step allocates and frees the same large tensors (weight
    gradients, activations) every step; by default glibc hands many of them
    back to the kernel, so the next step takes a page fault for every 4 KiB it
    touches again (about 800 a step for the MNIST learned code, some 7% of the
    step). Process-wide; the price is that the process keeps its peak memory.
    Returns whether the setting took (glibc on Linux only).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _ALLOCATOR_TUNED = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # another C library (musl) or none found
        return False
    return _ALLOCATOR_TUNED


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A run killed mid-write leaves the previous file intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
