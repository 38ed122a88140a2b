"""Serving throughput at the machine's speed: the bare F loop, then what lcc serves on Ray and over HTTP.

``python -m bench.throughput RUN_FOLDER [--queries N] [--instances M] [--seconds S] [--no-http]``

Prints, in one run on this machine (ratios to the bare loop are what carry to another machine):

* the bare loop: F alone on one thread, queries/s at batch 1 and at batch 64;
* Ray (``python -m serve``'s own frontend, :class:`serve.cluster.runtime.Frontend`): equal-resources and coded at
  capacity, unbatched (``batch_size`` 1, the old runtime) and batched (the defaults), N queries offered at once:
  queries/s served, and the front end's CPU per query (the driver process's CPU time over the run);
* HTTP (``python -m serve.app`` in a subprocess, driven by :func:`serve.web.loadgen.drive` over aiohttp):
  goodput at capacity with one query per request, with JSON and with raw float32 bodies, and with batch
  requests of 32; the server's CPU per query (its process's CPU time) and the client's own; first, the same
  uvicorn + FastAPI stack answering a constant (the HTTP floor on this machine);
* the load average before and after.
"""
from __future__ import annotations

import argparse
import asyncio
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


def ray_capacity(cfg, loaded, strategy: str, batching, pools: dict) -> tuple[float, float]:
    """``(queries/s served, front-end CPU us per query)`` of ``strategy`` with every query offered at once."""
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
    frontend = Frontend(plan, pools[key].actors_for(plan.roles), code, x, pad, batching=batching)
    cpu = time.process_time()
    out = frontend.run()
    cpu = time.process_time() - cpu
    n = len(out.done)
    if not (out.answers == 1).all():
        raise RuntimeError(f"{strategy}: {int((out.answers != 1).sum())} queries not answered exactly once")
    return n / (out.done.max() - out.arrival.min()), 1e6 * cpu / n


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_health(url: str, proc, timeout_s: float = 120.0) -> None:
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
    raise UserError("The service did not answer /health within 120 s.")


CONSTANT_APP = """
import sys, uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from serve.web.edge import server_config
api = FastAPI()
@api.post("/predict")
async def predict(request: Request):
    await request.body()
    return Response(b'{"class": 0}', media_type="application/json")
@api.get("/health")
async def health():
    return Response(b'{}', media_type="application/json")
uvicorn.Server(server_config(api, "127.0.0.1", int(sys.argv[1]), log_level="warning")).run()
"""


def bare_stack_row(x: np.ndarray, seconds: float, port: int) -> tuple:
    """The same uvicorn + FastAPI stack answering a constant: (queries/s, server CPU us/query, client CPU)."""
    from serve.web.loadgen import drive

    proc = subprocess.Popen([sys.executable, "-c", CONSTANT_APP, str(port)], stdout=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, proc)
        server = proc_cpu(proc.pid)
        got = asyncio.run(drive(url, x, kind="raw", per_request=1, seconds=seconds, connections=64))
        server = proc_cpu(proc.pid) - server
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    n = max(got["answered"], 1)
    return got["answered"] / got["seconds"], 1e6 * server / n, 1e6 * got["client_cpu"] / n


QUEUE = 256  # app.max_queue of the measured service: 64 connections of one query, or 8 of 32


def overload(url: str, x: np.ndarray, rate: float, seconds: float) -> tuple:
    """Open loop at ``rate`` (3x the JSON capacity) for ``seconds``: the goodput, and how fast the excess is
    refused (503 with Retry-After, past app.max_queue)."""
    from serve.web.loadgen import encode_body, send_all

    n = int(rate * seconds)
    bodies = [encode_body(x[i % len(x)], "json")[0] for i in range(n)]
    rec = asyncio.run(send_all(url, bodies, np.arange(n) / rate, 4 * QUEUE, 30.0))  # more than the queue admits
    ok, refused = rec["status"] == 200, rec["status"] == 503
    span = np.nanmax(rec["done"][ok]) if ok.any() else seconds
    quick = np.nanmedian(1000 * (rec["done"] - rec["sent"])[refused]) if refused.any() else float("nan")
    return (f"json, offered {rate:,.0f}/s (3x): 503 p50 {quick:.1f} ms", ok.sum() / span, float("nan"),
            float("nan"), int(refused.sum()))


