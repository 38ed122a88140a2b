"""Learning-rate schedules as functions of the run's progress.

A schedule is a factor of the configured learning rate, computed from where
a step sits in the whole run (``progress`` from 0 at the first step to 1
after the last step of ``num_epoch`` epochs). It keeps no state: a resumed
run, a torchrun rank and a fresh run all compute the same rate for the same
step, and the checkpoint needs nothing beyond the epoch it already holds.
"""
from __future__ import annotations

import math


def constant(progress: float) -> float:
    return 1.0


def cosine(progress: float) -> float:
    """Half a cosine from 1 to 0."""
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def linear(progress: float) -> float:
    """Straight from 1 to 0."""
    return max(0.0, 1.0 - progress)


def step(progress: float) -> float:
    """1, then 0.1 from half the run, then 0.01 from three quarters."""
    return 1.0 if progress < 0.5 else 0.1 if progress < 0.75 else 0.01


SCHEDULES = {"constant": constant, "cosine": cosine, "linear": linear, "step": step}


def progress(epoch: int, step_index: int, steps_per_epoch: int, num_epoch: int) -> float:
    """How far through the run a step is: the step ``step_index`` (0-based) of epoch
    ``epoch`` (0-based, the epochs completed before it) of ``num_epoch``."""
    if num_epoch <= 0:
        return 0.0
    return (epoch + step_index / max(steps_per_epoch, 1)) / num_epoch


def set_rates(optimizer, base_rates: list[float], factor: float) -> None:
    """Every parameter group's lr is its configured rate times ``factor``."""
    for group, base in zip(optimizer.param_groups, base_rates):
        group["lr"] = base * factor
