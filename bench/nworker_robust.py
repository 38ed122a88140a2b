"""N-worker codes under adversaries, noise and random stragglers: the tables of docs/nworker.md.

``python -m bench.nworker_robust FIGURE [--epochs E] [--save-dir DIR] [--data-dir D] [--anchor-dir A]``

FIGURE is one of

* ``xsinx-n``: x sin x (K = 5, S = 1), test NMSE against N (8 to 64) with A = 0, 1, 2 Gaussian adversaries
  (scale 100), for Berrut, Berrut with the locator, LeTCC's spline, the spline with the locator and the
  learned code with the locator (trained with A = 2);
* ``xsinx-noise``: x sin x (K = 5, N = 32, S = 1), test NMSE against the output noise sigma, for Berrut,
  the interpolating spline (LeTCC's lam = 0), the spline with lam by C_p (knowing sigma) and by GCV
  (coders/smoothing.py), and the learned code trained at each sigma;
* ``xsinx-p``: x sin x (K = 5, N = 32), test NMSE against the straggling probability p, for Berrut, the
  spline and the learned code trained at each p;
* ``mnist-adv``: MNIST with the reference base-mlp F (``--anchor-dir``), K = 8, N = 13 and 20, S = 1, test
  accuracy of all K answers against A = 0 to 3 adversaries (``--adversary``), for Berrut and the spline
  with and without the locator (e_max = 2) and the learned code with the locator trained with A = 2;
* ``mnist-noise`` / ``mnist-p``: the same F, K and N, accuracy against the output noise sigma (Berrut, the
  interpolating spline, the spline with lam by C_p and by GCV, the learned code trained at each sigma) and
  against the straggling probability p (Berrut, the spline, the learned code trained at each p);
* ``xsinx-deadline`` / ``mnist-deadline``: each worker's completion time from the shifted exponential
  ``LATENCY`` (10 ms + an exponential tail of mean 5 ms, util/latency.py), test error of the answered groups
  and the fraction answered against the deadline (coders/deadline.py), for Berrut and the spline (x sin x:
  N = 32; MNIST: the reference base-mlp F, N = ``--n``);
* ``lenet-adv`` / ``lenet-noise`` / ``lenet-p``: the same with LeNet-5 as F (trained by lcc, ``--f-epochs``
  epochs, into ``--save-dir`` if missing).

Every score is a ``train.py`` run (the one computation of training and evaluation): each family is built
(and, if it learns, trained ``--epochs`` epochs at the column's training setting) into its own folder under
``--save-dir``, then scored on the test split by ``--only-test`` with the column's setting. Cells show the
test NMSE (x sin x) or accuracy of all K answers (MNIST), and with adversaries and a locating decoder the
share of corrupted workers located. Prints a markdown table and the machine's load.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Optional

from bench.generic_speed import load_line
from util.errors import UserError, exits_on_user_error

BERRUT = ["coders.nworker.BerrutEncoder", "coders.nworker.BerrutDecoder"]
SPLINE = ["coders.spline.SplineEncoder", {"class": "coders.spline.SplineDecoder", "args": {"lam": 0.0}}]


def locating(e_max: int) -> dict:
    return {"Berrut + locator": ["coders.nworker.BerrutEncoder",
                                 {"class": "coders.adversary.LocatingBerrutDecoder", "args": {"e_max": e_max}}],
            "spline + locator": ["coders.spline.SplineEncoder",
                                 {"class": "coders.adversary.LocatingSplineDecoder", "args": {"e_max": e_max}}]}


def learned(hidden: int, e_max: Optional[int] = None, dec_hidden: Optional[int] = None) -> list:
    dec = ({"class": "coders.nworker.MLPDecoder", "args": {"hidden": dec_hidden or hidden}} if e_max is None else
           {"class": "coders.adversary.LocatingMLPDecoder", "args": {"hidden": dec_hidden or hidden, "e_max": e_max}})
    return [{"class": "coders.nworker.MLPEncoder", "args": {"hidden": hidden}}, dec]


XSINX = {"form": "nworker", "k_vals": [5], "stragglers": [1], "max_patterns": 16, "datasets": ["interval"],
         "domains": {"interval": {"sampler": "uniform", "shape": [1], "low": -3, "high": 3,
                                  "n_train": 4096, "n_val": 256, "n_test": 512}},
         "models": ["base_models.functions.x_sin_x"], "losses": ["mse"], "lr_schedule": "cosine",
         "epoch_groups": "disjoint", "progress": False, "num_threads": 1}


def figure(name: str, args) -> tuple[dict, list, list]:
    """``(base config, [(family, pair, learns)], [(column, train overrides, score overrides)])``."""
    if name == "xsinx-n":
        families = [("Berrut", BERRUT, False), *[(k, v, False) for k, v in locating(2).items()],
                    ("spline", SPLINE, False), ("learned + locator", learned(64, 2), True)]
        SKIP[("spline + locator", 64)] = "n/a (1,953 spline fits a pattern)"
        SKIP[("learned + locator", 64)] = "n/a (1,953 fits a pattern, every step)"
        columns = [(f"N = {n}, A = {a}", {"n_workers": [n], "adversaries": 2}, {"adversaries": a})
                   for n in (8, 16, 32, 64) for a in (0, 1, 2)]
        return XSINX, families, columns
    if name == "xsinx-noise":
        families = [("Berrut", BERRUT, False), ("spline, lam 0", SPLINE, False),
                    ("spline, lam by GCV", ["coders.spline.SplineEncoder",
                                            {"class": "coders.smoothing.NoiseSplineDecoder",
                                             "args": {"rule": "gcv"}}], False),
                    ("learned", learned(64), True)]
        columns = []
        for sigma in (0.0, 0.01, 0.03, 0.1, 0.3, 1.0):
            columns.append((f"sigma = {sigma:g}", {"n_workers": [32], "output_noise": sigma},
                            {"output_noise": sigma}))
        cp = [("spline, lam by C_p (sigma known)", ["coders.spline.SplineEncoder", {
            "class": "coders.smoothing.NoiseSplineDecoder", "args": {"rule": "cp", "sigma": "SIGMA"}}], False)]
        return XSINX, families[:2] + cp + families[2:], columns
    if name == "xsinx-p":
        families = [("Berrut", BERRUT, False), ("spline, lam 0", SPLINE, False), ("learned", learned(64), True)]
        columns = [(f"p = {p:g}", {"n_workers": [32], "stragglers": [0], "straggler_p": p}, {"straggler_p": p})
                   for p in (0.0, 0.05, 0.1, 0.2, 0.3, 0.4)]
        return XSINX, families, columns
    if name == "xsinx-deadline":
        return {**XSINX, "stragglers": [0], "max_patterns": 64}, [("Berrut", BERRUT, False),
                                                                   ("spline, lam 0", SPLINE, False)], \
            deadline_columns([32])
    data, _, kind = name.partition("-")
    if data in ("mnist", "lenet") and kind in ("adv", "noise", "p", "deadline"):
        model = "base-mlp" if data == "mnist" else "lenet5"
        base = {"form": "nworker", "k_vals": [8], "stragglers": [1], "datasets": ["mnist"], "models": [model],
                "losses": ["kl"], "lr_schedule": "cosine", "epoch_groups": "disjoint", "progress": False,
                "num_threads": 1, "max_patterns": args.patterns, "adversary": args.adversary,
                "base_model_dir": str(Path(args.save_dir) / "base_models"), "base_model_epochs": args.f_epochs}
        if model == "base-mlp":
            base["base_model_file"] = str(Path(args.anchor_dir) / "mnist" / "base-mlp" / "model.t7")
        if kind == "noise":
            cp = ["coders.spline.SplineEncoder", {"class": "coders.smoothing.NoiseSplineDecoder",
                                                  "args": {"rule": "cp", "sigma": "SIGMA"}}]
            gcv = ["coders.spline.SplineEncoder", {"class": "coders.smoothing.NoiseSplineDecoder",
                                                   "args": {"rule": "gcv"}}]
            families = [("Berrut", BERRUT, False), ("spline, lam 0", SPLINE, False),
                        ("spline, lam by C_p (sigma known)", cp, False), ("spline, lam by GCV", gcv, False),
                        ("learned", learned(512, None, 256), True)]
            return base, families, [(f"N = {n}, sigma = {v:g}", {"n_workers": [n], "output_noise": v},
                                     {"output_noise": v}) for n in args.n for v in (0.0, 1.0, 3.0, 10.0)]
        if kind == "deadline":
            return {**base, "stragglers": [0]}, [("Berrut", BERRUT, False), ("spline, lam 0", SPLINE, False)], \
                deadline_columns(args.n)
        if kind == "p":
            families = [("Berrut", BERRUT, False), ("spline, lam 0", SPLINE, False),
                        ("learned", learned(512, None, 256), True)]
            return base, families, [(f"N = {n}, p = {p:g}", {"n_workers": [n], "stragglers": [0], "straggler_p": p},
                                     {"straggler_p": p}) for n in args.n for p in (0.0, 0.1, 0.2, 0.3)]
        families = [("Berrut", BERRUT, False), ("spline", SPLINE, False), *[(k, v, False) for k, v in
                                                                              locating(2).items()],
                    ("learned + locator", learned(512, 2, 256), True)]
        columns = [(f"N = {n}, A = {a}", {"n_workers": [n], "adversaries": 2}, {"adversaries": a})
                   for n in args.n for a in (0, 1, 2, 3)]
        return base, families, columns
    raise UserError(f"unknown figure {name!r}. Fix: name one of xsinx-n, xsinx-noise, xsinx-p, or "
                    f"{{mnist,lenet}}-{{adv,noise,p}}, xsinx-deadline, mnist-deadline.")


LATENCY = {"dist": "shifted-exponential", "shift_ms": 10.0, "mean_ms": 5.0}
DEADLINES = (10.5, 11.0, 12.0, 13.0, 15.0, 20.0, 1e9)


def deadline_columns(ns: list) -> list:
    """A column per N and deadline: the run built (nothing trained) at the loosest, scored at each."""
    return [(f"N = {n}, deadline {'none' if d >= 1e9 else f'{d:g} ms'}",
             {"n_workers": [n], "worker_latency": LATENCY, "deadline_ms": 1e9},
             {"deadline_ms": d}) for n in ns for d in DEADLINES]


SKIP: dict = {}  # (family, N) -> the cell shown instead: a search too slow to run here


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def cell(metrics: dict) -> str:
    value = (f"{100 * metrics['test_degraded_acc']:.2f}%" if "test_degraded_acc" in metrics
             else f"{metrics['test_nmse']:.3g}")
    if "test_answered" in metrics:
        value += f" ({100 * metrics['test_answered']:.0f}% ans.)"
    if "test_located" in metrics:
        value += f" ({100 * metrics['test_located']:.0f}% loc.)"
    return value


def run_key(pair: list, learns: bool, train: dict, test: dict, epochs: int) -> str:
    """The folder name of one family's run for one column: what it is built and trained with (a learned code's
    training setting and epochs; a fixed code's shape), so a run is reused only where it would be the same."""
    if learns:
        return slug(json.dumps({**train, "epochs": epochs}, sort_keys=True))
    shape = {k: v for k, v in train.items() if k in ("n_workers", "stragglers", "straggler_p", "deadline_ms")}
    if "SIGMA" in json.dumps(pair):  # the decoder's args change with the column
        shape["sigma"] = test.get("output_noise")
    return slug(json.dumps(shape, sort_keys=True))


