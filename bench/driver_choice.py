"""Which driver: lcc's batched Ray Core actors, or Ray Serve's handles with ``@serve.batch``?

``python -m bench.driver_choice RUN_FOLDER [--queries N]``

Both serve the run's F on two replicas, batches of up to 32, every query offered at once, timed alike: one
warm-up pass first, then the wall time from offering the first query to the last answer and the driver
process's CPU time over that span. Printed beside them: the bare loop of F on one thread (batch 1 and 64), the
limit both are measured against, and the load average. lcc's path is :class:`serve.cluster.runtime.Frontend` (strategy
``none``, the default batching); Ray Serve's is a deployment of two replicas whose ``@serve.batch`` method
runs F, called through a deployment handle from asyncio.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from typing import Optional

import numpy as np
import torch

from bench.machine_rates import load_line
from util.errors import UserError, exits_on_user_error


def ray_serve_rate(f: torch.nn.Module, xs: np.ndarray) -> tuple[float, float]:
    """``(queries/s, driver CPU us/query)`` through a Ray Serve deployment with ``@serve.batch``."""
    from ray import serve

    @serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
    class Model:
        def __init__(self, module):
            torch.set_num_threads(1)
            self.module = module.eval()

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
        async def __call__(self, inputs: list) -> list:
            with torch.no_grad():
                return list(self.module(torch.as_tensor(np.stack(inputs))).numpy())

    handle = serve.run(Model.bind(f), name="lcc-driver-choice", route_prefix=None)

    async def go():
        await asyncio.gather(*[handle.remote(x) for x in xs])  # warm-up pass, as ray_capacity's
        cpu, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*[handle.remote(x) for x in xs])
        return time.perf_counter() - t0, time.process_time() - cpu

    try:
        wall, cpu = asyncio.run(go())
    finally:
        serve.shutdown()
    return len(xs) / wall, 1e6 * cpu / len(xs)


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.driver_choice", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder written by train.py")
    ap.add_argument("--queries", type=int, default=3000, help="queries offered (default 3000)")
    args = ap.parse_args(argv)
    if args.queries < 100:
        raise UserError("--queries must be 100 or more.")
    from bench.throughput import BATCH, bare_loop, ray_capacity
    from coders.code import load_code
    from serve.core.batching import Batching
    from serve.core.config import validate
    from util.ray_cluster import start_ray

    import ray

    loaded = load_code(args.run)
    x, _ = loaded.splits.split("test")
    before = load_line()
    one, many = bare_loop(loaded.code.base, x)
    cfg = validate({"runs": [args.run], "rates": [1e6], "num_queries": args.queries, "instances": 2,
                    "out_dir": tempfile.mkdtemp(prefix="lcc-driver-"), "plot": False})
    start_ray(None, None)
    pools: dict = {}
    try:
        lcc_rate, lcc_cpu = ray_capacity(cfg, loaded, "none", Batching(), pools)
        for p in pools.values():
            p.shutdown()
        serve_rate, serve_cpu = ray_serve_rate(loaded.code.base, x[:args.queries].numpy())
    finally:
        ray.shutdown()
    print(f"before: {before}; after: {load_line()}; "
          f"{args.queries} queries offered at once, two replicas of F, batches up to 32\n")
    print(f"bare F loop, one thread: {one:,.0f} queries/s at batch 1, {many:,.0f} at batch {BATCH}\n")
    print("| driver | queries/s | x bare batch 1 | x bare batch 64 | driver CPU (us/query) |\n|---|---:|---:|---:|---:|")
    for name, rate, cpu in (("lcc: Ray Core actors, batched (serve.cluster.runtime.Frontend)", lcc_rate, lcc_cpu),
                            ("Ray Serve: handle + @serve.batch", serve_rate, serve_cpu)):
        print(f"| {name} | {rate:,.0f} | {rate / one:.2f} | {rate / many:.2f} | {cpu:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
