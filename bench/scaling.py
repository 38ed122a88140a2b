"""Training groups per second against the number of torchrun processes (data parallelism, train/distributed.py).

``python -m bench.scaling`` trains one digits run (k = 2, learned MLP code) with
``torchrun --nproc_per_node=N`` for each N of ``--procs`` and prints, per N, the
training seconds of an epoch (median of the epochs after the first, from the
``seconds`` column of metrics.jsonl, which times the training steps only) and the
groups per second. The global batch stays ``--batch-size``, so every N does the
same steps on the same groups and ends with the same weights; only the split of
each step differs. On a machine with fewer cores than processes, or with a
step so small that the per-step all_reduce dominates, the figures show the
overhead rather than a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.machine_rates import load_line

ROOT = Path(__file__).resolve().parents[1]


def groups_per_epoch(dataset: str, k: int, data_dir, epoch_groups: str) -> int:
    from datasets import load_dataset

    n = len(load_dataset(dataset, data_dir, True).train_y)
    return (n // k) * (k if epoch_groups == "images" else 1)


def measure(nproc: int, config: Path, save_dir: Path) -> list[float]:
    """Train with ``nproc`` processes; the training seconds of each epoch."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
           str(config), "--set", f"save_dir={json.dumps(str(save_dir))}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    (metrics,) = Path(save_dir).rglob("metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["seconds"] for r in rows if r["epoch"] > 0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (groups per step, all ranks together)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per measurement (the first is left out)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL: one GPU per process)")
    ap.add_argument("--base-model-dir", default="base_model_trained_files")
    args = ap.parse_args(argv)
    if args.epochs < 2 or min(args.procs) < 1:
        sys.exit("error: --epochs must be at least 2 (the first is warm-up) and --procs at least 1.")
    groups = groups_per_epoch(args.dataset, args.k, args.data_dir, "images")
    print(f"{args.dataset}, base-mlp, learned MLP code k={args.k} r=1, global batch {args.batch_size}, "
          f"{groups} groups/epoch, {args.threads} thread(s)/process, {args.device}, {load_line()}")
    print("| processes | s / epoch (train) | groups / s | x one process |")
    print("| ---: | ---: | ---: | ---: |")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"num_epoch": args.epochs, "k_vals": [args.k], "datasets": [args.dataset], "models": ["base-mlp"],
               "enc_dec_types": [["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]], "losses": ["mse"],
               "batch_size": args.batch_size, "device": args.device, "progress": False,
               "num_threads": args.threads, "data_dir": args.data_dir,
               "base_model_dir": os.path.abspath(args.base_model_dir)}
        config = Path(tmp, "config.json")
        config.write_text(json.dumps(cfg))
        for n in args.procs:
            secs = statistics.median(measure(n, config, Path(tmp, f"p{n}"))[1:])
            rate = groups / secs
            base = base or rate
            print(f"| {n} | {secs:.3f} | {rate:,.0f} | {rate / base:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
