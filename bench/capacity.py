"""Capacity at the p99 criterion, then the coded tail at 0.5 and 0.7 of it: on Ray, over HTTP, and in the simulator.

``python -m bench.capacity RUN_FOLDER [--quick [--http]] [--config conf/serve/mnist_k2.json] [--no-http]
[--engine sim] [--out DIR] [--set KEY=VALUE]``

With the serving config's straggler model (its first ``delays`` entry: in ``conf/serve/mnist_k2.json`` 2% of
requests held 100 ms + Exp(200 ms)), its instances and its batching keys, for the systematic code in RUN_FOLDER:

1. **Capacity**, per strategy and path: the highest offered rate at which p99 stays within 2x the strategy's
   p99 at a light load (``--light`` queries/s), with at least 99% of queries answered. Open-loop seeded Poisson
   arrivals (:func:`serve.core.plan.make_queries`); the rate doubles from the light one until a probe fails,
   then the interval is halved (geometrically) twice, not at all with ``--quick`` (:func:`search_capacity`).
   On Ray through ``python -m serve``'s own code path (:func:`serve.cli.serve_setting`); over HTTP through
   ``python -m serve.app`` in a subprocess and the aiohttp load generator (:func:`serve.web.loadgen.run`,
   JSON bodies, one query a request).
2. **The tail at 0.5 and 0.7 of capacity** for equal-resources, replicate and coded, at the same offered rates:
   fractions of equal-resources' capacity on that path (the uncoded service of the same instances, what an
   operator sizes by; each strategy's own fraction is printed beside it):
   p50 / p99 / p99.9, served top-1 and the uncoded top-1 (equal-resources': F's own answer for every query),
   latency CDFs (``OUT/<path>/cdf_<fraction>.png``), against the targets coded p99.9 <= 0.5x equal-resources'
   and coded top-1 within 0.5 points of uncoded.
3. **The simulator against Ray** at those rates: each Ray run's own ``profile.csv`` (compute, response
   overhead and the a + b x batch call cost it measured) drives ``"engine": "sim"`` on the same plan;
   sim p99 / Ray p99 per strategy and rate, against the 15% target.

Every figure is printed as markdown, with the load average before and after; a capacity found at the highest
rate tried is marked ">=". A straggler holds its instance (a slow server), so stragglers take capacity: the
capacity is measured under them, or 0.7 of it would be past overload.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from bench.machine_rates import load_line
from util.errors import UserError, exits_on_user_error

FACTOR = 2.0      # capacity: p99 within FACTOR x the light-load p99 ...
ANSWERED = 0.99   # ... with at least this share of the offered queries answered
COMPARED = ("equal-resources", "replicate", "coded")
FRACTIONS = (0.5, 0.7)
TARGET_TAIL, TARGET_POINTS, TARGET_SIM = 0.5, 0.5, 0.15


@dataclass(frozen=True)
class Sizes:
    """How much each measurement offers: a probe at rate x holds max(min_queries, x * probe_s) queries."""

    light_queries: int = 600
    probe_s: float = 2.0
    min_queries: int = 300
    refine: int = 2
    compare_queries: int = 2000
    strategies: tuple = ("none",) + COMPARED
    http_strategies: tuple = COMPARED


QUICK = Sizes(light_queries=200, probe_s=0.8, min_queries=150, refine=0, compare_queries=400,
              strategies=("equal-resources", "coded"), http_strategies=("equal-resources", "coded"))


def probe_queries(sizes: Sizes, rate: float) -> int:
    return int(max(sizes.min_queries, rate * sizes.probe_s))


def search_capacity(probe: Callable[[float], tuple], light_rate: float, factor: float = FACTOR, refine: int = 2,
                    grow: float = 2.0, max_rate: float = 1e5) -> dict:
    """The highest offered rate whose p99 is within ``factor`` x the p99 at ``light_rate``.

    ``probe(rate) -> (p99_ms, answered share)``. The rate grows by ``grow`` from ``light_rate`` until a probe
    fails (p99 above the limit, or fewer than ``ANSWERED`` answered), then ``refine`` geometric bisections of the
    interval between the last rate that passed and the first that failed. Returns the capacity, whether a
    failing rate bounded it (False: it passed up to ``max_rate``), the light p99, the limit and every probe
    ``(rate, p99_ms, answered, passed)`` in order."""
    light_p99, answered = probe(light_rate)
    if answered < ANSWERED:
        raise UserError(f"At the light load of {light_rate:g} queries/s only {answered:.1%} of queries were answered. "
                        f"Fix: a lower --light rate.")
    limit = factor * light_p99
    probes = [(light_rate, light_p99, answered, True)]

    def passes(rate: float) -> bool:
        p99, share = probe(rate)
        ok = p99 <= limit and share >= ANSWERED
        probes.append((rate, p99, share, ok))
        return ok

    good, bad = light_rate, None
    while bad is None and good * grow <= max_rate:
        rate = good * grow
        if passes(rate):
            good = rate
        else:
            bad = rate
    for _ in range(refine if bad is not None else 0):
        mid = math.sqrt(good * bad)
        if passes(mid):
            good = mid
        else:
            bad = mid
    return {"capacity": good, "bounded": bad is not None, "light_p99_ms": light_p99, "limit_ms": limit,
            "probes": probes}


def answered_share(summary: dict) -> float:
    sent = summary.get("sent")
    return 1.0 if not sent else 1.0 - summary.get("failed", 0) / sent


def latencies(folder: Path) -> np.ndarray:
    with open(folder / "queries.csv", newline="") as fh:
        return np.array([float(r["latency_ms"]) for r in csv.DictReader(fh)])


# -- the paths ------------------------------------------------------------------------------------------------
class ServePath:
    """Measurements through ``python -m serve``'s code path: on Ray (one pool of actors for every strategy), or
    in the simulator when the config's ``engine`` is ``"sim"``."""

    light_together = True

    def __init__(self, cfg, loaded, out: Path):
        self.cfg, self.loaded, self.out = cfg, loaded, out
        self.name = "Ray" if cfg.engine == "ray" else "simulator"
        self.ours = False
        if cfg.engine == "ray":
            from util.ray_cluster import start_ray

            self.ours = start_ray(cfg.address, cfg.num_cpus)
        self.pools: dict = {}
        self.folders: dict = {}

    def measure(self, strategies, rate: float, n: int, tag: str, plot: bool = False) -> dict:
        """Serve ``n`` queries at ``rate`` under each of ``strategies`` (one setting): ``{strategy: summary}``."""
        from serve.cli import serve_setting
        from serve.core.config import expand_settings

        c = replace(self.cfg, strategies=list(strategies), rates=[rate], num_queries=n,
                    warmup_queries=min(50, n // 10), out_dir=str(self.out / tag), plot=plot)
        setting = expand_settings(c)[0]
        with open(os.devnull, "w") as quiet:
            _, summaries = serve_setting(c, setting, self.loaded, self.pools, quiet)
        folder = Path(c.out_dir) / setting.name
        for s in strategies:
            self.folders[(s, tag)] = (c, setting, folder)
        return {s["strategy"]: s for s in summaries}

    def measure_rates(self, strategies, rates: list, n: int) -> dict:
        """``{tag: {strategy: summary}}`` for each ``(rate, tag)``: every strategy at one rate, then the next."""
        return {tag: self.measure(strategies, rate, n, tag) for rate, tag in rates}

    def simulate(self, strategy: str, tag: str) -> dict:
        """The same plan in the simulator, its compute and response overhead drawn from this run's profile (every
        strategy of the setting, in its order: a strategy's straggler draws follow its place in the list)."""
        from serve.cli import serve_setting

        c, setting, folder = self.folders[(strategy, tag)]
        if ("sim", tag) not in self.folders:
            sim = replace(c, engine="sim", profile=str(folder / "profile.csv"), out_dir=str(self.out / "sim" / tag))
            with open(os.devnull, "w") as quiet:
                _, summaries = serve_setting(sim, setting, self.loaded, {}, quiet)
            self.folders[("sim", tag)] = {s["strategy"]: s for s in summaries}
        return self.folders[("sim", tag)][strategy]

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown()
        if self.ours:
            from util.ray_cluster import stop_ray

            stop_ray()


class HttpPath:
    """Measurements over HTTP: ``python -m serve.app`` in a subprocess (one per strategy), the aiohttp client."""

    name = "HTTP"
    light_together = False

    def __init__(self, cfg, raw: dict, out: Path, port: int):
        self.cfg, self.out, self.port = cfg, out, port
        self.url = f"http://127.0.0.1:{port}"
        self.config = out / "service.json"
        out.mkdir(parents=True, exist_ok=True)
        self.config.write_text(json.dumps({**raw, "num_cpus": os.cpu_count(),
                                           "app": {**raw.get("app", {}), "port": port, "max_queue": 100_000}}))
        self.proc, self.strategy = None, None

    def serve(self, strategy: str) -> None:
        from bench.throughput import wait_health

        if self.strategy == strategy:
            return
        self.stop()
        cmd = [sys.executable, "-m", "serve.app", str(self.config), "--set", f"app.strategy={json.dumps(strategy)}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONPATH": os.getcwd()})
        wait_health(self.url, self.proc, timeout_s=300.0)
        self.strategy = strategy

    def measure(self, strategies, rate: float, n: int, tag: str, plot: bool = False) -> dict:
        from serve.web.loadgen import run

        got = {}
        for strategy in strategies:
            self.serve(strategy)
            c = replace(self.cfg, rates=[rate], num_queries=n, warmup_queries=min(50, n // 10), plot=plot)
            with open(os.devnull, "w") as quiet:
                (got[strategy],) = run(c, self.url, self.out / tag, 512, 60.0, stream=quiet)
        return got

    def measure_rates(self, strategies, rates: list, n: int) -> dict:
        """``{tag: {strategy: summary}}`` for each ``(rate, tag)``: one strategy at every rate, one service each."""
        runs: dict = {tag: {} for _, tag in rates}
        for s in strategies:
            for rate, tag in rates:
                runs[tag].update(self.measure([s], rate, n, tag))
        return runs

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc, self.strategy = None, None

    close = stop


# -- the run --------------------------------------------------------------------------------------------------
def capacities(path, strategies, light: float, sizes: Sizes) -> dict:
    """Each strategy's capacity search on ``path`` (on Ray the light-load probes of all of them first, in one
    setting, which sizes the pool of actors for every strategy; over HTTP each strategy's in its own service)."""
    first = path.measure(strategies, light, sizes.light_queries, "light") if path.light_together else {}
    found = {}
    for s in strategies:
        def probe(rate, s=s):
            if rate == light and first:
                got = first[s]
            else:
                n = sizes.light_queries if rate == light else probe_queries(sizes, rate)
                got = path.measure([s], rate, n, f"probe-{s}-{rate:.0f}")[s]
            return got["p99_ms"], answered_share(got)

        found[s] = search_capacity(probe, light, refine=sizes.refine)
    return found


def capacity_table(path_name: str, found: dict) -> list[str]:
    lines = [f"| {path_name}: strategy | light-load p99 (ms) | limit 2x (ms) | capacity (queries/s) | probes "
             "(rate: p99 ms) |", "|---|---:|---:|---:|---|"]
    for s, f in found.items():
        probes = ", ".join(f"{r:.0f}: {p:.0f}{'' if ok else ' x'}" for r, p, _, ok in f["probes"][1:])
        lines.append(f"| {s} | {f['light_p99_ms']:.1f} | {f['limit_ms']:.1f} | "
                     f"{'' if f['bounded'] else '>= '}{f['capacity']:,.0f} | {probes} |")
    return lines


def tail_rows(path, found: dict, sizes: Sizes, sim: bool) -> tuple[list[str], list[str], dict]:
    """The compared strategies at 0.5 and 0.7 of capacity: the tail table, the sim/Ray table, the figures."""
    from serve.core.results import plot_cdf

    base = found["equal-resources"]["capacity"]
    strategies = [s for s in COMPARED if s in found]
    rows = [f"| {path.name}: fraction | rate (queries/s) | strategy | of own capacity | p50 (ms) | p99 (ms) "
            "| p99.9 (ms) | served top-1 | uncoded top-1 | reconstructed |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    sims = ["| fraction | strategy | Ray p99 (ms) | sim p99 (ms) | sim / Ray |", "|---:|---|---:|---:|---:|"]
    verdict = {}
    runs = path.measure_rates(strategies, [(frac * base, f"at-{frac:g}") for frac in FRACTIONS], sizes.compare_queries)
    for frac in FRACTIONS:
        rate, tag = frac * base, f"at-{frac:g}"
        got = runs[tag]
        uncoded = got.get("equal-resources", {}).get("accuracy", float("nan"))
        for s in strategies:
            g = got[s]
            rows.append(f"| {frac:g} | {rate:,.0f} | {s} | {rate / found[s]['capacity']:.2f} | {g['p50_ms']:.1f} | "
                        f"{g['p99_ms']:.1f} | {g['p99.9_ms']:.1f} | {100 * g['accuracy']:.2f}% | "
                        f"{100 * uncoded:.2f}% | {100 * g['reconstructed']:.1f}% |")
            if sim:
                ray_p99, sim_p99 = g["p99_ms"], path.simulate(s, tag)["p99_ms"]
                sims.append(f"| {frac:g} | {s} | {ray_p99:.1f} | {sim_p99:.1f} | {sim_p99 / ray_p99:.2f} |")
                verdict[("sim", frac, s)] = sim_p99 / ray_p99
        if "coded" in got and "equal-resources" in got:
            verdict[("tail", frac)] = got["coded"]["p99.9_ms"] / got["equal-resources"]["p99.9_ms"]
            verdict[("points", frac)] = 100 * (uncoded - got["coded"]["accuracy"])
        curves = {s: latencies(folder_of(path, s, tag))[min(50, sizes.compare_queries // 10):] for s in strategies}
        plot_cdf(curves, path.out / f"cdf_{frac:g}.png",
                 f"{path.name}: {rate:,.0f} queries/s ({frac:g} of capacity), shipped stragglers")
    return rows, sims if sim else [], verdict


def folder_of(path, strategy: str, tag: str) -> Path:
    if isinstance(path, ServePath):
        return path.folders[(strategy, tag)][2] / strategy
    return path.out / tag / "setting00" / strategy


def targets(name: str, verdict: dict) -> list[str]:
    lines = []
    if ("tail", 0.7) in verdict:
        t = verdict[("tail", 0.7)]
        lines.append(f"- {name}, 0.7 of capacity: coded p99.9 / equal-resources p99.9 = {t:.2f} "
                     f"(target <= {TARGET_TAIL}: {'met' if t <= TARGET_TAIL else 'NOT met'})")
    for frac in FRACTIONS:
        if ("points", frac) in verdict:
            d = verdict[("points", frac)]
            lines.append(f"- {name}, {frac:g} of capacity: coded top-1 {d:+.2f} points below uncoded "
                         f"(target within {TARGET_POINTS}: {'met' if abs(d) <= TARGET_POINTS else 'NOT met'})")
    sims = [v for k, v in verdict.items() if k[0] == "sim"]
    if sims:
        worst = max(abs(v - 1) for v in sims)
        lines.append(f"- simulator vs Ray: worst |sim p99 / Ray p99 - 1| = {worst:.0%} over {len(sims)} cells "
                     f"(target <= {TARGET_SIM:.0%}: {'met' if worst <= TARGET_SIM else 'NOT met'})")
    return lines


def measure_path(path, sizes: Sizes, strategies, light: float, sim: bool) -> list[str]:
    t0 = time.perf_counter()
    found = capacities(path, strategies, light, sizes)
    out = capacity_table(path.name, found) + [""]
    rows, sims, verdict = tail_rows(path, found, sizes, sim)
    out += rows + [""] + (sims + [""] if sims else []) + targets(path.name, verdict)
    out.append(f"\n({path.name}: {time.perf_counter() - t0:.0f} s, {load_line()} after; CDFs in {path.out}/cdf_*.png)")
    return out


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder of a systematic k = 2 code (e.g. the MNIST learned code)")
    ap.add_argument("--config", default="conf/serve/mnist_k2.json",
                    help="serving config: its instances, first delay model, batching keys, seed (default "
                         "conf/serve/mnist_k2.json)")
    ap.add_argument("--light", type=float, default=40.0, help="the light load, queries/s (default 40)")
    ap.add_argument("--quick", action="store_true", help="fewer queries, no refinement, equal-resources and coded, "
                    "Ray only (add --http for the HTTP path too)")
    ap.add_argument("--http", action="store_true", help="with --quick: measure the HTTP path too")
    ap.add_argument("--no-http", action="store_true", help="skip the HTTP path")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray path (and so the simulator's comparison)")
    ap.add_argument("--engine", choices=("ray", "sim"), default="ray", help="sim: the whole search in the simulator "
                    "(the config's 'service' or 'profile'), no Ray and no HTTP (default ray)")
    ap.add_argument("--out", default=None, help="results folder (default: a new temporary folder)")
    ap.add_argument("--port", type=int, default=8941, help="the HTTP service's port (default 8941)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the serving config (VALUE in JSON), e.g. --set batch_size=16")
    args = ap.parse_args(argv)
    if args.light <= 0:
        raise UserError(f"--light must be a positive rate in queries/s; got {args.light}.")
    if not (Path(args.run) / "config.json").is_file():
        raise UserError(f"'{args.run}' is not a run folder (no config.json). Fix: pass a folder train.py wrote.")
    import tempfile

    from coders.config import parse_overrides
    from serve.core.config import load_serve_config
    from coders.config import read_json_config

    run = str(Path(args.run).resolve())
    out = Path(args.out or tempfile.mkdtemp(prefix="lcc-capacity-"))
    overrides = {**parse_overrides(args.overrides), "runs": [run], "rates": [args.light], "out_dir": str(out / "http"),
                 "engine": args.engine}
    raw = {**read_json_config(Path(args.config), "such as conf/serve/mnist_k2.json"), **overrides}
    cfg = load_serve_config(args.config, overrides)
    sizes = QUICK if args.quick else Sizes()
    from serve.cli import load_codes

    loaded = load_codes(replace(cfg, strategies=[s for s in cfg.strategies if s != "backup"]))[run]
    print(f"before: {load_line()}")
    print(f"run {args.run}; config {args.config} (m = {cfg.instances}, delay {cfg.delays[0]}, batch_size "
          f"{cfg.batch_size}, batch_wait_ms {cfg.batch_wait_ms}); light load {args.light:g} queries/s; "
          f"{'quick' if args.quick else 'full'} sizes; results under {out}\n", flush=True)
    ray = cfg.engine == "ray"
    if not args.no_ray:
        path = ServePath(cfg, loaded, out / cfg.engine)
        try:
            print("\n".join(measure_path(path, sizes, sizes.strategies, args.light, sim=ray)) + "\n", flush=True)
        finally:
            path.close()
    if ray and not args.no_http and (args.http or not args.quick):
        path = HttpPath(cfg, raw, out / "http", args.port)
        try:
            print("\n".join(measure_path(path, sizes, sizes.http_strategies, args.light, sim=False)) + "\n",
                  flush=True)
        finally:
            path.close()
    print(f"after: {load_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
