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

**How many to drop.** Removing workers always lowers a misfit, so a removal
must earn its place: the decoder takes the e (0 to ``e_max``) minimising
``misfit_e * gain^e``, each dropped worker having to cut the misfit by the
factor ``gain`` (default 10), with misfits below ``1e-10`` of the outputs'
energy counted as zero. With no corrupted worker and data on the curve (an
affine F for Berrut) nothing is dropped, and the decoder is the plain one.
``last_located`` holds the ``(B, N)`` mask of the workers it dropped.

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
from coders.nworker import BerrutDecoder, MLPDecoder, NWorkerDecoder, chebyshev_points
from coders.spline import MIN_POINTS, SplineDecoder, check_lam, smoother_matrix

ZERO = 1e-10  # misfits below this share of the outputs' energy count as zero
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
    """The search shared by the locating decoders: subclasses give the misfit forms of a kept set
    (:meth:`misfit_form`), the scaled values (:meth:`scaled`), the most workers a pattern of m can drop
    (:meth:`capacity`) and the plain decoder (``self.plain``)."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], e_max: int = 1, gain: float = 10.0,
                 max_sets: int = 5000):
        super().__init__(k, n_workers, in_dim)
        self.e_max = _check_int("e_max", e_max, 0)
        self.max_sets = _check_int("max_sets", max_sets, 1)
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not gain > 1:
            raise ValueError(f"its 'gain' must be a number > 1; got {gain!r}.")
        self.gain = float(gain)
        if math.comb(n_workers, e_max) > max_sets:
            raise ValueError(f"locating e_max = {e_max} of N = {n_workers} workers searches C({n_workers}, "
                             f"{e_max}) = {math.comb(n_workers, e_max)} removal sets, over its 'max_sets' "
                             f"{max_sets}; lower e_max or raise max_sets.")
        self._forms: dict = {}
        self._bytes = 0
        self.last_located: Optional[torch.Tensor] = None

    def capacity(self, m: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def misfit_form(self, used: np.ndarray, keep: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        """``(m, m)`` symmetric: the misfit of the kept workers ``keep`` (boolean over the m answering ``used``)."""
        raise NotImplementedError

    def scaled(self, values: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        return values

    def forms(self, used: np.ndarray, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The removal sets ``(C, e)`` (positions among the answering) and their misfit forms ``(C, m, m)``."""
        key = (used.tobytes(), e)
        if key not in self._forms:
            m = int(used.sum())
            sets = list(itertools.combinations(range(m), e))
            forms = np.empty((len(sets), m, m))
            for c, removed in enumerate(sets):
                keep = np.ones(m, dtype=bool)
                keep[list(removed)] = False
                forms[c] = self.misfit_form(used, keep)
            entry = (torch.tensor(sets, dtype=torch.long).reshape(len(sets), e), torch.from_numpy(forms))
            while self._forms and self._bytes + forms.nbytes > CACHE_BYTES:  # the oldest go first
                self._bytes -= next(iter(self._forms.values()))[1].numpy().nbytes
                del self._forms[next(iter(self._forms))]
            self._forms[key] = entry
            self._bytes += forms.nbytes
        return self._forms[key]

    @torch.no_grad()
    def locate(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` boolean: the answering workers judged corrupted (none where e_max = 0)."""
        located = torch.zeros_like(available)
        if self.e_max == 0:
            return located
        patterns, index = torch.unique(available.cpu(), dim=0, return_inverse=True)
        for row, pattern in enumerate(patterns):
            used = pattern.numpy()
            top = min(self.e_max, self.capacity(int(used.sum())))
            if top < 1:
                continue
            members = (index == row).nonzero().flatten()
            cols = torch.from_numpy(used.nonzero()[0])
            values = self.scaled(outputs.detach().cpu()[members][:, cols].double(), cols)
            floor = ZERO * values.pow(2).sum((1, 2))
            best, choice = [], []
            for e in range(top + 1):
                sets, forms = self.forms(used, e)
                misfit, which = quadratic_scores(values, forms).min(1)
                best.append(torch.maximum(misfit, floor) * self.gain ** e)
                choice.append(sets[which])  # (b, e)
            pick = torch.stack(best, 1).argmin(1)
            for e in range(1, top + 1):
                rows = (pick == e).nonzero().flatten()
                if len(rows):
                    located[members[rows].unsqueeze(1).to(located.device),
                            cols[choice[e][rows]].to(located.device)] = True
        return located

    def forward(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        located = self.locate(outputs, available)
        self.last_located = located
        keep = available & ~located
        return self.plain(outputs * keep.unsqueeze(-1).to(outputs.dtype), keep)


def berrut_denominator(alpha: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """``D(z) = sum_j w_j prod_{l != j} (z - alpha_l)`` at the points ``at``, scaled to a largest |D| of 1."""
    w = berrut_weights(alpha)
    diff = at.double().unsqueeze(1) - alpha.double().unsqueeze(0)  # (p, K)
    k = len(alpha)
    others = torch.stack([torch.cat([diff[:, :j], diff[:, j + 1:]], 1).prod(1) for j in range(k)], 1)
    d = (others * w).sum(1)
    return d / d.abs().max()


class LocatingBerrutDecoder(LocatingDecoder):
    """Berrut's decoder after the locator has dropped up to ``e_max`` workers (module docstring). ``degree``
    (default K - 1, exact for an affine F) is the polynomial degree of the scaled outputs."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], e_max: int = 1, degree: Optional[int] = None,
                 gain: float = 10.0, max_sets: int = 5000, points: str = "first"):
        super().__init__(k, n_workers, in_dim, e_max, gain, max_sets)
        self.degree = k - 1 if degree is None else _check_int("degree", degree, 0)
        self.plain = BerrutDecoder(k, n_workers, in_dim, points=points)
        beta = chebyshev_points(n_workers, points)
        self.register_buffer("scale", berrut_denominator(chebyshev_points(k), beta), persistent=False)
        # Chebyshev polynomials T_0..T_degree at the worker points: a well-conditioned basis
        self.basis = np.polynomial.chebyshev.chebvander(beta.numpy(), self.degree)  # (N, degree + 1)

    def capacity(self, m: int) -> int:
        return max(0, (m - self.degree - 1) // 2)

    def scaled(self, values: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        return values * self.scale.cpu()[used].unsqueeze(-1)

    def misfit_form(self, used: np.ndarray, keep: np.ndarray) -> np.ndarray:
        basis = self.basis[used] * keep[:, None]
        q, _ = np.linalg.qr(basis)
        return np.diag(keep.astype(float)) - q @ q.T  # the residual projector on the kept rows


class LocatingSplineDecoder(LocatingDecoder):
    """LeTCC's spline decoder (``lam``, a number) after a trimmed penalised fit (``locate_lam``) has dropped up
    to ``e_max`` workers (module docstring)."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], e_max: int = 1, lam: float = 0.0,
                 locate_lam: float = 1e-3, gain: float = 10.0, max_sets: int = 5000, points: str = "first"):
        super().__init__(k, n_workers, in_dim, e_max, gain, max_sets)
        check_lam(locate_lam, allow_gcv=False)
        if not locate_lam > 0:
            raise ValueError(f"its 'locate_lam' must be > 0 (an interpolating spline fits any outlier); "
                             f"got {locate_lam!r}.")
        self.locate_lam = float(locate_lam)
        self.plain = SplineDecoder(k, n_workers, in_dim, lam=lam, points=points)
        self.min_answering = MIN_POINTS

    def capacity(self, m: int) -> int:
        return max(0, min((m - self.k) // 2, m - MIN_POINTS))

    def misfit_form(self, used: np.ndarray, keep: np.ndarray) -> np.ndarray:
        nodes = self.plain.beta[used][keep]
        hat = smoother_matrix(nodes, nodes, self.locate_lam)
        form = np.zeros((len(keep), len(keep)))
        form[np.ix_(keep, keep)] = np.eye(len(nodes)) - (hat + hat.T) / 2
        return form


class LocatingMLPDecoder(MLPDecoder):
    """The learned decoder (coders.nworker.MLPDecoder, residual over Berrut) on the outputs the Berrut locator
    keeps (``e_max``, ``degree``, ``gain`` as for :class:`LocatingBerrutDecoder`)."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], hidden: Optional[int] = None,
                 e_max: int = 1, degree: Optional[int] = None, gain: float = 10.0, max_sets: int = 5000):
        super().__init__(k, n_workers, in_dim, hidden=hidden, residual=True)
        self.locator = LocatingBerrutDecoder(k, n_workers, in_dim, e_max, degree, gain, max_sets)
        self.last_located: Optional[torch.Tensor] = None

    def forward(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        located = self.locator.locate(outputs, available)
        self.last_located = located
        keep = available & ~located
        return super().forward(outputs * keep.unsqueeze(-1).to(outputs.dtype), keep)
