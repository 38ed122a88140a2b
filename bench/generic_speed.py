"""Seconds per training epoch of learned codes around generic functions F (no dataset on disk).

``python -m bench.generic_speed [CONFIG ...] [--epochs N] [--threads T] [--device DEV]``

For each config (default: the shipped ``conf/xsinx_learned.json``,
``conf/kernel_learned.json`` and ``conf/tabular_learned.json``) the first run
of its sweep is built exactly as ``train.py`` builds it (domain drawn, F
trained first where it has weights, in a temporary folder), then N whole
training epochs (:meth:`train.engine.CodedRun.train_epoch`: every step
encodes, runs F on the parities, decodes every scenario and steps the
optimizer) and one evaluation of the validation split are timed. The line
per config gives the groups per epoch, the median seconds per epoch, groups
per second and the evaluation's seconds; the header states the machine's
load average (``os.getloadavg``) before and after, and its core count, since
on a shared machine the figures scale with the load.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from bench.machine_rates import load_line
from util.errors import exits_on_user_error

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["conf/xsinx_learned.json", "conf/kernel_learned.json", "conf/tabular_learned.json"]


def time_config(path: str, epochs: int, threads: int, device: str, folder: Path) -> dict:
    """Build the first run of the config at ``path`` and time ``epochs`` training epochs and one evaluation."""
    from train.config import expand_runs, load_config
    from train.engine import CodedRun
    from train.preflight import check_data, preflight

    overrides = {"save_dir": str(folder / "save"), "base_model_dir": str(folder / "base"), "progress": False,
                 "num_threads": threads, "device": device, "num_epoch": epochs}
    cfg = load_config(path if Path(path).exists() else ROOT / path, overrides)
    runs = expand_runs(cfg)[:1]
    preflight(cfg, runs)
    check_data(cfg, runs)
    run = CodedRun(cfg, runs[0])
    seconds = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        run.train_epoch()
        seconds.append(time.perf_counter() - t0)
        run.epoch += 1
    t0 = time.perf_counter()
    run.evaluate("val")
    eval_s = time.perf_counter() - t0
    groups = len(run.epoch_groups())
    per_epoch = statistics.median(seconds)
    return {"config": path, "model": runs[0].describe().split()[1], "groups": groups, "seconds": per_epoch,
            "rate": groups / per_epoch, "eval": eval_s, "n_out": run.n_out, "in_shape": list(run.in_shape)}


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.generic_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", default=DEFAULT_CONFIGS, help="configs to time (first run of each)")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs timed per config (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (config key num_threads)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.threads < 1:
        ap.error("--epochs and --threads must be 1 or more")
    before = load_line()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.configs:
            rows.append(time_config(path, args.epochs, args.threads, args.device, Path(tmp)))
    print(f"generic-F training epochs on {args.device} ({args.threads} thread(s), torch {torch.__version__}); "
          f"{before} before, {load_line().removeprefix('load average ')} after")
    print(f"{'config':<28}  {'F':<28}  {'input':>7}  {'n':>3}  {'groups/epoch':>12}  {'s/epoch':>8}  "
          f"{'groups/s':>9}  {'val eval s':>10}")
    for r in rows:
        print(f"{r['config']:<28}  {r['model']:<28}  {str(r['in_shape']):>7}  {r['n_out']:>3}  {r['groups']:>12}  "
              f"{r['seconds']:>8.2f}  {r['rate']:>9.0f}  {r['eval']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
