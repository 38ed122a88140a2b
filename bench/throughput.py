"""Serving throughput at the machine's speed: each figure beside its limit measured in the same run.

``python -m bench.throughput RUN_FOLDER [--queries N] [--instances M] [--seconds S] [--no-http] [--no-ray]
[--unbatched]``

Prints, in one run on this machine (under 5 minutes with the defaults; the ratios carry to another machine):

* the bare loop: F alone on one thread, queries/s at batch 1 and at batch 64 (the limits of the Ray rows);
* Ray (``python -m serve``'s own frontend, :class:`serve.cluster.runtime.Frontend`): equal-resources and coded at
  capacity with the default batching (``--unbatched``: also ``batch_size`` 1, the old runtime), N queries offered
  at once after a warm-up run: queries/s served over the wall time of the run, against the 5,000 queries/s target
  and the bare loop, and the front end's CPU per query (the driver process's CPU time over the run);
* HTTP, each row beside its floor from the same client: the bare stack (the service's own uvicorn server and
  protocol, a plain ASGI app answering a constant after reading the body) for JSON and raw float32 bodies of 1
  and of 32 queries; then ``python -m serve.app`` (equal-resources and coded) with the same bodies: queries/s,
  x the floor, the server's CPU per query against 0.3 ms, the client's own CPU per query, the requests refused
  (503) and failed (any other status, or a broken connection);
* the load generator's own ceiling: requests per CPU-second of the client (:mod:`serve.web.client`) against the
  bare stack, against 5,000 requests/s;
* overload: an open loop offering 3x the JSON row's capacity for S seconds (``app.max_queue`` 256): the goodput
  as a share of that capacity (target 80%), and how fast the excess is refused (503 latency at the client);
* the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from bench.machine_rates import load_line
from util.errors import UserError, exits_on_user_error

BATCH = 64
RAY_TARGET = 5000.0        # queries/s served on Ray (issue 30, MNIST k = 2 on 2 cores)
HTTP_TARGET = 1000.0       # queries/s over HTTP, one query per request, one front end
CPU_TARGET_US = 300.0      # front-end CPU per request over HTTP
CLIENT_TARGET = 5000.0     # requests/s the load generator must be able to drive
GOODPUT_TARGET = 0.8       # share of capacity kept when offered 3x
BODIES = (("json", 1), ("raw", 1), ("raw", 32))
QUEUE = 256  # app.max_queue of the measured service: 64 connections of one query, or 8 of 32


def bare_loop(f: torch.nn.Module, x: torch.Tensor, seconds: float = 1.5) -> tuple[float, float]:
    """Queries/s of F alone on one thread: at batch 1, and at batch ``BATCH``."""
    torch.set_num_threads(1)
    rates = []
    with torch.inference_mode():
        for b in (1, BATCH):
            xb = x[:b]
            f(xb)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                for _ in range(20):
                    f(xb)
                n += 20 * b
            rates.append(n / (time.perf_counter() - t0))
    return rates[0], rates[1]


def ray_capacity(cfg, loaded, strategy: str, batching, pools: dict, warm: bool = True) -> tuple[float, float]:
    """``(queries/s served, front-end CPU us per query)`` of ``strategy`` with every query offered at once: the
    queries over the wall time of :meth:`Frontend.run` (offering them all, to the last answer), and the driver
    process's CPU time over the same span. ``warm``: one unmeasured run first, so the actors' first calls (and
    the pool's start) are not in the figure."""
    from serve.core.plan import build_plan, code_layout, make_queries, pool_roles
    from serve.cluster.runtime import Frontend, Pool

    code = loaded.code
    x, y = loaded.splits.split("test")
    k, r, need = code_layout(code)
    roles = pool_roles(strategy, cfg.instances, k, r)
    key = (roles.count(-1), roles.count(0))
    if key not in pools:
        pools[key] = Pool(code, cfg, key[0], [key[1]] if key[1] else [])
    queries = make_queries(cfg, cfg.rates[0], y.numpy())
    plan = build_plan(cfg, strategy, k, r, queries, cfg.delays[0], 0, need=need)
    with torch.no_grad():
        pad = code.base(torch.zeros(1, *x.shape[1:]))[0]
    for _ in range(2 if warm else 1):
        frontend = Frontend(plan, pools[key].actors_for(plan.roles), code, x, pad, batching=batching)
        cpu, wall = time.process_time(), time.perf_counter()
        out = frontend.run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = len(out.done)
    if not (out.answers == 1).all():
        raise RuntimeError(f"{strategy}: {int((out.answers != 1).sum())} queries not answered exactly once")
    return n / wall, 1e6 * cpu / n


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_health(url: str, proc, timeout_s: float = 180.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise UserError(f"The service exited ({proc.returncode}) before it answered /health.")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise UserError(f"The service did not answer /health within {timeout_s:.0f} s.")


# The floor: the service's own server (uvicorn with serve.web.edge's protocol) and a plain ASGI app that reads
# the body and answers a constant, as serve.web.hotpath answers /predict without the framework.
CONSTANT_APP = """
import sys, uvicorn
from serve.web.edge import server_config
ANSWER = b'{"class": 0}'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]})
    await send({"type": "http.response.body", "body": ANSWER})
uvicorn.Server(server_config(app, "127.0.0.1", int(sys.argv[1]), log_level="warning", access_log=False,
                                  lifespan="off")).run()
"""


def measure(url: str, pid: int, x: np.ndarray, kind: str, per: int, seconds: float, connections: int) -> dict:
    """One closed-loop row against the server ``pid`` at ``url``: its figures, per query."""
    from serve.web.loadgen import drive, run_loop

    server = proc_cpu(pid)
    got = run_loop(drive(url, x, kind=kind, per_request=per, seconds=seconds, connections=connections))
    server = proc_cpu(pid) - server
    n = max(got["answered"], 1)
    return {"rate": got["answered"] / got["seconds"], "server_us": 1e6 * server / n,
            "client_us": 1e6 * got["client_cpu"] / n, "refused": got["refused"], "failed": got["failed"],
            "requests_per_client_cpu_s": got["requests"] / max(got["client_cpu"], 1e-9)}


def serve_process(cmd: list, url: str):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        wait_health(url, proc)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def floor_rows(x: np.ndarray, seconds: float, port: int) -> dict:
    """The bare stack's row for each body kind of :data:`BODIES`."""
    url = f"http://127.0.0.1:{port}"
    proc = serve_process([sys.executable, "-c", CONSTANT_APP, str(port)], url)
    try:
        return {(kind, per): measure(url, proc.pid, x, kind, per, seconds, min(64, QUEUE // per))
                for kind, per in BODIES}
    finally:
        stop(proc)


def overload(url: str, x: np.ndarray, capacity: float, seconds: float) -> dict:
    """Open loop at 3x ``capacity`` (queries/s) for ``seconds``: goodput and how fast the excess is refused."""
    from serve.web.loadgen import offer, run_loop

    got = run_loop(offer(url, x, 3 * capacity, seconds))
    ok, refused = got["status"] == 200, got["status"] == 503
    failed = int((~ok & ~refused).sum())
    quick = float(np.nanmedian(1000 * got["took"][refused])) if refused.any() else float("nan")
    return {"offered": 3 * capacity, "goodput": ok.sum() / got["seconds"], "refused": int(refused.sum()),
            "failed": failed, "refused_p50_ms": quick, "queued": got["queued"],
            "client_us": 1e6 * got["client_cpu"] / max(len(ok), 1)}


def http_rows(config: Path, x: np.ndarray, strategy: str, seconds: float, port: int) -> tuple[dict, dict]:
    """``python -m serve.app`` serving ``strategy``: a row per body kind, then the overload row."""
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serve.app", str(config), "--set", f"app.strategy={json.dumps(strategy)}",
           "--set", f"app.port={port}", "--set", f"app.max_queue={QUEUE}"]
    proc = serve_process(cmd, url)
    try:
        measure(url, proc.pid, x, "raw", 1, min(1.0, seconds), 64)  # warm-up: the actors' first calls
        rows = {(kind, per): measure(url, proc.pid, x, kind, per, seconds, min(64, QUEUE // per))
                for kind, per in BODIES}
        return rows, overload(url, x, rows[("json", 1)]["rate"], seconds)
    finally:
        stop(proc)


def ray_table(cfg, loaded, one: float, many: float, unbatched: bool) -> None:
    """The Ray table: equal-resources and coded at capacity (on the Ray :func:`main` started)."""
    from serve.core.batching import UNBATCHED, Batching

    pools: dict = {}
    print("| Ray, all offered at once | batching | queries/s | x 5,000 target | x bare batch 1 | x bare batch 64 "
          "| front-end CPU (us/query) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    kinds = (("defaults", Batching()),) + ((("none", UNBATCHED),) if unbatched else ())
    try:
        for strategy in ("equal-resources", "coded"):
            for name, batching in kinds:
                rate, cpu = ray_capacity(cfg, loaded, strategy, batching, pools)
                print(f"| {strategy} | {name} | {rate:,.0f} | {rate / RAY_TARGET:.2f} | {rate / one:.2f} "
                      f"| {rate / many:.2f} | {cpu:.0f} |", flush=True)
    finally:
        for p in pools.values():
            p.shutdown()


def http_table(run: str, out: str, instances: int, x: np.ndarray, seconds: float, port: int,
               address: Optional[str]) -> None:
    """The HTTP tables; the services join the Ray at ``address`` (None: each starts its own)."""
    config = Path(out) / "serve.json"
    config.write_text(json.dumps({"runs": [str(Path(run).resolve())], "instances": instances,
                                  "num_cpus": os.cpu_count(), "out_dir": out, "group_timeout_ms": 5.0,
                                  "address": address}))
    floor = floor_rows(x, seconds, port + 1)
    print("\n| HTTP, one front end | bodies | queries/s | x floor | x 1,000 target | server CPU (us/query) "
          "| x 300 us | client CPU (us/query) | 503s | failed |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (kind, per), f in floor.items():
        print(f"| floor: bare stack, a constant answer | {kind}, {per} per request | {f['rate']:,.0f} | 1.00 "
              f"| {f['rate'] / HTTP_TARGET:.2f} | {f['server_us']:.0f} | {f['server_us'] / CPU_TARGET_US:.2f} "
              f"| {f['client_us']:.0f} | {f['refused']} | {f['failed']} |", flush=True)
    overloads = []
    for strategy in ("equal-resources", "coded"):
        rows, over = http_rows(config, x, strategy, seconds, port)
        for (kind, per), r in rows.items():
            f = floor[(kind, per)]
            print(f"| {strategy} | {kind}, {per} per request | {r['rate']:,.0f} | {r['rate'] / f['rate']:.2f} "
                  f"| {r['rate'] / HTTP_TARGET:.2f} | {r['server_us']:.0f} | {r['server_us'] / CPU_TARGET_US:.2f} "
                  f"| {r['client_us']:.0f} | {r['refused']} | {r['failed']} |", flush=True)
        overloads.append((strategy, rows[("json", 1)]["rate"], over))
    ceiling = floor[("raw", 1)]["requests_per_client_cpu_s"]
    print(f"\nload generator ceiling (serve.web.client, one process): {ceiling:,.0f} requests per CPU-second of "
          f"the client against the bare stack, raw 1 per request (x {ceiling / CLIENT_TARGET:.2f} of the "
          f"5,000/s target)")
    print("\n| overload, JSON 1 per request | capacity (q/s) | offered (q/s) | goodput (q/s) | goodput x capacity "
          "| x 80% target | 503s | 503 p50 at the client (ms) | failed | client CPU (us/request) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for strategy, capacity, o in overloads:
        share = o["goodput"] / capacity
        print(f"| {strategy} | {capacity:,.0f} | {o['offered']:,.0f} | {o['goodput']:,.0f} | {share:.2f} "
              f"| {share / GOODPUT_TARGET:.2f} | {o['refused']} | {o['refused_p50_ms']:.1f} | {o['failed']} "
              f"| {o['client_us']:.0f} |", flush=True)


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder written by train.py (a systematic code, e.g. MNIST k = 2)")
    ap.add_argument("--queries", type=int, default=4000, help="queries offered per Ray row (default 4000)")
    ap.add_argument("--instances", type=int, default=2, help="m (default 2)")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per HTTP row (default 3)")
    ap.add_argument("--port", type=int, default=8931, help="the HTTP service's port (default 8931; the floor's "
                    "is the next)")
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP rows")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray rows")
    ap.add_argument("--unbatched", action="store_true", help="also the Ray rows with batch_size 1 (the old runtime)")
    args = ap.parse_args(argv)
    if args.queries < 100 or args.instances < 1 or args.seconds <= 0:
        raise UserError("--queries must be 100 or more, --instances 1 or more and --seconds positive.")
    if not (Path(args.run) / "config.json").is_file():
        raise UserError(f"'{args.run}' is not a run folder (no config.json). Fix: pass a folder train.py wrote.")
    from coders.code import load_code
    from serve.core.config import validate

    before, t0 = load_line(), time.perf_counter()
    loaded = load_code(args.run)
    x, _ = loaded.splits.split("test")
    one, many = bare_loop(loaded.code.base, x)
    print(f"before: {before}\n")
    print(f"bare F loop, one thread: {one:,.0f} queries/s at batch 1, {many:,.0f} at batch {BATCH}\n")
    out = tempfile.mkdtemp(prefix="lcc-throughput-")
    cfg = validate({"runs": [args.run], "rates": [1e6], "num_queries": args.queries, "instances": args.instances,
                    "out_dir": out, "plot": False, "group_timeout_ms": 5.0})
    import ray

    from util.ray_cluster import start_ray

    start_ray(None, None)  # one Ray for the whole run: the HTTP services join it rather than start their own
    try:
        if not args.no_ray:
            ray_table(cfg, loaded, one, many, args.unbatched)
        if not args.no_http:
            http_table(args.run, out, args.instances, x[:1024].numpy(), args.seconds, args.port,
                       ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
    print(f"\nafter: {load_line()}; {time.perf_counter() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
