"""What a serving config needs, estimated before any work: memory, actors, and the load its rates put on the instances.

The simulator and the Ray frontend hold every request of a strategy in memory
at once, so a config's size is known before anything runs: ``num_queries``,
the code's k and r, the instance counts and the slow-down periods fix it. The
figures below are upper bounds calibrated on the simulator (``tracemalloc``
peaks of ``serve.simulator.simulate.simulate`` plus the results files: about 400 bytes per
request, 40 per slot of a coded group, 48 per instance, 9 per slow-down cell),
rounded up. A config that needs more memory than this machine has available
is refused with the figure, as is a rate the instances cannot serve at all
(load above :data:`MAX_LOAD`); a load above 1 runs, with a warning.

The *load* of a strategy is arrival rate x mean work per request / instances,
counting the requests it sends per query (2 for ``replicate``, 1 + r/k for
``coded``): at load above 1 the queues grow for the whole run, and latency
measures the run's length rather than the strategy.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional, Sequence

from serve.core.plan import read_latency_file
from serve.core.strategies import get as strategy_of
from util.errors import ConfigError
from util.memory import available_memory, check_memory, size  # noqa: F401  (serve.core.limits' names since they began)

MAX_LOAD = 10.0  # above it, over 90% of the last queries' latency is queueing: the figures say nothing
BYTES_PER_REQUEST = 400
BYTES_PER_GROUP_SLOT = 40
BYTES_PER_INSTANCE = 64
BYTES_PER_SLOW_CELL = 9
MAX_SLOW_CELLS = 5e7  # slow-down periods x instances of one plan: a few seconds to draw
BYTES_PER_RAY_ACTOR = 200 * 2 ** 20  # a Ray worker process with torch imported
RAY_BYTES_PER_REQUEST = 300  # the frontend's per-request log (Python floats in lists)


def mean_ms(dist: dict, key: str) -> float:
    """Mean of a delay or service distribution (its ``probability`` left out), in ms."""
    name = dist["dist"]
    if name == "none":
        return 0.0
    if name == "constant":
        return float(dist["ms"])
    if name == "exponential":
        return float(dist["mean_ms"])
    if name == "shifted-exponential":
        return float(dist["shift_ms"] + dist["mean_ms"])
    if name == "pareto":
        if dist["alpha"] <= 1:
            raise ConfigError(f"Config key '{key}': a Pareto distribution with alpha <= 1 has no mean, so a load "
                              f"cannot be set from it. Fix: alpha > 1.")
        return float(dist["scale_ms"] * dist["alpha"] / (dist["alpha"] - 1))
    return float(read_latency_file(dist["path"], dist.get("column")).mean())  # "file"


def instance_count(strategy: str, m: int, k: int, r: int) -> tuple[int, int, int, int]:
    """``(all, F, parity, backup)`` instances of ``strategy`` (its roles counted without building the list,
    which a huge 'instances' would not fit in memory)."""
    return strategy_of(strategy).counts(m, k, r)


def requests_per_query(strategy: str, k: int, r: int) -> float:
    return strategy_of(strategy).requests_per_query(k, r)


def plan_bytes(strategy: str, n: int, k: int, r: int, instances: int, duration_s: float,
               slowdown: Optional[dict], failures: bool, ray: bool = False, outputs: int = 10) -> dict:
    """Upper bound of the memory one strategy's plan and its simulation (or Ray frontend) need, in parts
    named by what sets each: ``{"num_queries": bytes, "parities": ..., "groups": ..., "instances": ...,
    "slowdown": ...}``."""
    per_request = BYTES_PER_REQUEST + (RAY_BYTES_PER_REQUEST if ray else 0)
    way = strategy_of(strategy)
    requests, parities = way.request_bound(n, k, r)
    parts = {"num_queries": per_request * requests + (4 * outputs * n if ray else 0),
             "parities": per_request * parities, "groups": 0.0, "instances": BYTES_PER_INSTANCE * instances,
             "slowdown": 0.0}
    if way.grouped:  # a group closed by its timeout may hold one query: up to n groups of k + r slots
        parts["groups"] = BYTES_PER_GROUP_SLOT * n * (k + r) + (4 * outputs * n * (k + r) if ray else 0)
    if slowdown is not None:  # a (periods x instances) table of slow periods
        periods = duration_s / (slowdown["period_ms"] / 1000.0) + 1
        parts["slowdown"] = BYTES_PER_SLOW_CELL * periods * instances
    if failures:  # the simulator looks up the next live instance of every retried query among all instances
        parts["instances"] += 26.0 * n * instances
    return parts


def check_load(load: float, who: str, where: str, label: str, fix: str, out=None) -> None:
    """Refuse a load the instances cannot serve at all (``label`` names the keys that set it); warn when
    the queues will grow (load above 1)."""
    if load > MAX_LOAD:
        raise ConfigError(f"{label}: {where}, {who} would run at load {load:,.3g} "
                          f"(arrival rate x mean work per request / instances), more than {MAX_LOAD:g}: its "
                          f"queues would grow for the whole run, so latency would measure the run's length, not "
                          f"the strategy. Fix: {fix}")
    if load > 1:
        print(f"warning: {where}, {who} runs at load {load:.3g} (above 1): the queues grow for "
              f"the whole run, and latencies grow with num_queries.", file=out or sys.stderr)


def strategy_load(strategy: str, rate: float, work_s: float, k: int, r: int, num_instances: int,
                  num_f: int) -> float:
    """The busiest kind of instance's load (F instances for ``backup``, whose backup model is cheaper; all of
    the strategy's instances otherwise): :meth:`serve.core.strategies.Strategy.load`."""
    return strategy_of(strategy).load(rate, work_s, k, r, num_instances, num_f)


