"""``python -m serve.loadgen CONFIG.json [--url URL ...] [--set KEY=VALUE ...]``: a real client of the service.

Sends the benchmark's seeded queries (:func:`serve.core.plan.make_queries`: the
config's ``seed``, ``num_queries``, each of ``rates``, images from ``split``
of the served run's dataset) to ``POST /predict`` over HTTP, open loop: each
query leaves at its Poisson arrival time whether or not earlier ones have
been answered, over a pool of up to ``--connections`` connections (aiohttp, asyncio: one process drives
thousands of requests/s; :func:`drive` is the closed-loop capacity driver bench/throughput.py uses).
Latency is measured at the client, from the query's arrival to its answer.

It writes what ``python -m serve`` writes, under ``--out`` (default
``out_dir/http``): ``<setting>/<strategy>/queries.csv`` and ``summary.json``,
``<setting>/setting.json`` and ``<setting>/cdf.png`` (every strategy measured
so far in that setting), so ``python -m serve.report`` reads both. The
strategy is the service's own (``GET /health``): run the service once per
strategy and the load generator against each. Several ``--url``: front ends
of one shared pool (``app.pool_name``), query i going to the (i mod N)-th.
``http.csv`` adds, per query,
the HTTP status, the client's and the server's latency, and their difference:
the HTTP layer's own cost.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from serve.core.config import ServeConfig, app_config, expand_settings, load_serve_config
from serve.core.plan import make_queries
from serve.core.results import Outcome, markdown_table, plot_cdf, summarize, write_strategy
from coders.config import parse_overrides
from util.errors import UserError, exits_on_user_error
from util.files import atomic_write_text


def load_split(cfg: ServeConfig, run: str):
    """``(inputs, labels)`` of the config's split of ``run``'s dataset, as the run's seed carved it."""
    from datasets import load_dataset
    from coders.config import expand_runs, load_run_folder

    run_cfg, _ = load_run_folder(run)
    (spec,) = expand_runs(run_cfg)
    splits = load_dataset(spec.dataset, cfg.data_dir or run_cfg.data_dir, False, run_cfg.val_size, run_cfg.seed)
    return splits.split(cfg.split)


def connector(connections: int):
    """aiohttp's pooled connector: at most ``connections`` open, kept alive, no per-request DNS look-up."""
    import aiohttp

    return aiohttp.TCPConnector(limit=connections, limit_per_host=connections, ttl_dns_cache=3600,
                                force_close=False, enable_cleanup_closed=False)


