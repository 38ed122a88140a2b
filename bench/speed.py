"""Training and inference speed of the learned code and the concatenation parity model.

``python -m bench.speed [--data-dir DIR] [--epochs N] [--quick] [--fit N] [--profile] [--device DEV]
[--steps S] [--repeat R] [--base-model-file PATH|trained ...] [--flush-denormal on|off|both] [--compile]
[--setup NAME ...] [--threads T]``

Training (MNIST, base-mlp F, k = 2, r = 1, MSE, 64 groups per step): seconds
per epoch of :meth:`train.engine.CodedRun.train_epoch`, groups per second,
FLOPs per epoch (counted with ``FlopCounterMode`` on one step, forward and
backward of E, F on the parities and D), the measured dense fp32 matmul
rate of this machine, and how far the epoch is from that FLOP bound. The
original code's 18 s/epoch (learned MLP) and 5.5 s/epoch (concatenation
parity model) are the comparison. Its loader draws k x 64 images per step
without replacement, so its epoch is N/k = 27,500 groups: the comparison is
made per group (equal work), since this project's default epoch
(``"epoch_groups": "images"``) is N = 55,000 groups.

The step time is also split, from timings at two batch sizes, into a fixed
cost per step (optimizer update, per-operation overhead) and a cost per
group (the FLOPs that grow with the batch).

Inference (batch 1, one group, k = 2, r = 1): median latency of E, F and D
for base-mlp on MNIST shapes and ResNet-18 on CIFAR shapes, and E + D as a
fraction of F -- the overhead the code adds to every prediction.

``--quick`` times a few steps and extrapolates to the epoch, so the whole
script takes well under a minute on a laptop. ``--fit N`` also trains N whole
epochs through :meth:`train.engine.CodedRun.fit`, the code path of
``train.py`` (evaluation and checkpoints included, in a temporary folder),
prints that epoch time next to the other, and warns when they differ by more
than 20%: a short extrapolation can miss what only whole runs meet.

F is the reference MNIST base-mlp (``$LCC_ANCHOR_DIR`` or
``../shared/anchor_models``: the weights users load, which hold subnormal
values) when present, else the one lcc trains; ``--base-model-file`` names
others (``trained`` for lcc's own), one set of rows each. ``--flush-denormal
off`` (or ``both``) times the runs with subnormal arithmetic left as the CPU
does it (config key ``flush_denormal``). ``--compile`` times each setup again
with E, D and the parity models under ``torch.compile``; ``--repeat R`` keeps
the fastest of R timed windows, for a machine that other work keeps busy.

This file is the command line and the tables; the timing itself is in
``bench/training_speed.py`` (training), ``bench/inference_speed.py`` (batch-1
latency) and ``bench/machine_rates.py`` (the machine's matmul rate and bandwidth).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from bench.inference_speed import bench_inference
from bench.machine_rates import copy_rate, load_average, load_line, matmul_rate
from bench.training_speed import (SETUPS, bench_training, default_data_dir, fit_disagreements,  # noqa: F401
                                  reference_weights)
from util.errors import UserError, exits_on_user_error

def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(headers), fmt(["-" * wd for wd in widths]), *map(fmt, rows)])


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    from util.hardware import denormals_flushed, flush_denormals

    flushed = denormals_flushed()
    try:
        return run_benchmarks(argv)
    finally:
        flush_denormals(flushed)  # the runs set it process-wide; a caller (a test) gets its own back


def run_benchmarks(argv: Optional[list[str]]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=default_data_dir(), help="folder with MNIST/ (default $LCC_DATA_DIR "
                    "or ../shared/data)")
    ap.add_argument("--epochs", type=int, default=1, help="full epochs to time (best is reported)")
    ap.add_argument("--quick", action="store_true", help="time a few steps and extrapolate to the epoch")
    ap.add_argument("--steps", type=int, default=15, help="steps timed with --quick")
    ap.add_argument("--repeat", type=int, default=1, help="with --quick, time this many windows of --steps steps "
                    "and keep the fastest (on a busy machine, other processes' spells fall out)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of a training step")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--base-model-file", action="append", metavar="PATH",
                    help="F's MNIST base-mlp weights, or 'trained' for the file lcc trains under "
                    "base_model_trained_files/ (trained first when missing); repeat for more rows (default: the "
                    "reference weights when present, else 'trained')")
    ap.add_argument("--flush-denormal", choices=["on", "off", "both"], default="on",
                    help="the runs' config key flush_denormal (default on, as in train.py); both: one row each")
    ap.add_argument("--fit", type=int, default=0, metavar="N",
                    help="also train N whole epochs through CodedRun.fit, as train.py does, and compare")
    ap.add_argument("--compile", action="store_true",
                    help="one more row per setup with E, D and the parity models under torch.compile")
    ap.add_argument("--setup", action="append", choices=list(SETUPS), help="time this setup only (repeatable)")
    ap.add_argument("--threads", type=int, help="torch intra-op CPU threads (default: torch's choice)")
    ap.add_argument("--only", choices=["train", "infer"], help="run one half only")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be 1 or more")
        torch.set_num_threads(args.threads)
    if args.epochs < 1 or args.steps < 1 or args.repeat < 1 or args.fit < 0:
        ap.error("--epochs, --steps and --repeat must be 1 or more, --fit 0 or more")
    if args.base_model_file:
        f_files = [None if f == "trained" else f for f in args.base_model_file]
    else:
        ref = reference_weights()
        f_files = [str(ref) if ref is not None else None]
    flushes = {"on": [True], "off": [False], "both": [True, False]}[args.flush_denormal]
    for f in f_files:  # every path is checked before any benchmark runs
        if f is not None and not Path(f).is_file():
            raise UserError(f"--base-model-file: '{f}' is {'a folder' if Path(f).is_dir() else 'not there'}. Fix: "
                            f"pass a weights file, or 'trained' for the F that lcc trains.")
    if args.device != "auto":
        from util.checks import check_device

        check_device(args.device, "--device")
    if not (Path(args.data_dir) / "MNIST").is_dir() and args.only != "infer":
        print(f"error: no MNIST/ under '{args.data_dir}'. Fix: pass --data-dir or set LCC_DATA_DIR.", file=sys.stderr)
        return 2
    from util.hardware import resolve_device

    device = resolve_device(args.device)
    args.device = str(device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    cores = os.cpu_count() or 1
    load = load_average()
    if device.type == "cpu" and load > cores - 0.5:
        # Other processes hold the cores: torch's threads then wait on each other at every op.
        print(f"warning: {load_line()}; CPU figures are inflated by other "
              f"processes (try --threads 1, or an idle machine)")
    rate = matmul_rate(device)
    bandwidth = copy_rate(device)
    print(f"dense fp32 matmul (2048^3): {rate / 1e9:.1f} GFLOP/s; memory copy: {bandwidth / 1e9:.1f} GB/s\n")

    if args.only != "infer":
        results = [bench_training(name, args, rate, bandwidth, f_file, flush, compiled)
                   for name in (args.setup or SETUPS) for f_file in f_files for flush in flushes
                   for compiled in ([False, True] if args.compile else [False])]
        if results:
            fit_cols = ["fit s/epoch", "fit train s"] if args.fit else []
            compile_cols = ["compile s"] if args.compile else []
            print("Training: MNIST, base-mlp, k=2 r=1, MSE, batch 64")
            print(table(
                ["setup", "groups/epoch", "s/epoch", "groups/s", "vs original", "GFLOP/epoch", "FLOP-bound s",
                 "x bound", "x bound+Adam", "fixed ms/step", "us/group", "F", "subnormals", *fit_cols,
                 *compile_cols, "timed as"],
                [[r["name"], str(r["groups"]), f"{r['seconds']:.2f}", f"{r['groups_per_s']:.0f}",
                  f"{r['vs_original']:.2f}x", f"{r['flops'] / 1e9:.1f}", f"{r['bound']:.2f}", f"{r['ratio']:.1f}",
                  f"{r['roofline']:.1f}", f"{r['fixed_ms']:.2f}", f"{r['group_us']:.1f}", r["F"], r["subnormals"],
                  *([f"{r['fit_s']:.2f}", f"{r['fit_train_s']:.2f}"] if args.fit else []),
                  *([f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "eager"] if args.compile else []),
                  r["how"]]
                 for r in results]))
            print("vs original: groups/s over the original code's (27,500 groups in 18 s learned, 5.5 s concat):\n"
                  "  the speed-up at equal work; for the disjoint setup it is also the speed-up per epoch.\n"
                  "GFLOP/epoch: matmuls and convolutions of E, F (or F_P) on the parities and D, forward and "
                  "backward, from FlopCounterMode;\n  optimizer and element-wise work are not counted. "
                  "x bound = s/epoch / FLOP-bound s;\n  x bound+Adam adds the optimizer's memory traffic "
                  "(7 x 4 bytes per parameter per step) at the copy rate.\n"
                  "fixed ms/step and us/group: the step time split by timing batches of 64 and 256 groups; "
                  "the fixed part (optimizer,\n  per-operation overhead) does not shrink with more groups per "
                  "step.\n"
                  "F: 'reference' is the original code's MNIST weights (they hold subnormal values), 'lcc-trained' "
                  "the file lcc trains;\n  subnormals: 'flushed' reads them as zero (flush_denormal, the default), "
                  "'kept' computes with them.")
            if args.compile:
                print("compile s: E, D and parity models under torch.compile (inductor), seconds their first "
                      "steps took; 'eager': not compiled.")
            if args.fit:
                print(f"fit s/epoch: median wall time of an epoch over {args.fit} epoch(s) of CodedRun.fit "
                      "(training, evaluation on val and test,\n  checkpoints), as train.py runs it; fit train s: "
                      "its training part.")
                for line in fit_disagreements(results):
                    print(line)
            print()
            for r in results:
                if r["profile"]:
                    print(f"profile of 20 training steps, '{r['name']}':\n{r['profile']}\n")

    if args.only != "train":
        from util.hardware import flush_denormals

        repeats = 50 if args.quick else 300
        flush_denormals(flushes[0])  # as a serving process would set it (the training runs above changed it)
        inf = [bench_inference(m, device, repeats if m == "base-mlp" else max(repeats // 5, 10), f_files[0])
               for m in ("base-mlp", "resnet18")]
        print(f"Inference: one group at batch 1, k=2 r=1, median of {repeats} (ResNet-18: "
              f"{max(repeats // 5, 10)}) repeats, inference_mode, subnormals "
              f"{'flushed' if flushes[0] else 'kept'}")
        print(table(["F", "E", "E ms", "F ms", "D ms", "(E+D)/F", "F weights"],
                    [[r["model"], r["encoder"], f"{1e3 * r['E']:.3f}", f"{1e3 * r['F']:.3f}",
                      f"{1e3 * r['D']:.3f}", f"{r['overhead']:.2f}", r["weights"]] for r in inf]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