def score(base: dict, pair: list, learns: bool, train: dict, test: dict, folder: Path, epochs: int) -> dict:
    """Build (and train) one family at ``train`` into ``folder``, then score its best.pt at ``test``."""
    from train.cli import run_all

    sigma = test.get("output_noise", train.get("output_noise", 0.0))
    pair = json.loads(json.dumps(pair).replace('"SIGMA"', json.dumps(sigma)))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json.in"
    path.write_text(json.dumps({**base, **train, "enc_dec_types": [pair], "num_epoch": epochs if learns else 0,
                                "save_dir": str(folder / "runs")}))
    quiet = io.StringIO()
    runs = list((folder / "runs").rglob("best.pt"))
    if not runs:
        run_all(str(path), {}, out=quiet)
        runs = list((folder / "runs").rglob("best.pt"))
    return run_all(str(runs[0].parent), test, only_test=True, out=quiet)[0]


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nworker_robust", description=__doc__.split("\n\n")[0])
    ap.add_argument("figure")
    ap.add_argument("--epochs", type=int, default=20, help="training epochs of the learned codes (0: leave out)")
    ap.add_argument("--save-dir", default="results_robust", help="where the runs go (reused when present)")
    ap.add_argument("--anchor-dir", default=os.environ.get("LCC_ANCHOR_DIR", "../shared/anchor_models"))
    ap.add_argument("--adversary", default="gaussian", help="mnist-adv: gaussian, sign or swap")
    ap.add_argument("--n", type=int, nargs="+", default=[13, 20], help="mnist-adv: the numbers of workers")
    ap.add_argument("--patterns", type=int, default=8, help="mnist-adv: straggler patterns scored")
    ap.add_argument("--f-epochs", type=int, default=20, help="lenet-*: LeNet-5's training epochs when it is missing")
    ap.add_argument("--only", nargs="*", default=None, help="the families to run (names as printed)")
    args = ap.parse_args(argv)
    base, families, columns = figure(args.figure, args)
    if args.epochs == 0:
        families = [f for f in families if not f[2]]
    if args.only:
        families = [f for f in families if f[0] in args.only]
    start, load_before = time.time(), load_line()
    root = Path(args.save_dir) / (args.figure + ("" if args.adversary == "gaussian" else "-" + args.adversary))
    print(f"| code | {' | '.join(c[0] for c in columns)} |")
    print("|---|" + "---:|" * len(columns))
    for family, pair, learns in families:
        cells = []
        for column, train, test in columns:
            skip = SKIP.get((family, train.get("n_workers", [None])[0]))
            if skip:
                cells.append(skip)
                continue
            folder = root / slug(family) / run_key(pair, learns, train, test, args.epochs)
            cells.append(cell(score(base, pair, learns, train, test, folder, args.epochs)))
        print(f"| {family} | {' | '.join(cells)} |", flush=True)
    print(f"\n{time.time() - start:.0f} s; before: {load_before}; after: {load_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