def mean_delay_ms(delay: dict, mean_of) -> float:
    """Expected injected delay of a request (its probability applied), in ms."""
    return float(delay.get("probability", 1.0)) * mean_of(delay)


def slow_factor(slowdown: Optional[dict]) -> float:
    """Mean slow-down factor of a request: 1 + fraction x (factor - 1)."""
    return 1.0 if slowdown is None else 1.0 + slowdown["fraction"] * (slowdown["factor"] - 1.0)


def check_plan_sizes(cfg, shapes: Sequence[tuple[int, int]], durations: Sequence[float], instances_of,
                     keys: dict) -> None:
    """Memory of every strategy's plan at every (k, r) of ``shapes``; ``instances_of(strategy, k, r)``
    gives a strategy's instance count, ``durations`` the run lengths (s) the slow-down table spans, and
    ``keys`` the config key (and fix) behind each part of :func:`plan_bytes` that this command can name."""
    ray = cfg.engine == "ray"
    worst, at = None, None
    for k, r in shapes:
        for strategy in cfg.strategies:
            for duration in durations:
                parts = plan_bytes(strategy, cfg.num_queries, k, r, instances_of(strategy, k, r), duration,
                                   cfg.slowdown, bool(cfg.failures), ray)
                if worst is None or sum(parts.values()) > sum(worst.values()):
                    worst, at = parts, (strategy, k, r)
    if at is None:
        return
    if cfg.slowdown is not None:  # drawing the table takes time as well as memory
        cells = max(durations) / (cfg.slowdown["period_ms"] / 1000.0) * max(instances_of(*sa) for sa in
                                                                            ((s, k, r) for k, r in shapes
                                                                             for s in cfg.strategies))
        if cells > MAX_SLOW_CELLS:
            raise ConfigError(f"Config key 'slowdown': a 'period_ms' of {cfg.slowdown['period_ms']:g} over a run of "
                              f"about {max(durations):.3g} s gives {cells:,.3g} slow-period cells (periods x "
                              f"instances) per plan, more than {MAX_SLOW_CELLS:,.0f}, which would take minutes to "
                              f"draw. Fix: a longer 'period_ms' (slow periods last at least a request's service).")
    key, fix = keys[max(worst, key=worst.get)]
    check_memory(sum(worst.values()), f"strategy '{at[0]}' with {cfg.num_queries:,} queries at k={at[1]}, "
                 f"r={at[2]} and {instances_of(*at):,} instances", key, fix)


def check_ray_actors(cfg, actors: int) -> None:
    """A local Ray must hold every actor: their memory, and their reserved CPUs."""
    if cfg.engine != "ray" or cfg.address:
        return
    check_memory(actors * float(BYTES_PER_RAY_ACTOR), f"a local Ray with {actors:,} instance actors (about "
                 f"{size(BYTES_PER_RAY_ACTOR)} each)", "instances",
                 "lower 'instances', or join a cluster with 'address'.")
    cpus = cfg.num_cpus or os.cpu_count() or 1
    if cfg.instance_cpus * actors > cpus + 1e-9:
        raise ConfigError(f"Config key 'instance_cpus': {actors} instance actors reserving {cfg.instance_cpus:g} "
                          f"CPUs each need {cfg.instance_cpus * actors:g} CPUs, and the local Ray has {cpus}, so "
                          f"some would never start. Fix: set 'instance_cpus' to {math.floor(100 * cpus / actors) / 100:g} "
                          f"or less (0 packs them freely), or raise 'num_cpus'.")