async def send_all(urls, bodies: list, arrival: np.ndarray, connections: int, timeout_s: float) -> dict:
    """POST ``bodies[i]`` at ``arrival[i]`` seconds from now (open loop) to ``urls[i % len(urls)]`` (one URL, or
    several front ends taking turns); per query: status, times, answer. aiohttp with a pool of ``connections``
    (an httpx client tops out near 150 requests/s on a 2-core machine, so it would measure itself)."""
    import aiohttp
    import orjson

    urls = [urls] if isinstance(urls, str) else list(urls)
    n = len(bodies)
    rec = {"status": np.zeros(n, dtype=int), "sent": np.full(n, np.nan), "done": np.full(n, np.nan),
           "server_ms": np.full(n, np.nan), "rebuilt": np.zeros(n, dtype=bool), "retried": np.zeros(n, dtype=bool),
           "predicted": np.full(n, -1), "reason": [""] * n}
    headers = {"Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector(connections), timeout=timeout) as session:
        t0 = time.perf_counter()
        targets = [u.rstrip("/") + "/predict" for u in urls]

        async def one(i: int) -> None:
            rec["sent"][i] = time.perf_counter() - t0
            try:
                async with session.post(targets[i % len(targets)], data=bodies[i], headers=headers) as resp:
                    status, raw = resp.status, await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                rec["reason"][i] = f"{type(exc).__name__}: {exc}"
                return
            rec["done"][i] = time.perf_counter() - t0
            rec["status"][i] = status
            if status == 200:
                body = orjson.loads(raw)
                rec["server_ms"][i] = body["latency_ms"]
                rec["rebuilt"][i], rec["retried"][i] = body["rebuilt"], body["retried"]
                rec["predicted"][i] = body.get("class", -1)
            else:
                rec["reason"][i] = raw[:200].decode("utf-8", "replace")

        tasks = []
        for i in range(n):
            wait = arrival[i] - (time.perf_counter() - t0)
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return rec


def encode_body(x: np.ndarray, kind: str) -> tuple[bytes, dict]:
    """One request's body and headers: ``x`` (one input, or a batch) as JSON numbers, raw float32 (the shape in
    ``X-Shape``) or .npy."""
    import orjson

    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind == "json":
        return orjson.dumps(x.tolist()), {"Content-Type": "application/json"}
    if kind == "raw":
        return x.tobytes(), {"Content-Type": "application/octet-stream", "X-Shape": ",".join(map(str, x.shape))}
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue(), {"Content-Type": "application/x-npy"}


async def drive(url: str, x: np.ndarray, kind: str = "raw", per_request: int = 1, seconds: float = 5.0,
                connections: int = 64) -> dict:
    """Closed loop at capacity: ``connections`` clients each POST back to back for ``seconds`` (``per_request`` 1:
    /predict, else /predict/batch with that many inputs), cycling through the inputs ``x``, over the lean client
    (:mod:`serve.web.client`). Returns the queries answered, the requests refused (503) and failed (any other
    status, or a broken connection), the requests sent, the seconds, and this client's own CPU seconds (so that
    client and server cost are not confused)."""
    from serve.web.client import Client, request_bytes

    shape = x.shape[1:]
    path = "/predict" if per_request == 1 else "/predict/batch"
    host = url.split("//", 1)[-1].rstrip("/")
    requests = []
    for i in range(0, max(len(x) - per_request + 1, 1), per_request):
        chunk = x[i:i + per_request]
        body, headers = encode_body(chunk[0] if per_request == 1 else chunk.reshape(len(chunk), *shape), kind)
        requests.append(request_bytes(host, path, body, headers))
    counts = {"answered": 0, "refused": 0, "failed": 0, "requests": 0}
    client = Client(url, connections)
    stop = time.perf_counter() + seconds

    async def one(c: int) -> None:
        i = c
        while time.perf_counter() < stop:
            data = requests[i % len(requests)]
            i += connections
            counts["requests"] += 1
            try:
                status, _ = await client.post(data)
            except OSError:
                counts["failed"] += 1
                await asyncio.sleep(0.01)
                continue
            if status == 200:
                counts["answered"] += per_request
            elif status == 503:
                counts["refused"] += 1
            else:
                counts["failed"] += 1

    cpu, t0 = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*[one(c) for c in range(connections)])
    finally:
        client.close()
    return {**counts, "seconds": time.perf_counter() - t0, "client_cpu": time.process_time() - cpu}


async def offer(url: str, x: np.ndarray, rate: float, seconds: float, kind: str = "json",
                connections: int = 1024) -> dict:
    """Open loop: one query per request at ``rate`` a second for ``seconds``, each sent at its time whether or not
    earlier ones were answered (up to ``connections`` at once; more wait in the client, counted as ``queued``).
    Returns per request its status (0: failed) and seconds from its send to its answer, the seconds from the
    first send to the last answer, and this client's CPU seconds."""
    from serve.web.client import Client, request_bytes

    host = url.split("//", 1)[-1].rstrip("/")
    n = max(1, int(rate * seconds))
    requests = [request_bytes(host, "/predict", *encode_body(x[i % len(x)], kind)) for i in range(min(n, len(x)))]
    status, took = np.zeros(n, dtype=int), np.full(n, np.nan)
    client = Client(url, connections)
    queued = 0

    async def one(i: int) -> None:
        nonlocal queued
        start = time.perf_counter()
        queued += client.opened >= client.limit and not client.free
        try:
            status[i], _ = await client.post(requests[i % len(requests)])
        except OSError:
            return
        took[i] = time.perf_counter() - start

    cpu, t0 = time.process_time(), time.perf_counter()
    tasks = []
    try:
        for i in range(n):
            wait = i / rate - (time.perf_counter() - t0)
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
    finally:
        client.close()
    return {"status": status, "took": took, "seconds": time.perf_counter() - t0, "queued": queued,
            "client_cpu": time.process_time() - cpu}


