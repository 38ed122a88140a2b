"""The device a run uses, and the CPU settings that keep it fast: freed memory kept for
reuse and subnormal floats flushed to zero (with a count of the subnormals a model holds)."""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Optional

import torch


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


def flush_denormals(on: bool = True) -> bool:
    """Make CPU float arithmetic treat subnormal numbers as zero (``on``) or as IEEE says (``off``).

    Subnormals are the floats below ``torch.finfo(torch.float32).tiny`` (about
    1.2e-38) in magnitude, other than zero. x86 cores handle them in microcode,
    many times slower than other numbers, so a model whose weights hold some
    (common after long training with weight decay) runs several times slower
    on the CPU. With ``on``, results that would be subnormal become zero
    (flush-to-zero) and subnormal inputs are read as zero (denormals-are-zero).

    ``torch.set_flush_denormal`` sets the calling thread only, while torch's
    CPU kernels run on an OpenMP thread pool that may already exist; the mode
    is therefore set on every thread of that pool too. Threads started later
    inherit the mode of the thread that starts them; call this from the thread
    that runs the model (or starts those that do). Returns False when the CPU
    has no such mode (then nothing changed).
    """
    if not torch.set_flush_denormal(on):
        return False
    threads = max(torch.get_num_threads(), os.cpu_count() or 1)  # and pooled threads beyond today's count
    _on_openmp_threads(lambda: torch.set_flush_denormal(on), threads)
    return True


def denormals_flushed() -> bool:
    """Whether CPU arithmetic on the calling thread now flushes subnormal results to zero."""
    return (torch.tensor([1e-30]) * 1e-10).item() == 0.0


def _openmp_library() -> Optional[str]:
    """Path of the OpenMP runtime that torch's kernels use, among the libraries this process has loaded.

    Other packages load copies of their own (scikit-learn's ``libgomp-<hash>.so``),
    each with its own threads, so torch's is the one in torch's folder, else
    the one loaded under the runtime's plain name (a torch built against the
    system's).
    """
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({line.split()[-1] for line in fh if "/" in line})
    except OSError:  # not Linux
        return None
    runtimes = [p for p in paths if Path(p).name.split(".so")[0] in ("libgomp", "libomp", "libiomp5")]
    torch_dir = Path(torch.__file__).resolve().parent
    for path in runtimes:
        if torch_dir in Path(path).resolve().parents:
            return path
    return runtimes[0] if runtimes else None


def _on_openmp_threads(fn, threads: int) -> bool:
    """Call ``fn()`` once on each thread of an OpenMP parallel region of ``threads`` threads.

    OpenMP reuses its pooled threads for every later region started from this
    thread, which is how torch's kernels run. Returns False when no OpenMP
    runtime is loaded (torch then runs its kernels on the calling thread or
    threads of its own, and nothing is done).
    """
    path = _openmp_library()
    if path is None:
        return False
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    callback = callback_type(lambda _data: fn())  # each pool thread takes the GIL to run fn
    try:
        region = ctypes.CDLL(path).GOMP_parallel  # libgomp's entry point; libomp and libiomp export it too
    except (OSError, AttributeError):
        return False
    region.argtypes = [callback_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    region.restype = None
    region(callback, None, threads, 0)  # ctypes releases the GIL while the region runs
    return True


def count_subnormal(tensors) -> int:
    """How many entries of the floating-point ``tensors`` are subnormal (non-zero, below the
    dtype's smallest normal magnitude).

    Read from the bit patterns, since with :func:`flush_denormals` on a
    comparison would see them as zero.
    """
    total = 0
    for t in tensors:
        layout = _FLOAT_BITS.get(t.dtype)
        if layout is None:
            continue
        int_dtype, mantissa, exponent = layout
        bits = t.detach().contiguous().view(int_dtype)
        exp_mask, mant_mask = ((1 << exponent) - 1) << mantissa, (1 << mantissa) - 1
        total += int((((bits & exp_mask) == 0) & ((bits & mant_mask) != 0)).sum())
    return total


# Integer type of the same width, mantissa bits and exponent bits of each float type.
_FLOAT_BITS = {torch.float16: (torch.int16, 10, 5), torch.bfloat16: (torch.int16, 7, 8),
               torch.float32: (torch.int32, 23, 8), torch.float64: (torch.int64, 52, 11)}
