"""Decoders that resist corrupted workers (adversaries, coders/perturb.py): locate, drop, decode the rest.

**The idea** (Berlekamp-Welch's, as ApproxIFER carries it to rational codes):
the answering workers' outputs, read as values ``y_i`` at the worker points
``beta_i``, lie on a curve of a known kind (a rational function of a set
degree for Berrut, a smooth spline for LeTCC's code); a corrupted output does
not. So the decoder looks for the set R of at most ``e_max`` answering workers
whose removal leaves the others *consistent* with such a curve, and decodes
from the others with the plain decoder.

**Berrut** (:class:`LocatingBerrutDecoder`). Berrut's interpolant of the K
inputs is ``u(z) = P(z) / D(z)`` with ``D(z) = sum_j w_j prod_{l != j}
(z - alpha_l)`` (the data points' weights ``w_j``), both of degree K - 1
and D without real zeros. For an affine F, ``F(u(z)) D(z)`` is then a
polynomial of degree K - 1 in z, so the scaled outputs ``y_i D(beta_i)`` are
the values of one polynomial of degree ``degree`` (default K - 1) at the
worker points, up to the corrupted ones: a Reed-Solomon word with errors. The
misfit of a kept set is the least-squares residual of that polynomial fit
(summed over the n output coordinates, which share one error locator), and
the locator takes the removal set with the least misfit. For an affine F and
``m >= degree + 1 + 2e`` answering workers this finds every one of e
corrupted workers exactly (the kept good workers fix the polynomial, and a
kept corrupted one would have to lie on it); for a non-linear F the fit is
approximate and the gross errors stand out. Where Berlekamp-Welch solves one
linear system for the locator polynomial, lcc searches the C(m, e) removal
sets: the same consistency condition, exact under the least-squares misfit
that approximate data need, at a cost bounded by ``max_sets``.

**Splines** (:class:`LocatingSplineDecoder`): the same search with the
smoothing spline's own misfit, the penalised objective
``min_g sum_kept (y_i - g(beta_i))^2 + lam int g''^2 = y^T (I - H) y`` (H the
spline's hat matrix on the kept points, ``locate_lam``): a trimmed
penalised fit. A spike of a corrupted output costs the spline its
curvature, and dropping it removes that cost.

**Which of them to drop.** The search always takes the best removal set of
the largest size the answering count allows (``e_max``, or fewer where
``m < degree + 1 + 2 e_max``); a worker of that set is then dropped only if
its output misses the curve fitted to the kept workers by more than
``threshold`` (default 5) times the kept workers' root-mean-square
leave-one-out miss (each kept worker's miss against the curve fitted without
it, ``r_i / (1 - h_ii)``: out-of-sample, as the dropped workers' misses are)
(squared misfits below ``1e-10`` of the outputs' energy per worker count as
zero). So a set filled up with good workers drops only its corrupted ones, and
with no corrupted worker and data on the curve (an affine F for Berrut)
nothing is dropped: the decoder is the plain one. ``last_located`` holds the
``(B, N)`` mask of the workers it dropped.

**Learned** (:class:`LocatingMLPDecoder`): coders.nworker.MLPDecoder (residual
over Berrut) fed the outputs after the Berrut locator has dropped its
workers; trained with corrupted patterns (config ``adversaries``), it learns
what the locator leaves.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import numpy as np
import torch

from coders.berrut import berrut_weights
from coders.nworker import BerrutDecoder, MLPDecoder, NWorkerDecoder, Placed
from coders.spline import MIN_POINTS, SplineDecoder, check_lam, smoother_matrix
from util.lru import ByteLRU

ZERO = 1e-10  # squared misfits below this share of the outputs' energy per worker count as zero
CACHE_BYTES = 256 * 2 ** 20  # the misfit forms kept per decoder, over all patterns


def quadratic_scores(values: torch.Tensor, forms: torch.Tensor) -> torch.Tensor:
    """``values`` ``(B, m, n)``, symmetric forms ``(C, m, m)`` -> ``(B, C)``: ``sum_c y_c^T M y_c`` per row and form."""
    gram = torch.matmul(values, values.transpose(1, 2))  # (B, m, m)
    return gram.reshape(len(values), -1) @ forms.reshape(len(forms), -1).T


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"its '{name}' must be an integer >= {low}; got {value!r}.")
    return value


class LocatingDecoder(NWorkerDecoder):
    """The search shared by the locating decoders: subclasses give a kept set's misfit form and residual
    operator (:meth:`operators`), the most workers a pattern of m can drop (:meth:`capacity`) and the plain
    decoder (``self.plain``)."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], e_max: int = 1, threshold: float = 5.0,
                 max_sets: int = 5000):
        super().__init__(k, n_workers, in_dim)
        self.e_max = _check_int("e_max", e_max, 0)
        self.max_sets = _check_int("max_sets", max_sets, 1)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ValueError(f"its 'threshold' must be a number > 0; got {threshold!r}.")
        self.threshold = float(threshold)
        if math.comb(n_workers, e_max) > max_sets:
            raise ValueError(f"locating e_max = {e_max} of N = {n_workers} workers searches C({n_workers}, "
                             f"{e_max}) = {math.comb(n_workers, e_max)} removal sets, over its 'max_sets' "
                             f"{max_sets}; lower e_max or raise max_sets.")
        self.cache = ByteLRU(CACHE_BYTES)  # (pattern, e) -> its removal sets, forms and operators
        self.last_located: Optional[torch.Tensor] = None

    def capacity(self, m: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def operators(self, used: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        """For the kept workers ``keep`` (boolean over the m answering ``used``): the symmetric ``(m, m)`` form of
        their misfit, and the ``(m, m)`` operator giving every answering worker's residual against the curve
        fitted to the kept ones."""
        raise NotImplementedError

    def forms(self, used: np.ndarray, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The removal sets ``(C, e)`` (positions among the answering), their misfit forms and residual
        operators ``(C, m, m)``; kept for the patterns used last, up to CACHE_BYTES."""
        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            m = int(used.sum())
            sets = list(itertools.combinations(range(m), e))
            forms, ops = np.empty((len(sets), m, m)), np.empty((len(sets), m, m))
            for c, removed in enumerate(sets):
                keep = np.ones(m, dtype=bool)
                keep[list(removed)] = False
                forms[c], ops[c] = self.operators(used, keep)
            return (torch.tensor(sets, dtype=torch.long).reshape(len(sets), e),
                    torch.from_numpy(forms), torch.from_numpy(ops))

        return self.cache.get((used.tobytes(), e), build)

    @torch.no_grad()
    def locate(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` boolean: the answering workers judged corrupted (none where e_max = 0)."""
        located = torch.zeros_like(available)
        if self.e_max == 0:
            return located
        patterns, index = torch.unique(available.cpu(), dim=0, return_inverse=True)
        values_all = outputs.detach().cpu()  # one copy to the host, not one per pattern
        for row, pattern in enumerate(patterns):
            used = pattern.numpy()
            m = int(used.sum())
            e = min(self.e_max, self.capacity(m))
            if e < 1:
                continue
            members = (index == row).nonzero().flatten()
            cols = torch.from_numpy(used.nonzero()[0])
            values = values_all[members][:, cols].double()  # (b, m, n)
            sets, forms, ops = self.forms(used, e)
            which = quadratic_scores(values, forms).argmin(1)  # (b,)
            removed = sets[which]  # (b, e)
            misses = torch.matmul(ops[which], values).pow(2).sum(-1)  # (b, m): each worker's squared miss
            kept = torch.ones_like(misses, dtype=torch.bool).scatter(1, removed, False)
            scale = (misses * kept).sum(1) / kept.sum(1)
            floor = ZERO * values.pow(2).sum((1, 2)) / m
            bar = self.threshold ** 2 * torch.maximum(scale, floor)
            flagged = misses.gather(1, removed) > bar.unsqueeze(1)  # (b, e)
            rows, slots = flagged.nonzero(as_tuple=True)
            located[members[rows].to(located.device), cols[removed[rows, slots]].to(located.device)] = True
        return located

    def forward(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        located = self.locate(outputs, available)
        self.last_located = located
        keep = available & ~located
        return self.plain(outputs * keep.unsqueeze(-1).to(outputs.dtype), keep)


def loo_operator(fit: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``(m, m)``: every worker's miss against the curve fitted to the kept ones (``fit``, ``(m, kept)``, linear
    in the kept values): the removed workers' misses as they are, the kept workers' as leave-one-out misses,
    ``r_i / (1 - h_ii)`` (exact for least squares and for smoothing splines), so both are out-of-sample."""
    op = np.eye(len(keep))
    op[:, keep] -= fit
    leverage = np.zeros(len(keep))
    leverage[keep] = np.diag(fit[keep])
    return op / np.maximum(1 - leverage, 1e-6)[:, None]


def berrut_denominator(alpha: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """``D(z) = sum_j w_j prod_{l != j} (z - alpha_l)`` at the points ``at``, scaled to a largest |D| of 1."""
    w = berrut_weights(alpha)
    diff = at.double().unsqueeze(1) - alpha.double().unsqueeze(0)  # (p, K)
    k = len(alpha)
    others = torch.stack([torch.cat([diff[:, :j], diff[:, j + 1:]], 1).prod(1) for j in range(k)], 1)
    d = (others * w).sum(1)
    return d / d.abs().max()


class LocatingBerrutDecoder(Placed, LocatingDecoder):
    """Berrut's decoder after the locator has dropped up to ``e_max`` workers (module docstring). ``degree``
    (default K - 1, exact for an affine F) is the polynomial degree of the scaled outputs. Placed as the Berrut
    coders (``data_points`` / ``worker_points``, or the older ``points`` for the workers)."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], e_max: int = 1, degree: Optional[int] = None,
                 threshold: float = 5.0, max_sets: int = 5000, points: Optional[str] = None,
                 data_points: Optional[str] = None, worker_points: Optional[str] = None):
        super().__init__(k, n_workers, in_dim, e_max, threshold, max_sets)
        self.degree = k - 1 if degree is None else _check_int("degree", degree, 0)
        alpha, beta = self.place(k, n_workers, points, data_points, worker_points)
        self.plain = BerrutDecoder(k, n_workers, in_dim, data_points=self.data_points, worker_points=self.worker_points)
        # the rational functions T_j(z) / D(z), j = 0..degree (T_j Chebyshev's polynomials: well conditioned), at
        # the worker points: the outputs' misfit is measured where they live, not scaled by D
        denominator = berrut_denominator(alpha, beta).numpy()
        self.basis = np.polynomial.chebyshev.chebvander(beta.numpy(), self.degree) / denominator[:, None]

    def capacity(self, m: int) -> int:
        return max(0, (m - self.degree - 1) // 2)

    def operators(self, used: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        basis = self.basis[used]
        fit = basis @ np.linalg.pinv(basis[keep])  # (m, kept): the least-squares curve through the kept, everywhere
        kept = np.eye(len(keep))[keep]
        kept[:, keep] -= fit[keep]
        return kept.T @ kept, loo_operator(fit, keep)


class LocatingSplineDecoder(Placed, LocatingDecoder):
    """LeTCC's spline decoder (``lam``, a number) after a trimmed penalised fit (``locate_lam``) has dropped up
    to ``e_max`` workers (module docstring). Placed as the spline coders (``data_points`` / ``worker_points``, or the
    older ``points`` for both)."""

    points_moves_data = True
    min_answering = MIN_POINTS

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], e_max: int = 1, lam: float = 0.0,
                 locate_lam: float = 1e-3, threshold: float = 5.0, max_sets: int = 5000, points: Optional[str] = None,
                 data_points: Optional[str] = None, worker_points: Optional[str] = None):
        super().__init__(k, n_workers, in_dim, e_max, threshold, max_sets)
        check_lam(locate_lam, allow_gcv=False)
        if not locate_lam > 0:
            raise ValueError(f"its 'locate_lam' must be > 0 (an interpolating spline fits any outlier); "
                             f"got {locate_lam!r}.")
        self.locate_lam = float(locate_lam)
        self.place(k, n_workers, points, data_points, worker_points)
        self.plain = SplineDecoder(k, n_workers, in_dim, lam=lam, data_points=self.data_points,
                                   worker_points=self.worker_points)

    def capacity(self, m: int) -> int:
        return max(0, min((m - self.k) // 2, m - MIN_POINTS))

    def operators(self, used: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nodes = self.plain.beta[used]
        fit = smoother_matrix(nodes[keep], nodes, self.locate_lam)  # (m, kept): the kept workers' spline, everywhere
        form = np.zeros((len(keep), len(keep)))
        hat = fit[keep]
        form[np.ix_(keep, keep)] = np.eye(int(keep.sum())) - (hat + hat.T) / 2
        return form, loo_operator(fit, keep)


class LocatingMLPDecoder(MLPDecoder):
    """The learned decoder (coders.nworker.MLPDecoder, residual over Berrut) on the outputs the Berrut locator
    keeps (``e_max``, ``degree``, ``threshold`` as for :class:`LocatingBerrutDecoder`), both placed by
    ``data_points`` / ``worker_points``."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], hidden: Optional[int] = None,
                 e_max: int = 1, degree: Optional[int] = None, threshold: float = 5.0, max_sets: int = 5000,
                 data_points: Optional[str] = None, worker_points: Optional[str] = None):
        super().__init__(k, n_workers, in_dim, hidden=hidden, residual=True, data_points=data_points,
                         worker_points=worker_points)
        self.locator = LocatingBerrutDecoder(k, n_workers, in_dim, e_max, degree, threshold, max_sets,
                                             data_points=self.data_points, worker_points=self.worker_points)
        self.last_located: Optional[torch.Tensor] = None

    def forward(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        located = self.locator.locate(outputs, available)
        self.last_located = located
        keep = available & ~located
        return super().forward(outputs * keep.unsqueeze(-1).to(outputs.dtype), keep)
