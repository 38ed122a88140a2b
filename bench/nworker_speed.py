"""Speed of the N-worker codes' encode + decode of one batch (Berrut, LeTCC splines, learned).

``python -m bench.nworker_speed [--groups 1024] [--k 8] [--n 10] [--s 1] [--dim 784] [--out 10] [--repeat 5]``
``python -m bench.nworker_speed --scale [--groups 256]``: every family against N = 16, 64, 256, 1024
(K = min(32, N / 2), S = N / 16, each group its own straggler pattern where there are enough),
in ms per group, beside the floor of writing the coded inputs and the decoders these replaced.

Encodes ``groups`` groups of K inputs of ``dim`` values into N coded inputs
and decodes ``out`` outputs per worker from N - S of them (one straggler
pattern per group, drawn with seed 0), F left out: the figures are the
codes' own cost. Prints the best of ``repeat`` timings in milliseconds per
batch and the machine's load average, on one thread unless ``--threads``.
The spline decoder is timed with a fixed lam (fixed matrices per pattern,
the first call builds them: shown apart) and, on ``--gcv-groups`` groups,
with lam chosen by GCV (one SciPy fit per group and output coordinate).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch

from bench.machine_rates import load_line
from coders.berrut import berrut_interpolate
from coders.nworker import BerrutDecoder, BerrutEncoder, MLPDecoder, MLPEncoder, straggler_patterns
from coders.spline import SplineDecoder, SplineEncoder, smoother_matrix
from util.errors import UserError, exits_on_user_error

SCALE_N = (16, 64, 256, 1024)


def best_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def scale_rows(groups: int, dim: int, out: int, repeat: int) -> list[str]:
    """One row per (family, N): encode, decode after warm-up, and the first decode, in ms per group."""
    rows = ["| N | K | S | code | encode (ms/group) | decode (ms/group) | first decode (ms/group) | cache / pattern |",
            "| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    gen = torch.Generator().manual_seed(0)
    per = lambda ms: f"{ms / groups:.3f}"  # noqa: E731
    for n in SCALE_N:
        k, s = min(32, n // 2), max(1, n // 16)
        x = torch.randn(groups, k, dim, generator=gen)
        y = torch.randn(groups, n, out, generator=gen)
        patterns = straggler_patterns(n, s, groups, seed=0)
        available = patterns[torch.arange(groups) % len(patterns)]
        in_dim, out_dim = [-1, dim], [-1, out]
        head = f"| {n} | {k} | {s} |"
        floor = best_ms(lambda: torch.empty(groups, n, dim).fill_(1.0), repeat)
        rows.append(f"{head} floor: writing the coded inputs | {per(floor)} | | | |")
        be, bd = BerrutEncoder(k, n, in_dim), BerrutDecoder(k, n, out_dim)
        rows.append(f"{head} Berrut | {per(best_ms(lambda: be(x), repeat))} | "
                    f"{per(best_ms(lambda: bd(y, available), repeat))} | | |")
        closed = best_ms(lambda: berrut_interpolate(y, bd.beta, bd.alpha, available), repeat)
        rows.append(f"{head} Berrut, a (B, K, N) matrix per batch (the decoder this replaced) | | {per(closed)} | | |")
        se, sd = SplineEncoder(k, n, in_dim), SplineDecoder(k, n, out_dim, lam=1e-3)
        first = best_ms(lambda: sd(y, available), 1)
        rows.append(f"{head} spline, lam fixed | {per(best_ms(lambda: se(x), repeat))} | "
                    f"{per(best_ms(lambda: sd(y, available), repeat))} | {per(first)} | {k * n * 8 / 1024:g} KiB |")
        used = available[0].numpy()
        scipy_ms = best_ms(lambda: smoother_matrix_by_scipy(sd.beta[used], sd.alpha), 1)
        rows.append(f"{head} spline, one pattern's matrix by SciPy's fit of the unit vectors (as before) | | | "
                    f"{scipy_ms:.3f} (per pattern) | |")
        me = MLPEncoder(k, n, in_dim, hidden=64).eval()
        md = MLPDecoder(k, n, out_dim, hidden=64).eval()
        with torch.no_grad():
            rows.append(f"{head} learned (residual MLPs, width 64) | {per(best_ms(lambda: me(x), repeat))} | "
                        f"{per(best_ms(lambda: md(y, available), repeat))} | | |")
        assert torch.allclose(torch.from_numpy(smoother_matrix(sd.beta[used], sd.alpha, 1e-3)),
                              torch.from_numpy(smoother_matrix_by_scipy(sd.beta[used], sd.alpha)), atol=1e-5)
    return rows


def smoother_matrix_by_scipy(nodes, at, lam: float = 1e-3):
    """The previous way: SciPy fits the spline through each unit vector (m right-hand sides)."""
    import numpy as np
    from scipy.interpolate import make_smoothing_spline

    return make_smoothing_spline(nodes, np.eye(len(nodes)), lam=lam)(at)


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nworker_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--s", type=int, default=1)
    ap.add_argument("--dim", type=int, default=784, help="D, values per input")
    ap.add_argument("--out", type=int, default=10, help="n, outputs of F per worker")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gcv-groups", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scale", action="store_true", help="every family against N = 16, 64, 256, 1024 (ms per group)")
    args = ap.parse_args(argv)
    if min(args.groups, args.k, args.n, args.dim, args.out, args.repeat, args.gcv_groups, args.threads) < 1 \
            or not 0 <= args.s < args.n:
        raise UserError("--groups, --k, --n, --dim, --out, --repeat, --gcv-groups and --threads must be 1 or more, "
                        "and 0 <= --s < --n.")
    if args.k < 5 or args.n - args.s < 5:
        raise UserError("the spline code needs --k >= 5 and --n minus --s >= 5 (SciPy's smoothing spline needs "
                        "5 points); e.g. --k 8 --n 10 --s 1.")
    torch.set_num_threads(args.threads)
    if args.scale:
        groups = args.groups if "--groups" in (argv or sys.argv) else 256
        print(f"{groups} groups, D = {args.dim}, n = {args.out}, {args.threads} thread(s), best of {args.repeat}, "
              f"{load_line()}")
        print(*scale_rows(groups, args.dim, args.out, args.repeat), sep="\n")
        print(f"after: {load_line()}")
        return 0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.groups, args.k, args.dim, generator=gen)
    y = torch.randn(args.groups, args.n, args.out, generator=gen)
    patterns = straggler_patterns(args.n, args.s, 64, seed=0)
    available = patterns[torch.randint(len(patterns), (args.groups,), generator=gen)]
    in_dim, out_dim = [-1, args.dim], [-1, args.out]
    print(f"{args.groups} groups, K = {args.k}, N = {args.n}, S = {args.s}, D = {args.dim}, n = {args.out}, "
          f"{args.threads} thread(s), {load_line()}")
    print("| code | encode (ms) | decode (ms) | first decode (ms) |")
    print("| --- | ---: | ---: | ---: |")
    be, bd = BerrutEncoder(args.k, args.n, in_dim), BerrutDecoder(args.k, args.n, out_dim)
    print(f"| Berrut | {best_ms(lambda: be(x), args.repeat):.2f} | "
          f"{best_ms(lambda: bd(y, available), args.repeat):.2f} | |")
    se, sd = SplineEncoder(args.k, args.n, in_dim), SplineDecoder(args.k, args.n, out_dim, lam=1e-3)
    first = best_ms(lambda: sd(y, available), 1)
    print(f"| spline, lam fixed | {best_ms(lambda: se(x), args.repeat):.2f} | "
          f"{best_ms(lambda: sd(y, available), args.repeat):.2f} | {first:.2f} |")
    g = min(args.gcv_groups, args.groups)
    gcv = SplineDecoder(args.k, args.n, out_dim, lam="gcv")
    ms = best_ms(lambda: gcv(y[:g], available[:g]), 1)
    print(f"| spline, lam by GCV ({g} groups; per {args.groups}) | | {ms * args.groups / g:.0f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
