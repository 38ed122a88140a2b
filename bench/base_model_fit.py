"""Accuracy and training time of the base models lcc trains itself.

``python -m bench.base_model_fit [--data-dir DIR] [--epochs 20] [--datasets mnist fashion-mnist]``

Trains Base-MLP with the same function as ``python -m base_models.fit``
(into a temporary folder, so existing weights are left alone) and prints its
train / validation / test accuracy and seconds. Targets: >= 97.5% test
accuracy on MNIST, >= 87% on Fashion-MNIST.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from base_models.fit import build_base_model, train_base_model
from datasets import load_dataset
from util.errors import exits_on_user_error

TARGETS = {"mnist": 0.975, "fashion-mnist": 0.87, "digits": 0.90}


@exits_on_user_error
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.base_model_fit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("LCC_DATA_DIR")
                    or str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    ap.add_argument("--model", default="base-mlp")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print("| dataset | model | epochs | best epoch | train acc | val acc | test acc | target | seconds |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.datasets:
        splits = load_dataset(name, args.data_dir, download=False, seed=args.seed)
        model = build_base_model(args.model, splits, seed=args.seed)
        _, m = train_base_model(model, splits, epochs=args.epochs, seed=args.seed, progress=False)
        target = TARGETS.get(name)
        verdict = "" if target is None else f"{100 * target:.1f}% {'met' if m['test_acc'] >= target else 'MISSED'}"
        print(f"| {name} | {args.model} | {m['epochs']} | {m['best_epoch']} | {100 * m['train_acc']:.2f}% | "
              f"{100 * m['val_acc']:.2f}% | {100 * m['test_acc']:.2f}% | {verdict} | {m['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
