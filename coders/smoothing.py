"""LeTCC's spline decoder with its smoothing chosen for noisy workers (config ``output_noise``).

When every worker's output carries noise of standard deviation sigma, an
interpolating decoder (lam = 0) passes through the noise; a smoothing spline
averages it out at the cost of a bias. :class:`NoiseSplineDecoder` chooses
lam for every group from a grid (``lams``, default 0 and 10^-8 .. 10^1) by
one of two rules, both computed from the spline's hat matrix ``H_lam`` on the
m answering points and the residual ``r = (I - H_lam) y`` summed over the n
output coordinates:

* ``"cp"`` (Mallows' C_p, for a known noise level ``sigma``):
  ``|r|^2 + 2 sigma^2 n tr(H_lam)``, an unbiased estimate (up to a constant)
  of the spline's squared error at the answering points when the noise has
  variance sigma^2: the residual falls as lam falls, and the trace term
  charges the noise the spline then follows;
* ``"gcv"`` (generalised cross-validation, no sigma needed):
  ``m |r|^2 / (m - tr H_lam)^2``; lam = 0 (tr H = m) is left out.

One lam per group serves all n coordinates (SciPy's own ``lam="gcv"`` in
coders/spline.py fits each coordinate on its own, one SciPy fit each); the
hat and evaluation matrices of a pattern are fitted once and reused, so the
choice costs a few matrix products per group. The rebuilt outputs are the
chosen spline at the K data points.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from coders.adversary import quadratic_scores
from coders.nworker import NWorkerDecoder, Placed
from coders.spline import DEFAULT_CACHE_MB, MIN_POINTS, check_answering, smoother_matrix
from util.lru import ByteLRU

RULES = ("cp", "gcv")
DEFAULT_LAMS = [0.0] + [float(v) for v in np.logspace(-8, 1, 19)]
CACHE_BYTES = int(DEFAULT_CACHE_MB * 2 ** 20)  # the patterns' matrices kept per decoder, as the spline decoder's


class NoiseSplineDecoder(Placed, NWorkerDecoder):
    """The smoothing spline through the answering workers at the K data points, lam chosen per group by
    ``rule`` ("cp" with the noise's ``sigma``, or "gcv") from ``lams`` (module docstring). Placed as the spline
    coders (``data_points`` / ``worker_points``, or the older ``points`` for both)."""

    points_moves_data = True
    min_answering = MIN_POINTS

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], rule: str = "cp", sigma: Optional[float] = None,
                 lams: Optional[list] = None, points: Optional[str] = None, data_points: Optional[str] = None,
                 worker_points: Optional[str] = None):
        super().__init__(k, n_workers, in_dim)
        if rule not in RULES:
            raise ValueError(f"its 'rule' must be one of {', '.join(RULES)}; got {rule!r}.")
        if rule == "cp" and (isinstance(sigma, bool) or not isinstance(sigma, (int, float))
                             or not (math.isfinite(sigma) and sigma >= 0)):
            raise ValueError(f"the \"cp\" rule needs the noise's standard deviation 'sigma', a number >= 0; "
                             f"got {sigma!r}.")
        lams = DEFAULT_LAMS if lams is None else lams
        if (not isinstance(lams, list) or not lams or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                          or not v >= 0 for v in lams)):
            raise ValueError(f"its 'lams' must be a non-empty list of numbers >= 0; got {lams!r}.")
        self.rule, self.sigma = rule, float(sigma or 0.0)
        self.lams = [float(v) for v in lams if not (rule == "gcv" and v == 0)] or [float(max(lams))]
        alpha, beta = self.place(k, n_workers, points, data_points, worker_points)
        self.alpha, self.beta = alpha.numpy(), beta.numpy()
        self.cache = ByteLRU(CACHE_BYTES)  # pattern -> its residual forms, traces and evaluation matrices
        self.last_lam: Optional[torch.Tensor] = None  # (B,) the lam each group got

    def pattern_mats(self, used: np.ndarray):
        """For one availability row: residual forms ``(G, m, m)``, traces ``(G,)``, evaluation ``(G, K, m)``."""
        def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            nodes = self.beta[used]
            m = len(nodes)
            hats = np.stack([smoother_matrix(nodes, nodes, lam) for lam in self.lams])
            resid = np.eye(m) - hats
            forms = np.einsum("gim,gin->gmn", resid, resid)
            evals = np.stack([smoother_matrix(nodes, self.alpha, lam) for lam in self.lams])
            return tuple(torch.from_numpy(a) for a in (forms, np.trace(hats, axis1=1, axis2=2), evals))

        return self.cache.get(used.tobytes(), build)

    def forward(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        check_answering(available)
        b, _, n = outputs.shape
        out = torch.zeros(b, self.k, n, dtype=torch.float64)
        chosen = torch.zeros(b, dtype=torch.float64)
        values_all = outputs.detach().cpu().double()
        patterns, index = torch.unique(available.cpu(), dim=0, return_inverse=True)
        for row, pattern in enumerate(patterns):
            used = pattern.numpy()
            members = (index == row).nonzero().flatten()
            forms, traces, evals = self.pattern_mats(used)
            values = values_all[members][:, torch.from_numpy(used.nonzero()[0])]
            resid = quadratic_scores(values, forms)  # (b, G)
            m = int(used.sum())
            if self.rule == "cp":
                score = resid + 2 * self.sigma ** 2 * n * traces
            else:
                score = m * resid / (m - traces).clamp_min(1e-9) ** 2
            pick = score.argmin(1)
            out[members] = torch.matmul(evals[pick], values)
            chosen[members] = torch.tensor(self.lams, dtype=torch.float64)[pick]
        self.last_lam = chosen
        return out.to(outputs.device, outputs.dtype)
