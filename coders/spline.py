"""LeTCC's smoothing-spline N-worker code (Moradi, Tahmasebi, Maddah-Ali, NeurIPS 2024).

LeTCC shows that, for mean squared error over straggler patterns and F in a
second-order Sobolev space, the best encoder and decoder are second-order
(cubic) smoothing splines: the function g minimising

    sum_i (y_i - g(x_i))^2 + lam * integral g''(t)^2 dt

through the points (x_i, y_i). Encoder: the spline through the K inputs at the
data points ``alpha_j``, evaluated at the N worker points ``beta_i``. Decoder:
the spline through the answering workers' ``(beta_i, F(coded_i))``, evaluated
at every ``alpha_j``. Points are placed as in ``coders/nworker.py``
(``data_points`` / ``worker_points``; first-kind Chebyshev by default, as for
Berrut, so both families are scored on the same placement; the older
``points`` places both).

The splines minimise SciPy's objective (``scipy.interpolate.make_smoothing_spline``,
against which the tests check them): ``lam = 0`` interpolates (a natural
cubic spline through every point), a positive ``lam`` smooths, and
``lam = "gcv"`` lets SciPy choose lam for every fit by generalised
cross-validation (GCV). For a fixed lam the spline is linear in the values,
so the encoder and the decoder of each straggler pattern are fixed matrices,
computed once in Reinsch's banded form (:func:`smoother_matrix`: O(N K) per
pattern) and kept in a bounded least-recently-used cache. GCV
makes lam depend on the values, so every group and output coordinate is one
SciPy fit (slow: use it on small outputs). SciPy needs at least 5 points per
fit, so K >= 5 (encoder) and N - S >= 5 (decoder).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from scipy.interpolate import make_smoothing_spline
from scipy.linalg import solveh_banded

from coders.nworker import NWorkerDecoder, NWorkerEncoder, Placed
from util.lru import ByteLRU

MIN_POINTS = 5  # make_smoothing_spline's minimum number of points (GCV); the fixed-lam path keeps it too
DEFAULT_CACHE_MB = 64.0
GATHER_BYTES = 2 ** 24  # a batch's (B, K, N) decoding matrices up to this size are gathered for one product
Lam = Union[float, int, str]


def check_lam(lam: Lam, allow_gcv: bool) -> None:
    """A ValueError (shown as a config error naming the coder) unless ``lam`` is a number >= 0
    (or "gcv" where ``allow_gcv``)."""
    if allow_gcv and lam == "gcv":
        return
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0:
        choice = ' or "gcv"' if allow_gcv else ""
        raise ValueError(f"its 'lam' must be a number >= 0{choice}; got {lam!r}.")


def smoother_matrix(nodes: np.ndarray, at: np.ndarray, lam: float) -> np.ndarray:
    """``(p, m)`` float64: the cubic smoothing spline through values at the m ascending ``nodes`` (m >= 2),
    evaluated at the p points ``at`` (outside the nodes: the end pieces' cubics, as SciPy's), as a matrix.

    Reinsch's form: with ``h`` the node gaps, Q ``(m, m-2)`` the second differences and R ``(m-2, m-2)``
    the tridiagonal penalty matrix, the fitted values are ``g = y - lam Q gamma`` and the inner second
    derivatives ``gamma = P^-1 Q^T y`` with ``P = R + lam Q^T Q`` (pentadiagonal). A value at t is
    ``A_t g + B_t gamma`` (two nonzeros each: the piece holding t), so the matrix is
    ``A + (Q P^-1 (B - lam A Q)^T)^T``: one banded solve with p right-hand sides, O(m p), instead of
    one fit per unit vector (m right-hand sides)."""
    nodes, at = np.asarray(nodes, dtype=np.float64), np.asarray(at, dtype=np.float64)
    m, p = len(nodes), len(at)
    h = np.diff(nodes)
    piece = np.clip(np.searchsorted(nodes, at, side="right") - 1, 0, m - 2)
    left, right = at - nodes[piece], nodes[piece + 1] - at
    hp = h[piece]
    rows = np.arange(p)
    a = np.zeros((p, m))
    a[rows, piece] = right / hp
    a[rows, piece + 1] += left / hp
    if m == 2:
        return a
    b = np.zeros((p, m))  # coefficients of the second derivatives at every node (the ends' are zero)
    b[rows, piece] = -left * right * (1 + right / hp) / 6
    b[rows, piece + 1] += -left * right * (1 + left / hp) / 6
    q0, q1, q2 = 1 / h[:-1], -1 / h[:-1] - 1 / h[1:], 1 / h[1:]  # column c of Q: rows c, c+1, c+2
    bands = np.zeros((3, m - 2))  # P in upper banded form for solveh_banded
    bands[2] = (h[:-1] + h[1:]) / 3 + lam * (q0 ** 2 + q1 ** 2 + q2 ** 2)
    bands[1, 1:] = h[1:-1] / 6 + lam * (q1[:-1] * q0[1:] + q2[:-1] * q1[1:])
    bands[0, 2:] = lam * q2[:-2] * q0[2:]

    def q_times(z: np.ndarray) -> np.ndarray:  # Q @ z for z (m-2, p) -> (m, p)
        out = np.zeros((m, z.shape[1]))
        out[:-2] += q0[:, None] * z
        out[1:-1] += q1[:, None] * z
        out[2:] += q2[:, None] * z
        return out

    def qt_times(y: np.ndarray) -> np.ndarray:  # Q^T @ y for y (m, p) -> (m-2, p)
        return q0[:, None] * y[:-2] + q1[:, None] * y[1:-1] + q2[:, None] * y[2:]

    rhs = b[:, 1:-1].T - lam * qt_times(a.T)  # (B - lam A Q)^T, (m-2, p)
    return a + q_times(solveh_banded(bands, rhs)).T


def spline_fit(nodes: np.ndarray, values: np.ndarray, at: np.ndarray, lam: Lam) -> np.ndarray:
    """The spline through ``values`` ``(m, c)`` at ``nodes``, at ``at``: ``(p, c)``; lam "gcv" is chosen
    by SciPy for each of the c columns."""
    if lam != "gcv":
        return smoother_matrix(nodes, at, float(lam)) @ values
    return make_smoothing_spline(nodes, values, lam=None)(at)


def check_answering(available: torch.Tensor) -> None:
    """Refuse a batch in which some group has fewer than MIN_POINTS answering workers (each spline decoder's floor)."""
    counts = available.sum(1)
    if bool((counts < MIN_POINTS).any()):
        raise ValueError(f"the spline decoder needs at least {MIN_POINTS} answering workers per group "
                         f"(SciPy's smoothing spline); got {int(counts.min())}.")


class SplineEncoder(Placed, NWorkerEncoder):
    """Worker i gets the smoothing spline through the K inputs, at worker point i.
    ``lam`` (default 0: interpolation, since the inputs are exact) is the encoder's smoothing."""

    points_moves_data = True  # the older 'points' places the data and the workers

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], lam: float = 0.0, points: Optional[str] = None,
                 data_points: Optional[str] = None, worker_points: Optional[str] = None):
        super().__init__(k, n_workers, in_dim)
        check_lam(lam, allow_gcv=False)
        if k < MIN_POINTS:
            raise ValueError(f"SciPy's smoothing spline needs at least {MIN_POINTS} points, so the spline "
                             f"encoder needs K >= {MIN_POINTS}; got K = {k}.")
        alpha, beta = self.place(k, n_workers, points, data_points, worker_points)
        matrix = torch.from_numpy(smoother_matrix(alpha.numpy(), beta.numpy(), lam))
        self.register_buffer("matrix", matrix, persistent=False)
        self.register_buffer("matrix32", matrix.float(), persistent=False)

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:
        matrix = self.matrix32 if in_data.dtype == torch.float32 else self.matrix.to(in_data.dtype)
        return torch.matmul(matrix, in_data)


