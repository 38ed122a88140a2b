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
"""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from util.errors import UserError, exits_on_user_error

ROOT = Path(__file__).resolve().parents[1]

# Seconds per MNIST training epoch of the original implementation on this
# machine, and the groups its epoch holds: its loader takes k x 64 images per
# step without replacement from the 55,000 training images (each image once).
ORIGINAL_SECONDS = {"learned MLP": 18.0, "concat parity model": 5.5, "learned MLP, disjoint": 18.0}
ORIGINAL_GROUPS = 55000 // 2

SETUPS = {
    "learned MLP": dict(
        enc_dec_types=[["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]],
        train_encoder=True, train_decoder=True, train_parity_model=False),
    "concat parity model": dict(
        enc_dec_types=[["coders.image.ConcatenationEncoder", "coders.summation.SubtractionDecoder"]],
        train_encoder=False, train_decoder=False, train_parity_model=True),
    # The same learned code with N/k disjoint groups per epoch (each image once):
    # the original code's epoch, half the default's N groups.
    "learned MLP, disjoint": dict(
        enc_dec_types=[["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]],
        train_encoder=True, train_decoder=True, train_parity_model=False, epoch_groups="disjoint"),
}


def default_data_dir() -> str:
    return os.environ.get("LCC_DATA_DIR") or str(ROOT.parent / "shared" / "data")


def reference_weights() -> Optional[Path]:
    """The reference MNIST base-mlp weights of the original research code, when this machine has them."""
    root = Path(os.environ.get("LCC_ANCHOR_DIR") or ROOT.parent / "shared" / "anchor_models")
    path = root / "mnist" / "base-mlp" / "model.t7"
    return path if path.is_file() else None


def f_label(base_model_file: Optional[str]) -> str:
    """How the tables name an F: the reference weights, lcc's own trained file, or the file given."""
    if base_model_file is None:
        return "lcc-trained"
    ref = reference_weights()
    if ref is not None and Path(base_model_file).resolve() == ref.resolve():
        return "reference"
    return Path(base_model_file).name


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """Dense fp32 ``n x n`` matmul rate in FLOP/s, the best of ``repeats`` timings."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up: thread pool, cuBLAS handle
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def build_run(name: str, data_dir: str, save_dir: str, device: str, epochs: int,
              base_model_file: Optional[str] = None, flush_denormal: bool = True):
    """A :class:`CodedRun` of setup ``name`` built from a validated config, as train.py would."""
    from coders.config import expand_runs, validate_dict
    from train.engine import CodedRun

    cfg = validate_dict({
        "num_epoch": epochs, "k_vals": [2], "r_vals": [1], "datasets": ["mnist"], "models": ["base-mlp"],
        "losses": ["torch.nn.MSELoss"], "batch_size": 64, "data_dir": data_dir, "download": False,
        "save_dir": save_dir, "base_model_dir": str(ROOT / "base_model_trained_files"),
        "base_model_file": base_model_file, "device": device, "flush_denormal": flush_denormal,
        "progress": False, **SETUPS[name]}, source=f"bench '{name}'")
    (spec,) = expand_runs(cfg)
    return CodedRun(cfg, spec)


def step_flops(run, batch: int) -> int:
    """FLOPs of one training step on ``batch`` groups (matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    from train.metrics import Tally

    idx = torch.arange(batch * run.k, device=run.device).view(batch, run.k)
    counter = FlopCounterMode(display=False)
    with counter:
        run.step(idx, Tally())
    return counter.get_total_flops()


def time_steps(run, steps: int, warmup: int, batch: Optional[int] = None) -> float:
    """Seconds per training step of ``batch`` groups (default the config's ``batch_size``), after ``warmup`` steps."""
    from train.metrics import Tally

    bs = batch or run.cfg.batch_size
    perm = run.epoch_groups()
    g = len(perm)
    run.train_mode(True)
    tally = Tally()
    for i in range(warmup):
        run.step(perm[i * bs:(i + 1) * bs], tally)
    sync(run.device)
    t0 = time.perf_counter()
    for i in range(steps):
        j = (warmup + i) % (g // bs)
        run.step(perm[j * bs:(j + 1) * bs], tally)
    sync(run.device)
    run.train_mode(False)
    return (time.perf_counter() - t0) / steps


def split_step_cost(run, small: int, large: int, steps: int) -> tuple[float, float]:
    """(fixed seconds per step, seconds per group) from the best step times at batches ``small`` and ``large``.

    The fixed part is what a step costs whatever its batch: the optimizer's pass
    over the weights and the per-operation overhead of the framework.
    """
    best = {}
    for bs in (small, large) * 2:  # interleaved, so a slow spell of the machine hits both
        best[bs] = min(best.get(bs, math.inf), time_steps(run, steps, warmup=3, batch=bs))
    per_group = max(best[large] - best[small], 0.0) / (large - small)
    return max(best[small] - small * per_group, 0.0), per_group


def time_epochs(run, epochs: int) -> float:
    """Seconds per full :meth:`train_epoch`, the best of ``epochs`` (after the warm-up steps already run)."""
    best = math.inf
    for _ in range(epochs):
        sync(run.device)
        t0 = time.perf_counter()
        run.train_epoch()
        sync(run.device)
        best = min(best, time.perf_counter() - t0)
    return best


class EpochClock:
    """A text stream for :meth:`CodedRun.fit`'s ``out`` that notes the moment each epoch's summary line comes."""

    def __init__(self):
        self.times: list[float] = []

    def write(self, text: str) -> int:
        if re.match(r"epoch \d+/\d+", text):
            self.times.append(time.perf_counter())
        return len(text)

    def flush(self) -> None:
        pass


def compile_coders(run) -> float:
    """``torch.compile`` (inductor) E, D and the parity models that have trainable weights, in place; returns
    the seconds the first steps took to compile them. Not a config key: on CPU it did not pay (README)."""
    t0 = time.perf_counter()
    for m in (run.encoder, run.decoder, *(run.parity_models or [])):
        if any(p.requires_grad for p in m.parameters()):
            m.compile()  # in place, so parameter names and checkpoints stay as they are
    time_steps(run, steps=1, warmup=2)
    return time.perf_counter() - t0


def time_fit(name: str, args, base_model_file: Optional[str], flush: bool, epochs: int,
             compiled: bool = False) -> dict:
    """Seconds per epoch of ``epochs`` whole epochs through :meth:`CodedRun.fit`, as ``train.py`` runs them.

    ``fit_s`` is the median wall time from one epoch's summary line to the
    next (training, evaluation on validation and test, checkpoints, logs);
    ``fit_train_s`` the median of the training part the run itself records.
    """
    with tempfile.TemporaryDirectory() as save_dir:
        run = build_run(name, args.data_dir, save_dir, args.device, epochs, base_model_file, flush)
        if compiled:
            compile_coders(run)  # a few steps before fit starts: they do not touch its checkpoints
        clock = EpochClock()
        t0 = time.perf_counter()
        rows = run.fit(out=clock)
        total = time.perf_counter() - t0
        del run
    walls = [b - a for a, b in zip(clock.times, clock.times[1:])]
    if len(walls) != epochs:  # the summary lines changed shape: the whole fit, epoch 0's evaluation included
        walls = [total / epochs]
    return {"fit_s": statistics.median(walls),
            "fit_train_s": statistics.median(r["seconds"] for r in rows if r["epoch"] > 0)}


def profile_steps(run, steps: int = 20, top: int = 15) -> str:
    """torch.profiler table of ``steps`` training steps, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    from train.metrics import Tally

    bs = run.cfg.batch_size
    idx = torch.arange(bs * run.k, device=run.device).view(bs, run.k)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    run.train_mode(True)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            run.step(idx, Tally())
        sync(run.device)
    run.train_mode(False)
    key = "self_cuda_time_total" if run.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def copy_rate(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s from copying a ``mib`` MiB tensor (read + write counted), best of ``repeats``."""
    a = torch.empty(mib * 2 ** 18, device=device).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / best


def optimizer_bytes(run) -> int:
    """Bytes one Adam step must move: parameter, gradient and both moments read, three of them written."""
    return sum(p.numel() * p.element_size() for p in run.trainable) * 7


def bench_training(name: str, args, rate: float, bandwidth: float, base_model_file: Optional[str] = None,
                   flush: bool = True, compiled: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as save_dir:
        t0 = time.perf_counter()
        run = build_run(name, args.data_dir, save_dir, args.device, args.epochs, base_model_file, flush)
        setup_s = time.perf_counter() - t0
        groups = len(run.epoch_groups())  # one draw of the run's own epoch
        bs = run.cfg.batch_size
        n_steps = math.ceil(groups / bs)
        # FLOPs grow linearly with the batch, so one full step scales to the epoch by groups.
        flops = step_flops(run, bs) * groups / bs
        compile_s = compile_coders(run) if compiled else None
        if args.quick:
            per_step = min(time_steps(run, steps=args.steps, warmup=3) for _ in range(args.repeat))
            seconds, how = per_step * n_steps, f"{args.steps} steps x {n_steps}" + (
                f", best of {args.repeat}" if args.repeat > 1 else "")
        else:
            time_steps(run, steps=1, warmup=5)
            seconds, how = time_epochs(run, args.epochs), f"best of {args.epochs} epoch(s)"
        fixed_s, group_s = split_step_cost(run, bs, 4 * bs, steps=max(args.steps // 2, 5))
        profile = profile_steps(run) if args.profile else None
        optimizer_s = n_steps * optimizer_bytes(run) / bandwidth
        del run
    fit = time_fit(name, args, base_model_file, flush, args.fit, compiled) if args.fit else {}
    bound = flops / rate
    return {"name": name, "F": f_label(base_model_file), "subnormals": "flushed" if flush else "kept", **fit,
            "compile_s": compile_s,
            "seconds": seconds, "how": how, "groups": groups, "steps": n_steps,
            "groups_per_s": groups / seconds, "flops": flops, "bound": bound, "ratio": seconds / bound,
            "roofline": seconds / (bound + optimizer_s),
            "original": ORIGINAL_SECONDS[name], "vs_original": groups / seconds / (ORIGINAL_GROUPS / ORIGINAL_SECONDS[name]),
            "fixed_ms": 1e3 * fixed_s, "group_us": 1e6 * group_s, "setup_s": setup_s, "profile": profile}


def median_latency(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def bench_inference(model_name: str, device: torch.device, repeats: int, base_model_file: Optional[str] = None) -> dict:
    """Batch-1 latency of E, F and D for one group (k = 2, r = 1); base-mlp with ``base_model_file``'s weights."""
    from base_models.mlp import BaseMLP
    from base_models.resnet import ResNet18
    from base_models.fit import load_state
    from coders.conv import ConvEncoder
    from coders.mlp import MLPDecoder, MLPEncoder

    k, r, n = 2, 1, 10
    if model_name == "base-mlp":
        shape, f, enc_cls = (1, 28, 28), BaseMLP(in_shape=(1, 28, 28), num_classes=n), MLPEncoder
    else:
        shape, f, enc_cls = (3, 32, 32), ResNet18(in_shape=(3, 32, 32), num_classes=n), ConvEncoder
    c, h, w = shape
    enc = enc_cls(k, r, [-1, *shape]).to(device).eval()
    dec = MLPDecoder(k, r, [-1, n]).to(device).eval()
    if model_name == "base-mlp" and base_model_file is not None:
        load_state(f, Path(base_model_file))
    f = f.to(device).eval()
    # As in CodedRun.encode: channels are folded into the encoder's batch.
    enc_in = torch.randn(c, k, h * w, device=device)
    f_in = torch.randn(1, *shape, device=device)
    dec_in = torch.randn(1, k + r, n, device=device)
    e_s = median_latency(lambda: enc(enc_in), device, repeats)
    f_s = median_latency(lambda: f(f_in), device, repeats)
    d_s = median_latency(lambda: dec(dec_in), device, repeats)
    return {"model": model_name, "encoder": enc_cls.__name__, "E": e_s, "F": f_s, "D": d_s,
            "weights": f_label(base_model_file) if model_name == "base-mlp" else "random",
            "overhead": (e_s + d_s) / f_s}


def fit_disagreements(results: list[dict], tolerance: float = 0.2) -> list[str]:
    """A warning for each row whose whole-epoch time through fit differs from s/epoch by more than ``tolerance``."""
    lines = []
    for r in results:
        gap = r["fit_s"] / r["seconds"] - 1
        if abs(gap) > tolerance:
            lines.append(
                f"warning: '{r['name']}' (F {r['F']}, subnormals {r['subnormals']}"
                f"{', compiled' if r.get('compile_s') is not None else ''}): an epoch through fit takes "
                f"{r['fit_s']:.2f} s, {100 * gap:+.0f}% from the {r['seconds']:.2f} s timed as {r['how']} "
                f"(its training part {r['fit_train_s']:.2f} s, evaluation and checkpoints "
                f"{r['fit_s'] - r['fit_train_s']:.2f} s).")
    return lines


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
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load > cores - 0.5:
        # Other processes hold the cores: torch's threads then wait on each other at every op.
        print(f"warning: load average {load:.1f} on {cores} cores; CPU figures are inflated by other "
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
