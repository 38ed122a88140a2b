"""What coding costs the serving frontend, measured through ``python -m serve``'s own code path.

``python -m bench.serve_cost RUN_FOLDER [RUN_FOLDER ...] [--queries N] [--rate R]``

For each run folder: serves it with no injected delay under
``equal-resources`` and ``coded`` on a local Ray, and prints the frontend's
cost per query (encoding, dispatching, decoding, from the summaries the
serving run writes) and the coded p50 against the equal-resources p50
(target: within 1.2x). First it measures Ray's own floor on this machine:
the round trip of an actor call that does nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from bench.machine_rates import load_line
from util.errors import UserError, exits_on_user_error


class Echo:
    def ping(self, x):
        return x


def ray_floor(n: int = 300) -> tuple[float, float, float]:
    """Median, p99 and max round trip (ms) of a no-op actor call, one at a time."""
    import ray

    actor = ray.remote(num_cpus=0)(Echo).remote()
    ray.get(actor.ping.remote(0))
    times = []
    for i in range(n):
        t = time.perf_counter()
        ray.get(actor.ping.remote(i))
        times.append(1000 * (time.perf_counter() - t))
    ray.kill(actor)
    return float(np.median(times)), float(np.percentile(times, 99)), float(np.max(times))


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.serve_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders written by train.py")
    ap.add_argument("--queries", type=int, default=1000, help="queries per strategy (default 1000)")
    ap.add_argument("--rate", type=float, default=50.0, help="arrival rate, queries/s (default 50)")
    ap.add_argument("--instances", type=int, default=2, help="m (default 2)")
    args = ap.parse_args(argv)
    if args.queries < 10 or args.rate <= 0 or args.instances < 1:
        raise UserError("--queries must be 10 or more, --rate positive and --instances 1 or more.")
    for run in args.runs:
        if not (Path(run) / "config.json").is_file():
            raise UserError(f"'{run}' is not a run folder (no config.json). Fix: pass folders train.py wrote.")
    from serve.cli import serve_all
    from serve.core.config import validate
    from util.ray_cluster import start_ray

    import ray

    load = load_line()
    start_ray(None, None)
    try:
        median, p99, worst = ray_floor()
        print(f"Ray's floor (no-op actor call, one at a time): median {median:.2f} ms, p99 {p99:.2f} ms, "
              f"max {worst:.1f} ms; {load}\n")
        header = ("| run | encode (us/query) | dispatch (us/query) | decode (us/query) | equal-resources p50 (ms) "
                  "| coded p50 (ms) | coded / equal-resources p50 |")
        print(header)
        print("|---|---:|---:|---:|---:|---:|---:|")
        with tempfile.TemporaryDirectory() as out:
            for run in args.runs:
                cfg = validate({"runs": [run], "strategies": ["equal-resources", "coded"], "rates": [args.rate],
                                "num_queries": args.queries, "warmup_queries": min(50, args.queries // 10),
                                "instances": args.instances, "out_dir": out, "plot": False})
                (_, (er, coded)), = serve_all(cfg, out=open(os.devnull, "w"))
                ratio = coded["p50_ms"] / er["p50_ms"]
                name = "/".join(Path(run).parts[-6:])
                print(f"| {name} | {coded.get('frontend_encode_us_per_query', 0):.0f} | "
                      f"{coded.get('frontend_dispatch_us_per_query', 0):.0f} | "
                      f"{coded.get('frontend_decode_us_per_query', 0):.0f} | {er['p50_ms']:.2f} | "
                      f"{coded['p50_ms']:.2f} | {ratio:.2f}x{'' if ratio <= 1.2 else ' (above the 1.2x target)'} |",
                      flush=True)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
