"""LeTCC's smoothing-spline N-worker code (Moradi, Tahmasebi, Maddah-Ali, NeurIPS 2024).

LeTCC shows that, for mean squared error over straggler patterns and F in a
second-order Sobolev space, the best encoder and decoder are second-order
(cubic) smoothing splines: the function g minimising

    sum_i (y_i - g(x_i))^2 + lam * integral g''(t)^2 dt

through the points (x_i, y_i). Encoder: the spline through the K inputs at the
data points ``alpha_j``, evaluated at the N worker points ``beta_i``. Decoder:
the spline through the answering workers' ``(beta_i, F(coded_i))``, evaluated
at every ``alpha_j``. Points are those of ``coders/nworker.py`` (Chebyshev
points of the first kind by default, as for Berrut, so both families are
scored on the same placement; ``points="uniform"`` spaces them equally).

The splines are SciPy's (``scipy.interpolate.make_smoothing_spline``):
``lam = 0`` interpolates (a natural cubic spline through every point), a
positive ``lam`` smooths, and ``lam = "gcv"`` lets SciPy choose lam for every
fit by generalised cross-validation (GCV). For a fixed lam the spline is
linear in the values, so the encoder and the decoder of each straggler
pattern are fixed matrices, computed once by fitting the unit vectors. GCV
makes lam depend on the values, so every group and output coordinate is one
SciPy fit (slow: use it on small outputs). SciPy needs at least 5 points per
fit, so K >= 5 (encoder) and N - S >= 5 (decoder).
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from scipy.interpolate import make_smoothing_spline

from coders.nworker import NWorkerDecoder, NWorkerEncoder, chebyshev_points

MIN_POINTS = 5  # make_smoothing_spline's minimum number of points
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
    """``(p, m)`` float64: the smoothing spline through values at the m ascending ``nodes``,
    evaluated at the p points ``at``, as a matrix (the spline is linear in the values for a fixed lam)."""
    m = len(nodes)
    spline = make_smoothing_spline(nodes, np.eye(m), lam=float(lam))  # one fit per unit vector, batched
    return spline(at)


def spline_fit(nodes: np.ndarray, values: np.ndarray, at: np.ndarray, lam: Lam) -> np.ndarray:
    """The spline through ``values`` ``(m, c)`` at ``nodes``, at ``at``: ``(p, c)``; lam "gcv" is chosen
    by SciPy for each of the c columns."""
    return make_smoothing_spline(nodes, values, lam=None if lam == "gcv" else float(lam))(at)


class SplineEncoder(NWorkerEncoder):
    """Worker i gets the smoothing spline through the K inputs, at worker point i.
    ``lam`` (default 0: interpolation, since the inputs are exact) is the encoder's smoothing."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], lam: float = 0.0, points: str = "first"):
        super().__init__(k, n_workers, in_dim)
        check_lam(lam, allow_gcv=False)
        if k < MIN_POINTS:
            raise ValueError(f"SciPy's smoothing spline needs at least {MIN_POINTS} points, so the spline "
                             f"encoder needs K >= {MIN_POINTS}; got K = {k}.")
        alpha, beta = chebyshev_points(k, points).numpy(), chebyshev_points(n_workers, points).numpy()
        self.register_buffer("matrix", torch.from_numpy(smoother_matrix(alpha, beta, lam)), persistent=False)

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.matrix.to(in_data.dtype), in_data)


class SplineDecoder(NWorkerDecoder):
    """The smoothing spline through the answering workers' outputs, at the K data points.
    ``lam``: a number >= 0, or "gcv" (default; SciPy's GCV choice per group and coordinate)."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], lam: Lam = "gcv", points: str = "first"):
        super().__init__(k, n_workers, in_dim)
        check_lam(lam, allow_gcv=True)
        self.lam = lam
        self.alpha = chebyshev_points(k, points).numpy()
        self.beta = chebyshev_points(n_workers, points).numpy()
        self._matrices: dict[bytes, torch.Tensor] = {}  # (K, N) per pattern, fixed lam only

    def pattern_matrix(self, row: torch.Tensor) -> torch.Tensor:
        """``(K, N)`` float64 decoding matrix of one availability row (fixed lam), zero at stragglers."""
        key = row.cpu().numpy().tobytes()
        if key not in self._matrices:
            used = row.cpu().numpy()
            full = np.zeros((self.k, self.n_workers))
            full[:, used] = smoother_matrix(self.beta[used], self.alpha, self.lam)
            self._matrices[key] = torch.from_numpy(full)
        return self._matrices[key]

    def forward(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        counts = available.sum(1)
        if bool((counts < MIN_POINTS).any()):
            raise ValueError(f"the spline decoder needs at least {MIN_POINTS} answering workers per group "
                             f"(SciPy's smoothing spline); got {int(counts.min())}.")
        if self.lam != "gcv":
            patterns, index = torch.unique(available, dim=0, return_inverse=True)
            mats = torch.stack([self.pattern_matrix(p) for p in patterns]).to(outputs.device, outputs.dtype)
            return torch.matmul(mats[index], outputs)
        rows = []
        values = outputs.detach().double().cpu().numpy()
        avail = available.cpu().numpy()
        for b in range(len(values)):
            used = avail[b]
            rows.append(spline_fit(self.beta[used], values[b, used], self.alpha, "gcv"))
        return torch.from_numpy(np.stack(rows)).to(outputs.device, outputs.dtype)
