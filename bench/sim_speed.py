"""Speed of the serving simulator: simulated queries per second, per strategy.

``python -m bench.sim_speed [--instances 1000] [--queries 1000000] [--k 2] [--r 1] [--load 0.7] [--all-cores]``

Builds each strategy's plan (``serve.core.plan.build_plan``) for Poisson arrivals
at ``load`` x the ``none`` strategy's capacity, with exponential service
(mean 1 ms) and exponential stragglers (1% of requests, mean 20 ms; the
mean work per request, 1.2 ms, defines the capacity), simulates it
(``serve.simulator.simulate.simulate``) and prints the seconds of each step and the queries
simulated per second. The process is pinned to one core unless
``--all-cores`` (numpy's element-wise work is single-threaded anyway).
Target: 1,000 instances and 1,000,000 queries in under 10 s per strategy.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Optional

import numpy as np

from serve.core.config import STRATEGIES, validate
from serve.core.plan import Queries, build_plan
from serve.core.results import summarize
from serve.simulator.simulate import simulate
from util.errors import UserError, exits_on_user_error


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=1000, help="m, the data instances")
    ap.add_argument("--queries", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--r", type=int, default=1)
    ap.add_argument("--load", type=float, default=0.7, help="arrival rate / (m / mean service)")
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all-cores", action="store_true", help="do not pin the process to one core")
    args = ap.parse_args(argv)
    if args.instances < 1 or args.queries < 1 or args.k < 1 or args.r < 1 or not 0 < args.load:
        raise UserError("--instances, --queries, --k and --r must be 1 or more and --load positive.")
    if not args.all_cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    mean_s = 0.001 + 0.01 * 0.020
    cfg = validate({"instances": args.instances, "num_queries": args.queries, "seed": args.seed, "engine": "sim",
                    "service": {"dist": "exponential", "mean_ms": 1.0},
                    "delays": [{"dist": "exponential", "mean_ms": 20.0, "probability": 0.01}]},
                   source="bench.sim_speed", need_runs=False)
    rate = args.load * args.instances / mean_s
    arrival = np.cumsum(np.random.default_rng(args.seed).exponential(1.0 / rate, args.queries))
    queries = Queries(arrival, np.arange(args.queries), np.zeros(args.queries, dtype=int))
    print(f"{args.instances} data instances, {args.queries:,} queries at {rate:,.0f}/s (load {args.load:g}), "
          f"k = {args.k}, r = {args.r}, {'all cores' if args.all_cores else 'one core'}")
    print("| strategy | instances | requests | plan (s) | simulate (s) | total (s) | queries / s | p50 (ms) | p99.9 (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for strategy in args.strategies:
        t0 = time.perf_counter()
        plan = build_plan(cfg, strategy, args.k, args.r, queries, cfg.delays[0])
        t1 = time.perf_counter()
        outcome = simulate(plan, cfg)
        t2 = time.perf_counter()
        s = summarize(outcome, strategy, plan.num_instances)
        print(f"| {strategy} | {plan.num_instances} | {len(plan):,} | {t1 - t0:.2f} | {t2 - t1:.2f} | {t2 - t0:.2f} | "
              f"{args.queries / (t2 - t0):,.0f} | {s['p50_ms']:.2f} | {s['p99.9_ms']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
