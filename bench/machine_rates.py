"""What this machine can do: its dense matmul rate and its memory bandwidth, the bounds bench.speed compares with;
and how busy it is (:func:`load_line`, the phrase every bench script prints next to its figures)."""
from __future__ import annotations

import math
import os
import time

import torch


def load_line() -> str:
    """The machine's 1, 5 and 15-minute load averages and its core count, as one phrase."""
    if not hasattr(os, "getloadavg"):
        return "load average unknown on this platform"
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1/5/15 min) on {os.cpu_count()} cores"


def load_average() -> float:
    """The 1-minute load average (0.0 where the platform has none): how many processes want a core now."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Dense fp32 ``n x n`` matmul rate in FLOP/s, the best of ``repeats`` timings."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up: thread pool, cuBLAS handle
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def copy_rate(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s from copying a ``mib`` MiB tensor (read + write counted), best of ``repeats``."""
    a = torch.empty(mib * 2 ** 18, device=device).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best