def run_loop(coro):
    """``asyncio.run`` on uvloop when it is installed (a load generator's own cost is what it cannot measure)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def http_csv(rec: dict, arrival: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["query", "status", "arrival_s", "sent_s", "completion_s", "client_ms", "server_ms", "http_ms",
                "reason"])
    for i in range(len(arrival)):
        client = 1000 * (rec["done"][i] - rec["sent"][i])
        w.writerow([i, int(rec["status"][i]), f"{arrival[i]:.6f}", f"{rec['sent'][i]:.6f}", f"{rec['done'][i]:.6f}",
                    f"{client:.3f}", f"{rec['server_ms'][i]:.3f}", f"{client - rec['server_ms'][i]:.3f}",
                    rec["reason"][i]])
    return buf.getvalue()


def health(url: str) -> dict:
    import httpx

    try:
        resp = httpx.get(url.rstrip("/") + "/health", timeout=10)
        return resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise UserError(f"No lcc service answers at {url} ({type(exc).__name__}). Fix: start one with python -m "
                        f"serve.web.app CONFIG.json, and pass its address with --url.") from None


def layer_percentiles(rec: dict, ok: np.ndarray) -> dict:
    """p50 and p99 (ms) of the answered queries' server-measured latency and of what HTTP added to it."""
    http = (rec["done"] - rec["sent"]) * 1000 - rec["server_ms"]
    return {"server_p50_ms": float(np.nanpercentile(rec["server_ms"][ok], 50)),
            "server_p99_ms": float(np.nanpercentile(rec["server_ms"][ok], 99)),
            "http_p50_ms": float(np.nanpercentile(http[ok], 50)),
            "http_p99_ms": float(np.nanpercentile(http[ok], 99))}


