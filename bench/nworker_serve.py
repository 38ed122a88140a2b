"""N-worker codes against a systematic code, served for real on Ray through ``python -m serve``'s own code path.

``python -m bench.nworker_serve --systematic RUN --nworker RUN [RUN ...] [--rate R] [--queries N] [--instances M]
[--group-timeout-ms T] [--engine ray|sim]``

Serves the systematic run under ``none`` and ``coded`` and each N-worker run
under ``nworker``, on one local Ray, with the same seeded arrivals, images
and injected delays (one serving config per run, identical but for ``runs``
and ``strategies``), and prints one row per (run, strategy): p50, p99 and
p99.9 latency, the share of answers that are reconstructions, the served
top-1 accuracy (decoded answers scored against the labels) and the requests
sent per query, with the load average before and after. No figure is asserted: the numbers are for
docs/nworker.md.

``python -m bench.nworker_serve --nworker RUN [RUN ...] --sweep [--deadlines MS ...] [--late-p P ...]
[--adversaries A ...]`` serves only the N-worker runs, under ``nworker``, once per combination of a deadline
(``deadline_ms``; "none": wait for N - S), a straggling probability p (each request delayed, by the same
exponential law, with probability p) and a number of Gaussian adversaries of scale 100 (``perturb``), and
prints p50 / p99 / p99.9, the served top-1 and the mean number of outputs a decode used per row.
"""
from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path
from typing import Optional

from bench.machine_rates import load_line
from util.errors import UserError, exits_on_user_error

DELAY = {"dist": "exponential", "mean_ms": 20.0, "probability": 0.05}  # one request in twenty straggles


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nworker_serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--systematic", help="a systematic run folder (k data + r parities); not with --sweep")
    ap.add_argument("--nworker", nargs="+", required=True, help="N-worker run folders with the same K and F")
    ap.add_argument("--rate", type=float, default=200.0, help="arrival rate, queries/s (default 200)")
    ap.add_argument("--queries", type=int, default=2000, help="queries per row (default 2000)")
    ap.add_argument("--instances", type=int, default=8, help="m, instances without redundancy (default 8)")
    ap.add_argument("--group-timeout-ms", type=float, default=20.0,
                    help="longest a query waits for its group of K to fill (default 20, the config's default)")
    ap.add_argument("--engine", choices=("ray", "sim"), default="ray", help="ray (default) or the simulator")
    ap.add_argument("--sweep", action="store_true", help="deadlines x p x adversaries for the N-worker runs")
    ap.add_argument("--deadlines", nargs="+", default=["none"], help="--sweep: deadline_ms values, or none")
    ap.add_argument("--late-p", nargs="+", type=float, default=[DELAY["probability"]],
                    help="--sweep: probabilities of a request being late (default 0.05)")
    ap.add_argument("--adversaries", nargs="+", type=int, default=[0], help="--sweep: Gaussian adversaries A")
    args = ap.parse_args(argv)
    if not args.sweep and args.systematic is None:
        raise UserError("--systematic is required (a systematic run to compare with), unless --sweep.")
    if args.queries < 10 or args.rate <= 0 or args.instances < 1:
        raise UserError("--queries must be 10 or more, --rate positive and --instances 1 or more.")
    for run in [*([args.systematic] if args.systematic else []), *args.nworker]:
        if not (Path(run) / "config.json").is_file():
            raise UserError(f"'{run}' is not a run folder (no config.json). Fix: pass folders train.py wrote.")
    if args.sweep:
        try:
            deadlines = [None if d == "none" else float(d) for d in args.deadlines]
        except ValueError:
            deadlines = [-1.0]
        if any(d is not None and not d >= 0 for d in deadlines) or any(not 0 <= p <= 1 for p in args.late_p) \
                or any(a < 0 for a in args.adversaries):
            raise UserError("--deadlines must be 'none' or milliseconds >= 0, --late-p from 0 to 1, --adversaries "
                            ">= 0.")
        rows = [(run, ["nworker"], {"deadline_ms": d, "delays": [{**DELAY, "probability": p}],
                                    "perturb": {"adversaries": a} if a else None})
                for run in args.nworker for a in args.adversaries for p in args.late_p for d in deadlines]
    else:
        rows = [(args.systematic, ["none", "coded"], {})] + [(run, ["nworker"], {}) for run in args.nworker]
    before = load_line()
    table = serve_rows(args, rows)
    print(f"engine {args.engine}, m = {args.instances}, {args.rate:g} queries/s, group timeout "
          f"{args.group_timeout_ms:g} ms, {args.queries} queries a row "
          f"(the first {min(100, args.queries // 10)} left out), delay exponential mean {DELAY['mean_ms']:g} ms on "
          f"{'each request with probability p' if args.sweep else format(DELAY['probability'], '.0%') + ' of requests'}"
          f"; before: {before}; after: {load_line()}")
    if args.sweep:
        print("| run | deadline (ms) | p | adversaries | p50 (ms) | p99 (ms) | p99.9 (ms) | served top-1 | "
              "outputs / decode |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for run, keys, s in table:
            d, a = keys["deadline_ms"], (keys["perturb"] or {}).get("adversaries", 0)
            print(f"| {'/'.join(Path(run).parts[-5:])} | {'none' if d is None else format(d, 'g')} | "
                  f"{keys['delays'][0]['probability']:g} | {a} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                  f"{s['p99.9_ms']:.1f} | {s['accuracy']:.2%} | {s.get('outputs_used_mean', float('nan')):.2f} |")
        return 0
    print("| run | strategy | instances | p50 (ms) | p99 (ms) | p99.9 (ms) | reconstructed | served top-1 | requests "
          "/ query |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for run, _, s in table:
        print(f"| {'/'.join(Path(run).parts[-5:])} | {s['strategy']} | {s['instances']} | "
              f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {s['p99.9_ms']:.1f} | {s['reconstructed']:.1%} | "
              f"{s['accuracy']:.2%} | {s['requests_per_query']:.2f} |")
    return 0


def serve_rows(args, rows: list) -> list:
    """Serve each ``(run, strategies, extra config keys)`` on one Ray (or the simulator) with the same seeded
    arrivals and images; ``[(run, extra keys, summary), ...]``, one per strategy."""
    from serve.cli import serve_all
    from serve.core.config import validate

    if args.engine == "ray":
        from util.ray_cluster import start_ray

        start_ray(None, None)  # one Ray for every row (serve_all leaves a Ray it did not start running)
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (run, strategies, keys) in enumerate(rows):
            cfg = validate({"runs": [run], "strategies": strategies, "rates": [args.rate], "delays": [DELAY],
                            "num_queries": args.queries, "warmup_queries": min(100, args.queries // 10),
                            "instances": args.instances, "engine": args.engine, "plot": False,
                            "group_timeout_ms": args.group_timeout_ms,
                            "out_dir": str(Path(tmp) / f"row{i}"), **keys})
            (_, summaries), = serve_all(cfg, out=io.StringIO())
            table += [(run, keys, s) for s in summaries]
    if args.engine == "ray":
        import ray

        ray.shutdown()
    return table


if __name__ == "__main__":
    raise SystemExit(main())
