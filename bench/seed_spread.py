"""Where the spread between training seeds comes from: the figures behind README's seed-spread study.

``python -m bench.seed_spread RUN_FOLDER... [--last 5] [--split test] [--data-dir DIR]``

For each run folder (typically the ``seed<s>`` folders of one config) it prints:

- at the best validation epoch: train, validation and test reconstruction
  accuracy and test degraded-mode accuracy; a seed low on the training groups
  too is under-optimised, one low on validation alone over-fits;
- the wobble of the last ``--last`` epochs: the standard deviation of
  validation reconstruction accuracy and the mean change from one epoch to
  the next; a wobble as wide as the spread between seeds says the seeds
  differ by where the noise of training stopped them, not by what they learned;
- per class of the true label, F's accuracy and each seed's degraded-mode
  accuracy (from ``best.pt`` through ``coders.code.load_code``): which classes
  the seeds disagree on.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from coders.code import load_code
from train.engine import eval_groups
from coders.scenarios import gather_unavailable, unavailable_data
from util.errors import UserError


def read_rows(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"Run folder '{folder}' has no metrics.jsonl. Fix: pass folders written by train.py.")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def best_row(rows: list[dict]) -> dict:
    """The row of the epoch best.pt holds: the first with the highest validation reconstruction
    accuracy (epoch 0, the untrained code, included, as train.engine.CodedRun.checkpoint does)."""
    return max(rows, key=lambda r: (r["val_recon_acc"], -r["epoch"]))


def wobble(rows: list[dict], last: int) -> tuple[float, float]:
    """(standard deviation, mean absolute epoch-to-epoch change) of validation
    reconstruction accuracy over the last ``last`` epochs."""
    vals = [r["val_recon_acc"] for r in rows if r["epoch"] > 0][-last:]
    if len(vals) < 2:
        return float("nan"), float("nan")
    steps = [abs(b - a) for a, b in zip(vals, vals[1:])]
    return statistics.pstdev(vals), sum(steps) / len(steps)


@torch.no_grad()
def per_class(folder: Path, split: str, batch: int = 1024, data_dir=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per true class: (F's accuracy, degraded-mode accuracy of ``best.pt``, count of rebuilt outputs)."""
    loaded = load_code(folder, data_dir=data_dir)
    code = loaded.code
    x, y = loaded.splits.split(split)
    n_classes = int(y.max()) + 1
    fx = torch.cat([code.base(x[i:i + batch]) for i in range(0, len(x), batch)])
    base_hits = torch.bincount(y[fx.argmax(1) == y], minlength=n_classes).double()
    base_acc = base_hits / torch.bincount(y, minlength=n_classes).double()
    unavailable = unavailable_data(code.scenarios, code.k)
    groups = eval_groups(len(x), code.k, "cpu")
    hits = torch.zeros(n_classes, dtype=torch.float64)
    counts = torch.zeros(n_classes, dtype=torch.float64)
    for i in range(0, len(groups), batch):
        idx = groups[i:i + batch]
        recon, _ = code.forward_groups(x[idx], fx[idx])
        labels = gather_unavailable(y[idx], unavailable, shared=True)
        right = gather_unavailable(recon, unavailable).argmax(-1) == labels
        hits += torch.bincount(labels[right], minlength=n_classes).double()
        counts += torch.bincount(labels, minlength=n_classes).double()
    return base_acc, hits / counts.clamp(min=1), counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.seed_spread", description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="run folders written by train.py (e.g. the seed<s> folders of one config)")
    ap.add_argument("--last", type=int, default=5, help="epochs at the end whose wobble is measured (default 5)")
    ap.add_argument("--split", choices=("val", "test"), default="test", help="split of the per-class table")
    ap.add_argument("--data-dir", default=None, help="dataset folder, if not the one the runs were trained from")
    args = ap.parse_args(argv)
    if args.last < 2:
        print("--last must be 2 or more (a wobble needs two epochs).", file=sys.stderr)
        return 2
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        print(f"--data-dir '{args.data_dir}' is not a folder. Fix: name the folder that holds MNIST/ or "
              f"FashionMNIST/, or leave the flag out to use the one the runs were trained from.", file=sys.stderr)
        return 2
    folders = [Path(f) for f in args.folders]
    try:
        table = []
        for folder in folders:
            rows = read_rows(folder)
            best = best_row(rows)
            sd, step = wobble(rows, args.last)
            table.append((folder, best, sd, step, rows[-1]["epoch"]))
        print("| run | epochs | best epoch | train recon (%) | val recon (%) | test recon (%) | test degraded (%) "
              f"| val recon sd, last {args.last} (points) | mean epoch-to-epoch change (points) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for folder, best, sd, step, epochs in table:
            print(f"| {folder} | {epochs} | {best['epoch']} | {100 * best.get('train_recon_acc', float('nan')):.2f} "
                  f"| {100 * best['val_recon_acc']:.2f} | {100 * best['test_recon_acc']:.2f} "
                  f"| {100 * best['test_degraded_acc']:.2f} | {100 * sd:.2f} | {100 * step:.2f} |")
        results = [per_class(folder, args.split, data_dir=args.data_dir) for folder in folders]
    except UserError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    base_acc = results[0][0]
    print()
    print(f"| class | F {args.split} acc (%) | " + " | ".join(f"run {i + 1} degraded (%)" for i in range(len(folders)))
          + " | spread (points) |")
    print("|---:|---:|" + "---:|" * len(folders) + "---:|")
    for c in range(len(base_acc)):
        accs = [100 * float(r[1][c]) for r in results]
        print(f"| {c} | {100 * float(base_acc[c]):.2f} | " + " | ".join(f"{a:.2f}" for a in accs)
              + f" | {max(accs) - min(accs):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