def run(cfg: ServeConfig, url, out: Path, connections: int, timeout_s: float, stream=None) -> list[dict]:
    """Measure every rate of the config against the service at ``url`` (or front ends of one service taking turns:
    a list of URLs); returns the summaries."""
    stream = stream or sys.stdout
    app = app_config(cfg)
    urls = [url] if isinstance(url, str) else list(url)
    states = [health(u) for u in urls]
    state = states[0]
    for u, other in zip(urls[1:], states[1:]):
        if (other["strategy"], other.get("input_shape"), other["k"], other["r"]) != (
                state["strategy"], state.get("input_shape"), state["k"], state["r"]):
            raise UserError(f"The front ends at {urls[0]} and {u} serve different things (strategy "
                            f"{state['strategy']} vs {other['strategy']}, k={state['k']}/{other['k']}, "
                            f"r={state['r']}/{other['r']}). Fix: pass the --url of front ends of one service.")
    url = " ".join(urls)
    strategy = state["strategy"]
    run_folder = cfg.runs[app.run]
    x, y = load_split(cfg, run_folder)
    if list(x.shape[1:]) != state.get("input_shape", list(x.shape[1:])):
        raise UserError(f"The service at {url} takes inputs of shape {state['input_shape']}, but the config's run "
                        f"'{run_folder}' has {list(x.shape[1:])}. Fix: point the load generator at the same config.")
    delay = cfg.delays[app.delay]
    summaries = []
    for setting in expand_settings(cfg):
        if setting.run != run_folder or setting.delay != delay:
            continue
        queries = make_queries(cfg, setting.rate, y.numpy())
        bodies = [encode_body(x[i].flatten().numpy(), "json")[0] for i in queries.index]
        print(f"== {setting.name}: {setting.describe()} -> {url} ({strategy}, {len(bodies)} queries)",
              file=stream, flush=True)
        rec = asyncio.run(send_all(urls, bodies, queries.arrival, connections, timeout_s))
        ok = rec["status"] == 200
        folder = out / setting.name
        outcome = Outcome(queries.arrival[ok], rec["done"][ok], rec["rebuilt"][ok], rec["retried"][ok],
                              rec["predicted"][ok], queries.label[ok], queries.index[ok])
        if not ok.any():
            raise UserError(f"The service at {url} answered none of {len(ok)} queries (first reply: "
                            f"{rec['reason'][0] or rec['status'][0]}). Fix: see the service's output.")
        summary = summarize(outcome, strategy, int(state["instances"]), min(cfg.warmup_queries, int(ok.sum()) - 1))
        summary.update({"transport": "http", "url": url, "sent": int(len(ok)), "failed": int((~ok).sum()),
                        "status_counts": {str(s): int(c) for s, c in zip(*np.unique(rec["status"], return_counts=True))},
                        **layer_percentiles(rec, ok)})
        write_strategy(folder / strategy, outcome, summary)
        atomic_write_text(http_csv(rec, queries.arrival), folder / strategy / "http.csv")
        write_setting(folder, setting, cfg, strategy, url)
        summaries.append(summary)
        print(f"  {strategy}: p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms, p99.9 "
              f"{summary['p99.9_ms']:.1f} ms, rebuilt {summary['reconstructed']:.1%}, top-1 {summary['accuracy']:.2%}, "
              f"HTTP layer p50 {summary['http_p50_ms']:.2f} ms / p99 {summary['http_p99_ms']:.2f} ms, "
              f"{summary['failed']} failed", file=stream, flush=True)
    print(markdown_table(summaries), file=stream, flush=True)
    return summaries


def write_setting(folder: Path, setting, cfg: ServeConfig, strategy: str, url: str) -> None:
    """setting.json naming every strategy measured here so far, and the CDF of all of them."""
    path = folder / "setting.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    strategies = [s for s in old.get("strategies", []) if s != strategy] + [strategy]
    record = {"name": setting.name, "describe": setting.describe() + " | over HTTP", "run": setting.run,
              "rate": setting.rate, "delay": setting.delay, "strategies": strategies, "engine": "http", "url": url,
              "seed": cfg.seed, "num_queries": cfg.num_queries, "instances": cfg.instances}
    atomic_write_text(json.dumps(record, indent=2) + "\n", path)
    if cfg.plot:
        curves = {}
        for s in strategies:
            with open(folder / s / "queries.csv", newline="") as fh:
                curves[s] = np.array([float(r["latency_ms"]) for r in csv.DictReader(fh)])[cfg.warmup_queries:]
        plot_cdf(curves, folder / "cdf.png", record["describe"])


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve.loadgen", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="the service's JSON serving config, e.g. conf/serve/digits.json")
    ap.add_argument("--url", action="append", default=None, help="the service (default: http://app.host:app.port "
                    "of the config); repeat it for several front ends sharing one pool (app.pool_name): queries take turns")
    ap.add_argument("--out", default=None, help="results folder (default: the config's out_dir + '/http')")
    ap.add_argument("--connections", type=int, default=64, help="most connections open at once (default 64)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a query may take before it counts as "
                    "failed (default 60)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (VALUE in JSON), e.g. --set rates=[20,40]")
    args = ap.parse_args(argv)
    if args.connections < 1 or args.timeout <= 0:
        raise UserError("--connections must be 1 or more and --timeout positive; got "
                        f"{args.connections} and {args.timeout}.")
    cfg = load_serve_config(args.config, parse_overrides(args.overrides))
    app = app_config(cfg)
    url = args.url or [f"http://{app.host}:{app.port}"]
    run(cfg, url, Path(args.out or Path(cfg.out_dir) / "http"), args.connections, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
