"""What this machine can do: its dense matmul rate and its memory bandwidth, the bounds bench.speed compares with."""
from __future__ import annotations

import math
import time

import torch


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
