"""Batch-1 latency of E, F and D for one group, and the share E + D add to F (bench.speed's inference table)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from bench.machine_rates import sync
from bench.training_speed import f_label


def median_latency(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def bench_inference(model_name: str, device: torch.device, repeats: int, base_model_file: Optional[str] = None) -> dict:
    """Batch-1 latency of E, F and D for one group (k = 2, r = 1); base-mlp with ``base_model_file``'s weights."""
    from base_models.mlp import BaseMLP
    from base_models.resnet import ResNet18
    from base_models.fit import load_state
    from coders.conv import ConvEncoder
    from coders.mlp import MLPDecoder, MLPEncoder

    k, r, n = 2, 1, 10
    if model_name == "base-mlp":
        shape, f, enc_cls = (1, 28, 28), BaseMLP(in_shape=(1, 28, 28), num_classes=n), MLPEncoder
    else:
        shape, f, enc_cls = (3, 32, 32), ResNet18(in_shape=(3, 32, 32), num_classes=n), ConvEncoder
    c, h, w = shape
    enc = enc_cls(k, r, [-1, *shape]).to(device).eval()
    dec = MLPDecoder(k, r, [-1, n]).to(device).eval()
    if model_name == "base-mlp" and base_model_file is not None:
        load_state(f, Path(base_model_file))
    f = f.to(device).eval()
    # As in CodedRun.encode: channels are folded into the encoder's batch.
    enc_in = torch.randn(c, k, h * w, device=device)
    f_in = torch.randn(1, *shape, device=device)
    dec_in = torch.randn(1, k + r, n, device=device)
    e_s = median_latency(lambda: enc(enc_in), device, repeats)
    f_s = median_latency(lambda: f(f_in), device, repeats)
    d_s = median_latency(lambda: dec(dec_in), device, repeats)
    return {"model": model_name, "encoder": enc_cls.__name__, "E": e_s, "F": f_s, "D": d_s,
            "weights": f_label(base_model_file) if model_name == "base-mlp" else "random",
            "overhead": (e_s + d_s) / f_s}