def http_rows(config: Path, run: str, x: np.ndarray, strategy: str, seconds: float, port: int) -> list:
    """Per body kind: (kind, queries/s answered, server CPU us/query, client CPU us/query, 503s)."""
    from serve.web.loadgen import drive

    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "serve.app", str(config), "--set", f"app.strategy={json.dumps(strategy)}",
           "--set", f"app.port={port}", "--set", f"app.max_queue={QUEUE}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    rows = []
    try:
        wait_health(url, proc)
        for kind, per in (("json", 1), ("raw", 1), ("raw", 32)):
            server = proc_cpu(proc.pid)
            got = asyncio.run(drive(url, x, kind=kind, per_request=per, seconds=seconds,
                                    connections=min(64, QUEUE // per)))
            server = proc_cpu(proc.pid) - server
            answered = got["answered"]
            rows.append((f"{kind}, {per} per request", answered / got["seconds"],
                         1e6 * server / max(answered, 1), 1e6 * got["client_cpu"] / max(answered, 1), got["refused"]))
        rows.append(overload(url, x, 3 * rows[0][1], seconds))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def ray_rows(cfg, loaded, one: float) -> None:
    """The Ray table: equal-resources and coded, unbatched and batched."""
    import ray

    from serve.core.batching import UNBATCHED, Batching
    from util.ray_cluster import start_ray

    start_ray(None, None)
    pools: dict = {}
    print("| Ray, all offered at once | batching | queries/s | x bare batch 1 | front-end CPU (us/query) |")
    print("|---|---|---:|---:|---:|")
    try:
        for strategy in ("equal-resources", "coded"):
            for name, batching in (("none", UNBATCHED), ("defaults", Batching())):
                rate, cpu = ray_capacity(cfg, loaded, strategy, batching, pools)
                print(f"| {strategy} | {name} | {rate:,.0f} | {rate / one:.2f} | {cpu:.0f} |", flush=True)
    finally:
        for p in pools.values():
            p.shutdown()
        ray.shutdown()


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder written by train.py (a systematic code, e.g. MNIST k = 2)")
    ap.add_argument("--queries", type=int, default=4000, help="queries offered per Ray row (default 4000)")
    ap.add_argument("--instances", type=int, default=2, help="m (default 2)")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per HTTP row (default 5)")
    ap.add_argument("--port", type=int, default=8931, help="the HTTP service's port (default 8931)")
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP rows")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray rows")
    args = ap.parse_args(argv)
    if args.queries < 100 or args.instances < 1 or args.seconds <= 0:
        raise UserError("--queries must be 100 or more, --instances 1 or more and --seconds positive.")
    if not (Path(args.run) / "config.json").is_file():
        raise UserError(f"'{args.run}' is not a run folder (no config.json). Fix: pass a folder train.py wrote.")
    from coders.code import load_code
    from serve.core.config import validate

    before = load_line()
    loaded = load_code(args.run)
    x, _ = loaded.splits.split("test")
    one, many = bare_loop(loaded.code.base, x)
    print(f"before: {before}\n")
    print(f"bare F loop, one thread: {one:,.0f} queries/s at batch 1, {many:,.0f} at batch {BATCH}\n")
    out = tempfile.mkdtemp(prefix="lcc-throughput-")
    cfg = validate({"runs": [args.run], "rates": [1e6], "num_queries": args.queries, "instances": args.instances,
                    "out_dir": out, "plot": False, "group_timeout_ms": 5.0})
    if not args.no_ray:
        ray_rows(cfg, loaded, one)
    if not args.no_http:
        config = Path(out) / "serve.json"
        config.write_text(json.dumps({"runs": [str(Path(args.run).resolve())], "instances": args.instances,
                                      "num_cpus": os.cpu_count(), "out_dir": out, "group_timeout_ms": 5.0}))
        print("\n| HTTP, one front end | bodies | queries/s | x bare batch 1 | server CPU (us/query) "
              "| client CPU (us/query) | 503s |")
        print("|---|---|---:|---:|---:|---:|---:|")
        xs = x[:1024].numpy()
        rate, server, client = bare_stack_row(xs, args.seconds, args.port + 1)
        print(f"| bare stack: a constant answer | raw, 1 per request | {rate:,.0f} | {rate / one:.2f} | {server:.0f} "
              f"| {client:.0f} | 0 |", flush=True)
        for strategy in ("equal-resources", "coded"):
            for kind, rate, server, client, refused in http_rows(config, args.run, xs, strategy, args.seconds,
                                                                 args.port):
                print(f"| {strategy} | {kind} | {rate:,.0f} | {rate / one:.2f} | {server:.0f} | {client:.0f} "
                      f"| {refused} |", flush=True)
    print(f"\nafter: {load_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
