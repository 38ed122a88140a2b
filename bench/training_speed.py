"""Timing training: a CodedRun of each bench.speed setup, its steps, epochs, FLOPs and whole fits.

What the numbers mean is in bench/speed.py's docstring; the command line is there too.
"""
from __future__ import annotations

import math
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from bench.machine_rates import sync

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


def build_run(name: str, data_dir: str, save_dir: str, device: str, epochs: int,
              base_model_file: Optional[str] = None, flush_denormal: bool = True):
    """A :class:`CodedRun` of setup ``name`` built from a validated config, as train.py would."""
    from train.config import expand_runs, validate_dict
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
