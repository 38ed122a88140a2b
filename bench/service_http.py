"""The HTTP service end to end, beside the benchmark for the same plan; and one front end's capacity.

``python -m bench.service_http CONFIG.json [--out DIR] [--set KEY=VALUE ...]``
    For each of the config's ``strategies``: starts ``python -m serve.app`` on
    it (a fresh process and Ray, ``app.strategy`` set), sends the benchmark's
    seeded queries with the load generator (``python -m serve.loadgen``), stops
    it with Ctrl-C; then runs ``python -m serve`` on the same config (unless
    ``--bench-dir`` names a finished run of it). Prints per strategy the
    benchmark's and the service's p50 / p99 / p99.9, served top-1, the HTTP
    layer's own cost (client latency minus the server's, median and p99),
    how much of the benchmark's p99.9 advantage of ``coded`` over
    ``equal-resources`` survives end to end, and the machine's load.

``python -m bench.service_http CONFIG.json --capacity 50,100,200,400 [--frontends N] [--set app.strategy=coded]``
    One service (``app.strategy``), no injected delay, the load generator at
    each rate in turn: the highest rate before the front end's p99 doubles
    from its value at the first (lowest) rate. With ``--frontends N``, N
    front ends share one pool of instances (``app.pool_name``) and the load
    generator's queries take turns among them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.machine_rates import load_line
from serve.core.config import app_config, load_serve_config
from serve.web.loadgen import run as loadgen
from coders.config import parse_overrides
from util.errors import UserError, exits_on_user_error

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """``python -m serve.app`` in a child process, stopped with Ctrl-C (SIGINT) on exit."""

    def __init__(self, config: str, sets: list[str], log: Path):
        self.port = free_port()
        args = [sys.executable, "-m", "serve.app", config, *sum((["--set", s] for s in sets), []),
                "--set", f"app.port={self.port}"]
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log, "w")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        try:
            return self._wait_healthy()
        except BaseException:  # Ctrl-C or no start: stop the child too
            self.__exit__()
            raise

    def _wait_healthy(self):
        import httpx

        deadline = time.time() + 900
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"The service exited with code {self.proc.returncode}; see {self.log.name}.")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise UserError(f"The service did not come up within 900 s; see {self.log.name}.")

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shared_ray(cfg, sets: list[str]) -> list[str]:
    """Start one local Ray here for every service and the benchmark (a busy machine's Ray start is slow and
    sometimes times out: retried); the services join it. Returns ``sets`` with its address."""
    import ray

    from util.ray_cluster import start_ray

    if cfg.address:
        return sets
    for attempt in range(3):
        try:
            start_ray(None, cfg.num_cpus)
            break
        except Exception:  # Ray's own start-up timeout is a bare Exception
            ray.shutdown()
            if attempt == 2:
                raise
    return sets + [f"address={json.dumps(ray.get_runtime_context().gcs_address)}"]


def compare(config: str, sets: list[str], out: Path, bench_dir: str | None, connections: int) -> int:
    overrides = parse_overrides(sets)
    cfg = load_serve_config(config, overrides)
    sets = shared_ray(cfg, sets)
    loads = [load_line()]
    http = {}
    for strategy in cfg.strategies:
        with Service(config, sets + [f"app.strategy={strategy}"], out / "logs" / f"{strategy}.log") as svc:
            summary, = loadgen(cfg, svc.url, out / "http", connections, 120.0)[:1]
            http[strategy] = summary
        loads.append(load_line())
    if bench_dir is None:
        from serve.cli import serve_all

        bench_cfg = load_serve_config(config, {**overrides, "out_dir": str(out / "bench")})
        with open(out / "logs" / "bench.log", "w") as log:
            serve_all(bench_cfg, out=log)
        bench_dir = str(out / "bench")
        loads.append(load_line())
    app = app_config(cfg)
    setting = next(p for p in sorted(Path(bench_dir).glob("*/setting.json"))
                   if json.loads(p.read_text())["run"] == cfg.runs[app.run])
    bench = {s: json.loads((setting.parent / s / "summary.json").read_text()) for s in cfg.strategies
             if (setting.parent / s / "summary.json").is_file()}
    print(f"config {config} {' '.join(sets)}: {cfg.num_queries} queries per strategy at {cfg.rates[0]:g}/s, "
          f"{json.loads(setting.read_text())['describe']}")
    print("| strategy | bench p50 | bench p99 | bench p99.9 | HTTP p50 | HTTP p99 | HTTP p99.9 | bench top-1 | "
          "HTTP top-1 | HTTP rebuilt | HTTP layer p50 | HTTP layer p99 | failed |")
    print("|---|" + "---:|" * 12)
    for s in cfg.strategies:
        b, h = bench.get(s, {}), http[s]
        print(f"| {s} | {b.get('p50_ms', float('nan')):.1f} | {b.get('p99_ms', float('nan')):.1f} | "
              f"{b.get('p99.9_ms', float('nan')):.1f} | {h['p50_ms']:.1f} | {h['p99_ms']:.1f} | {h['p99.9_ms']:.1f} | "
              f"{b.get('accuracy', float('nan')):.2%} | {h['accuracy']:.2%} | {h['reconstructed']:.1%} | "
              f"{h['http_p50_ms']:.2f} | {h['http_p99_ms']:.2f} | {h['failed']} |")
    if {"coded", "equal-resources"} <= set(bench) and {"coded", "equal-resources"} <= set(http):
        gain_b = bench["equal-resources"]["p99.9_ms"] - bench["coded"]["p99.9_ms"]
        gain_h = http["equal-resources"]["p99.9_ms"] - http["coded"]["p99.9_ms"]
        kept = gain_h / gain_b if gain_b > 0 else float("nan")
        print(f"\np99.9 advantage of coded over equal-resources: benchmark {gain_b:.1f} ms, over HTTP {gain_h:.1f} ms "
              f"({kept:.0%} kept)")
    print("machine: " + "; ".join(loads))
    return 0


def capacity(config: str, sets: list[str], out: Path, rates: list[float], connections: int,
             frontends: int = 1) -> int:
    overrides = {**parse_overrides(sets), "delays": [{"dist": "none"}], "rates": rates, "warmup_queries": 20}
    sets = sets + ['delays=[{"dist": "none"}]']
    if frontends > 1:  # every front end attaches to the pool the first one starts
        sets = sets + [f"app.pool_name=capacity-{os.getpid()}"]
    cfg = load_serve_config(config, overrides)
    sets = shared_ray(cfg, sets)
    app = app_config(cfg)
    before = load_line()
    with contextlib.ExitStack() as stack:  # the first (the pool's starter) stops last
        svcs = [stack.enter_context(Service(config, sets, out / "logs" / f"capacity-{app.strategy}-{i}.log"))
                for i in range(frontends)]
        cpu0, client0 = sum(cpu_seconds(s.proc.pid) for s in svcs), time.process_time()
        summaries = loadgen(cfg, [s.url for s in svcs], out / "capacity", connections, 120.0,
                            stream=open(os.devnull, "w"))
        cpu, client = sum(cpu_seconds(s.proc.pid) for s in svcs) - cpu0, time.process_time() - client0
    per_query = 1000.0 * cpu / (cfg.num_queries * len(rates))
    base = summaries[0]["p99_ms"]
    print(f"config {config} {' '.join(sets)}: strategy {app.strategy}, {cfg.num_queries} queries per rate, "
          f"no injected delay, {frontends} front end{'s sharing one pool' if frontends > 1 else ''}")
    print("| rate (q/s) | achieved (q/s) | p50 (ms) | p99 (ms) | server p99 (ms) | HTTP layer p99 (ms) | failed |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    sustained, ok = rates[0], True
    for rate, s in zip(rates, summaries):
        print(f"| {rate:g} | {s['throughput']:.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['server_p99_ms']:.1f} | "
              f"{s['http_p99_ms']:.1f} | {s['failed']} |")
        ok = ok and s["p99_ms"] <= 2 * base and s["failed"] == 0
        sustained = rate if ok else sustained
    print(f"\ncapacity: {sustained:g} queries/s is the highest rate whose p99 stays within twice the "
          f"{rates[0]:g} q/s p99 ({base:.1f} ms)")
    print(f"front end CPU: {per_query:.2f} ms per query (the service processes: HTTP, dispatch, encode, decode, Ray "
          f"client), so one quiet core would carry about {1000 / per_query:.0f} queries/s; the load generator used "
          f"{1000.0 * client / (cfg.num_queries * len(rates)):.2f} ms per query")
    print(f"machine: {before}; {load_line()}")
    return 0


@exits_on_user_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.service_http", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="serving config, e.g. conf/serve/digits.json")
    ap.add_argument("--out", default="serve_results/service_http", help="results folder")
    ap.add_argument("--bench-dir", default=None, help="a finished python -m serve run of the config (its out_dir)")
    ap.add_argument("--capacity", default=None, help="comma-separated rising rates: measure capacity instead")
    ap.add_argument("--frontends", type=int, default=1, help="with --capacity: front ends sharing one pool "
                    "(app.pool_name), the queries taking turns among them (default 1)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.capacity:
        try:
            rates = [float(r) for r in args.capacity.split(",")]
        except ValueError:
            raise UserError(f"--capacity takes comma-separated rates such as 50,100,200; got {args.capacity!r}.")
        if args.frontends < 1:
            raise UserError(f"--frontends must be 1 or more; got {args.frontends}.")
        return capacity(args.config, args.sets, out, rates, args.connections, args.frontends)
    return compare(args.config, args.sets, out, args.bench_dir, args.connections)


if __name__ == "__main__":
    sys.exit(main())
