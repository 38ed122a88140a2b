"""The config keys of N-worker perturbations (coders/perturb.py), checked without importing torch.

``adversaries``, ``adversary``, ``adversary_scale``, ``adversary_target``,
``output_noise``, ``straggler_p``, ``worker_latency`` and ``deadline_ms`` (coders/config.py declares them; docs/nworker.md
explains them). :func:`coders.config.check_code_values` calls the two checks below.
"""
from __future__ import annotations

import math

ADVERSARY_KINDS = ("gaussian", "sign", "swap")
DEFAULTS = {"adversaries": 0, "adversary": "gaussian", "adversary_scale": 100.0, "adversary_target": None,
            "output_noise": 0.0, "straggler_p": None,
            "worker_latency": None, "deadline_ms": None}


def refuse_perturbation_keys(cfg, bad) -> None:
    """A systematic config leaves every perturbation key at its default."""
    for key, default in DEFAULTS.items():
        if getattr(cfg, key) != default:
            raise bad(key, f"is read only by the N-worker form; this config's 'form' is {cfg.form!r}. Fix: set "
                           f"\"form\": \"nworker\", or remove '{key}'.")


def check_perturbation_keys(cfg, bad) -> None:
    """The values of an N-worker config's perturbation keys (``bad(key, msg)`` makes the ConfigError)."""
    answering = min(cfg.n_workers) - max(cfg.stragglers)
    if cfg.adversaries < 0 or cfg.adversaries >= answering:
        raise bad("adversaries", f"must be an integer from 0 to N - S - 1 = {answering - 1} (fewer than the "
                                 f"workers that answer, for every N and S of the sweep); got {cfg.adversaries}.")
    if cfg.adversary not in ADVERSARY_KINDS:
        raise bad("adversary", f"must be one of {', '.join(map(repr, ADVERSARY_KINDS))}; got {cfg.adversary!r}.")
    if not (math.isfinite(cfg.adversary_scale) and cfg.adversary_scale >= 0):
        raise bad("adversary_scale", f"must be a finite number >= 0; got {cfg.adversary_scale!r}.")
    if cfg.adversary_target is not None:
        if cfg.adversary != "swap":
            raise bad("adversary_target", f"is read only by the \"swap\" adversary; this config's 'adversary' is "
                                          f"{cfg.adversary!r}. Fix: remove it, or set \"adversary\": \"swap\".")
        if cfg.adversary_target < 0:
            raise bad("adversary_target", f"must be a class index >= 0 or null; got {cfg.adversary_target}.")
    if not (math.isfinite(cfg.output_noise) and cfg.output_noise >= 0):
        raise bad("output_noise", f"must be a finite number >= 0 (a standard deviation); got {cfg.output_noise!r}.")
    if cfg.straggler_p is not None:
        if not 0 <= cfg.straggler_p < 1:
            raise bad("straggler_p", f"must be a probability in [0, 1) (or null); got {cfg.straggler_p!r}.")
        if cfg.stragglers != [0]:
            raise bad("stragglers", f"must be [0] when 'straggler_p' is set (the number late is then random, "
                                    f"Binomial(N, p)); got {cfg.stragglers}.")
    check_deadline_keys(cfg, bad)


def check_deadline_keys(cfg, bad) -> None:
    """``worker_latency`` (a latency law, util/latency.py) and ``deadline_ms`` come together, with S = [0] and
    without ``straggler_p`` (one law of lateness at a time)."""
    law, deadline = cfg.worker_latency, cfg.deadline_ms
    if law is None and deadline is None:
        return
    if law is None:
        raise bad("deadline_ms", "needs 'worker_latency', the law each worker's completion time is drawn from, e.g. "
                                 "{\"dist\": \"shifted-exponential\", \"shift_ms\": 10, \"mean_ms\": 5}.")
    if deadline is None:
        raise bad("worker_latency", "is read only with 'deadline_ms' (the time by which evaluation decodes). Fix: "
                                    "add \"deadline_ms\", or remove 'worker_latency'.")
    if not (math.isfinite(deadline) and deadline >= 0):
        raise bad("deadline_ms", f"must be a finite number of milliseconds >= 0; got {deadline!r}.")
    from util.errors import ConfigError
    from util.latency import check_delay

    try:
        check_delay(law, "", "worker_latency")
    except ConfigError as exc:
        raise bad("worker_latency", str(exc).split("config key 'worker_latency' ", 1)[-1]) from None
    if any(i >= min(cfg.n_workers) for i in law.get("instances") or []):
        raise bad("worker_latency", f"\"instances\" names workers 0 to N - 1 = {min(cfg.n_workers) - 1} (for every N "
                                    f"of 'n_workers'); got {law['instances']}.")
    if cfg.straggler_p is not None:
        raise bad("straggler_p", "and 'worker_latency' are two laws of lateness; give one. Fix: remove "
                                 "'straggler_p' (a latency law with \"probability\" p and a deadline below its "
                                 "delay is the same law).")
    if cfg.stragglers != [0]:
        raise bad("stragglers", f"must be [0] with a deadline (the workers late are those whose drawn time "
                                f"passes it); got {cfg.stragglers}.")