class SplineDecoder(Placed, NWorkerDecoder):
    """The smoothing spline through the answering workers' outputs, at the K data points.
    ``lam``: a number >= 0, or "gcv" (default; SciPy's GCV choice per group and coordinate).

    For a fixed lam every straggler pattern has its ``(K, N)`` float64 decoding matrix, built on the
    pattern's first decode and kept in a least-recently-used cache of at most ``cache_mb`` MiB
    (K * N * 8 bytes an entry: 2 KiB at K = 8, N = 32; 256 KiB at K = 32, N = 1024, so the default
    64 MiB holds 256 such patterns); ``cache_mb = 0`` keeps none."""

    points_moves_data = True
    min_answering = MIN_POINTS  # SciPy's smoothing spline needs this many points

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], lam: Lam = "gcv", points: Optional[str] = None,
                 data_points: Optional[str] = None, worker_points: Optional[str] = None,
                 cache_mb: float = DEFAULT_CACHE_MB):
        super().__init__(k, n_workers, in_dim)
        check_lam(lam, allow_gcv=True)
        if isinstance(cache_mb, bool) or not isinstance(cache_mb, (int, float)) or not cache_mb >= 0:
            raise ValueError(f"its 'cache_mb' must be a number of MiB >= 0; got {cache_mb!r}.")
        self.lam = lam
        alpha, beta = self.place(k, n_workers, points, data_points, worker_points)
        self.alpha, self.beta = alpha.numpy(), beta.numpy()
        self.cache = ByteLRU(int(cache_mb * 2 ** 20))  # pattern -> its decoding matrix

    def pattern_matrix(self, row: torch.Tensor) -> torch.Tensor:
        """``(K, N)`` float64 decoding matrix of one availability row (fixed lam), zero at stragglers."""
        used = row.cpu().numpy()

        def build() -> torch.Tensor:
            full = np.zeros((self.k, self.n_workers))
            full[:, used] = smoother_matrix(self.beta[used], self.alpha, self.lam)
            return torch.from_numpy(full)

        return self.cache.get(used.tobytes(), build)

    def forward(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        check_answering(available)
        if self.lam != "gcv":
            patterns, index = torch.unique(available, dim=0, return_inverse=True)
            mats = [self.pattern_matrix(row) for row in patterns]
            if len(outputs) * self.k * self.n_workers * outputs.element_size() <= GATHER_BYTES:  # small: one bmm
                stacked = torch.stack(mats).to(outputs.device, outputs.dtype)
                return torch.matmul(stacked[index], outputs)
            rebuilt = outputs.new_empty(len(outputs), self.k, outputs.shape[-1])
            by_pattern = torch.argsort(index).split(torch.bincount(index, minlength=len(patterns)).tolist())
            for matrix, groups in zip(mats, by_pattern):  # one (K, N) product per distinct pattern, no (B, K, N)
                matrix = matrix.to(outputs.device, outputs.dtype)
                rebuilt[groups] = torch.matmul(matrix, outputs[groups])
            return rebuilt
        rows = []
        values = outputs.detach().double().cpu().numpy()
        avail = available.cpu().numpy()
        for b in range(len(values)):
            used = avail[b]
            rows.append(spline_fit(self.beta[used], values[b, used], self.alpha, "gcv"))
        return torch.from_numpy(np.stack(rows)).to(outputs.device, outputs.dtype)
