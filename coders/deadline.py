"""N-worker decoding by a deadline: each worker's completion time drawn from a latency law, the decoder
using exactly the workers done by the deadline.

The law is a serving delay model (util/latency.py: ``{"dist": "shifted-exponential", "shift_ms": 10,
"mean_ms": 5}``, with optional ``probability`` and ``instances``), drawn with a seeded numpy Generator, so the
same seed gives the same times. A worker is on time when its drawn time is <= the deadline; a group (one row
of times) whose on-time workers are fewer than the decoder's minimum is *not answered*: it is left out of the
error and counted in the fraction answered, instead of waiting for more workers.
"""
from __future__ import annotations

import numpy as np
import torch

from util.latency import sample_ms


def completion_ms(law: dict, n_workers: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``(rows, N)`` completion times in ms: worker i of each row drawn from ``law`` (``instances`` names
    the workers it delays)."""
    workers = np.tile(np.arange(n_workers), rows)
    return sample_ms(law, workers, rng).reshape(rows, n_workers)


def on_time(times: np.ndarray, deadline_ms: float) -> torch.Tensor:
    """``(rows, N)`` boolean: the workers whose drawn time is at most the deadline."""
    return torch.from_numpy(np.asarray(times) <= deadline_ms)


def by_deadline(law: dict, deadline_ms: float, n_workers: int, rows: int, rng: np.random.Generator,
                fewest: int) -> tuple[torch.Tensor, float]:
    """``(patterns, fraction answered)``: ``rows`` groups' times drawn from ``law``; the patterns of those in
    which at least ``fewest`` workers finished by the deadline (the others are not answered)."""
    avail = on_time(completion_ms(law, n_workers, rows, rng), deadline_ms)
    answered = avail.sum(1) >= fewest
    return avail[answered], float(answered.float().mean()) if rows else 0.0


def answered_patterns(law: dict, deadline_ms: float, n_workers: int, rows: int, rng: np.random.Generator,
                      fewest: int, rounds: int = 1000) -> torch.Tensor:
    """``rows`` patterns drawn by :func:`by_deadline`, drawing again until ``rows`` are answered (training:
    a pattern no decoder can use teaches nothing). Raises ValueError when ``rounds`` draws answer none."""
    found, total = [], 0
    for _ in range(rounds):
        patterns, _ = by_deadline(law, deadline_ms, n_workers, rows, rng, fewest)
        found.append(patterns)
        total += len(patterns)
        if total >= rows:
            return torch.cat(found)[:rows]
    if total:
        return torch.cat(found)
    raise ValueError(f"by the deadline {deadline_ms:g} ms, fewer than {fewest} of {n_workers} workers finished in "
                     f"{rounds * rows} draws of the latency law; raise deadline_ms or add workers.")
