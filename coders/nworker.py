"""N-worker (non-systematic) codes: the coded-computing literature's form.

K data inputs are encoded into N coded inputs, one per worker; every worker
computes F on its coded input, and the outputs of any N - S workers (S
stragglers) decode all K outputs. No worker sees a raw input, so every
answer is the decoder's, and approximate for a non-linear F. (The systematic
form, k data + r parity workers with data outputs returned as they are, is
:class:`coders.code.Code`.)

Shapes, with B groups of K inputs and n outputs of F:

* an :class:`NWorkerEncoder` maps ``(B, K, D) -> (B, N, D)`` (D: an input flattened);
* an :class:`NWorkerDecoder` maps worker outputs ``(B, N, n)``, unavailable ones
  zeroed, and the availability ``(B, N)`` (True where a worker answered) to
  ``(B, K, n)``.

Families here: Berrut's rational interpolant as BACC / ApproxIFER use it
(:class:`BerrutEncoder`, :class:`BerrutDecoder`), a learned pair
(:class:`MLPEncoder`, :class:`MLPDecoder`); LeTCC's smoothing splines are in
``coders/spline.py``. :class:`NWorkerCode` is the computation itself (encode ->
F on every worker -> decode) that training, evaluation and tests all call.

Placements (:func:`chebyshev_points`, :func:`placement`). Where the K data points
and the N worker points sit on [-1, 1] is an option of every coder here, for
the data (``data_points``) and the workers (``worker_points``) separately:

* ``"chebyshev1"``: first-kind Chebyshev points ``cos((2i + 1) pi / (2m))`` (interior);
* ``"chebyshev2"``: second-kind points ``cos(i pi / (m - 1))``, both ends included; ApproxIFER's latency
  scripts place the workers so (alias ``"approxifer-latency"``);
* ``"approxifer"``: ``cos(i pi / m)``, i = 0..m-1 (1 included, -1 not): ApproxIFER's accuracy placement
  of the workers, its data points being first-kind;
* ``"uniform"``: equally spaced from -1 to 1.

The defaults are the first kind for both. The older ``points`` argument still
works with its old meaning (``"first"`` = chebyshev1, ``"second"`` = chebyshev2):
for Berrut it places the workers only (data stay first-kind), for the splines
both.

Berrut N-worker code. Worker i receives ``u(beta_i)``, where u is Berrut's
interpolant through ``(alpha_j, X_j)`` (alpha: data points, beta: worker
points); the decoder evaluates Berrut's interpolant through the answering
workers' ``(beta_i, F(u(beta_i)))`` at every ``alpha_j``. The interpolant and
its weights are those of ``coders/berrut.py``; the decoder applies it in
factored form (a fixed ``(K, N)`` Cauchy matrix ``1 / (alpha_j - beta_i)``
times the weighted outputs, divided by the same matrix times the weights), so
no ``(B, K, N)`` matrix is built per batch. Where the code is exact:
Berrut's interpolant reproduces constants and passes through its nodes, so
the rebuilt output j equals F(X_j) whenever ``alpha_j`` is itself an
answering worker's point (the K first-kind points are among the N first-kind
points when N is an odd multiple of K), and for any F when K = 1.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch
from torch import nn

from coders.berrut import berrut_coefficients, berrut_weights
from coders.coder import check_size
from util.classpath import build, spec_name
from util.errors import ConfigError
from util.shapes import get_flattened_dim

POINT_KINDS = ("chebyshev1", "chebyshev2", "approxifer", "uniform")
POINT_ALIASES = {"first": "chebyshev1", "second": "chebyshev2", "approxifer-latency": "chebyshev2"}


def check_nworker_sizes(name: str, k: int, n_workers: int) -> None:
    """Raise ``ValueError`` unless ``K >= 1`` and ``N >= 1``."""
    if k < 1 or n_workers < 1:
        raise ValueError(f"{name} needs K >= 1 data inputs and N >= 1 workers; got K = {k}, N = {n_workers}.")


def point_kind(kind, key: str = "points") -> str:
    """The placement named ``kind`` (an alias resolved); a ValueError naming ``key`` and the choices otherwise."""
    name = POINT_ALIASES.get(kind, kind) if isinstance(kind, str) else kind
    if name not in POINT_KINDS:
        aliases = ", ".join(f"{a} = {b}" for a, b in POINT_ALIASES.items())
        raise ValueError(f"its '{key}' must be one of {', '.join(POINT_KINDS)} (aliases: {aliases}); got {kind!r}.")
    return name


def chebyshev_points(m: int, kind: str = "first") -> torch.Tensor:
    """m points on [-1, 1], ascending, float64, placed by ``kind`` (module docstring; aliases accepted).

    ``"chebyshev1"`` (``"first"``): ``cos((2i + 1) pi / (2m))``, the zeros of T_m, interior;
    ``"chebyshev2"`` (``"second"``): ``cos(i pi / (m - 1))``, the extrema of T_{m-1}, both ends included;
    ``"approxifer"``: ``cos(i pi / m)``, i = 0..m-1: 1 included, -1 not;
    ``"uniform"``: equally spaced from -1 to 1. A single point is 0 for ``"chebyshev2"`` and ``"uniform"``.
    """
    kind = point_kind(kind)
    i = torch.arange(m, dtype=torch.float64)
    if kind == "chebyshev1":
        points = torch.cos((2 * i + 1) * math.pi / (2 * m))
    elif kind == "approxifer":
        points = torch.cos(i * math.pi / m)
    elif m == 1:
        points = torch.zeros(1, dtype=torch.float64)
    elif kind == "chebyshev2":
        points = torch.cos(i * math.pi / (m - 1))
    else:
        return torch.linspace(-1, 1, m, dtype=torch.float64)
    return points.flip(0)


def placement(points: Optional[str], data_points: Optional[str], worker_points: Optional[str],
              points_moves_data: bool) -> tuple[str, str]:
    """``(data placement, worker placement)`` of a coder's arguments (module docstring). The older
    ``points`` places the workers, and the data too where ``points_moves_data`` (the splines); it cannot be
    given with either of the newer two."""
    if points is not None and (data_points is not None or worker_points is not None):
        raise ValueError("give either its older 'points' or 'data_points' / 'worker_points', not both "
                         "(data_points and worker_points place the two separately).")
    old = point_kind(points, "points") if points is not None else "chebyshev1"
    data = point_kind(data_points, "data_points") if data_points is not None else \
        (old if points_moves_data else "chebyshev1")
    worker = point_kind(worker_points, "worker_points") if worker_points is not None else old
    return data, worker


class Placed:
    """Mixin of the coders placed on [-1, 1]: ``data_points`` and ``worker_points`` (names, for the
    record and the encoder / decoder agreement check) from the coder's arguments (:func:`placement`)."""

    points_moves_data = False  # the older 'points' argument places the workers only (Berrut)

    def place(self, k: int, n_workers: int, points, data_points, worker_points) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha (K,), beta (N,))``, float64, ascending."""
        self.data_points, self.worker_points = placement(points, data_points, worker_points, self.points_moves_data)
        return chebyshev_points(k, self.data_points), chebyshev_points(n_workers, self.worker_points)


def build_nworker_coders(encoder, decoder, k: int, n_workers: int, in_shape, n_out: int):
    """The encoder and decoder named by the specs ``encoder`` and ``decoder`` (one ``enc_dec_types`` pair), built as
    ``cls(K, N, in_dim, **args)``; a refusal is a ConfigError naming 'enc_dec_types'. Training, evaluation and
    :func:`coders.code.load_code` (serving) all build N-worker coders here."""
    modules = []
    for which, cspec, dim in (("encoder", encoder, [-1, *in_shape]), ("decoder", decoder, [-1, n_out])):
        try:
            modules.append(build(cspec, "enc_dec_types", k, n_workers, dim))
        except ValueError as exc:
            raise ConfigError(f"Config key 'enc_dec_types': N-worker {which} {spec_name(cspec)} cannot serve "
                              f"K={k}, N={n_workers} with size {dim}: {exc} Fix: change k_vals, "
                              f"n_workers or the coder's args.") from None
        except TypeError as exc:
            raise ConfigError(f"Config key 'enc_dec_types': N-worker {which} {spec_name(cspec)} could not be built "
                              f"({exc}). Fix: name an N-worker coder (coders/nworker.py, coders/spline.py) taking "
                              f"(K, N, in_dim, ...).") from None
    places = [(getattr(m, "data_points", None), getattr(m, "worker_points", None)) for m in modules]
    if None not in places[0] + places[1] and places[0] != places[1]:
        raise ConfigError(f"Config key 'enc_dec_types': the encoder {spec_name(encoder)} places data and workers "
                          f"at {places[0][0]} / {places[0][1]} points, the decoder {spec_name(decoder)} at "
                          f"{places[1][0]} / {places[1][1]}: it would decode at points the encoder did not use. "
                          f"Fix: give both the same 'data_points' and 'worker_points' (the older 'points' places "
                          f"Berrut's workers only, the splines' data and workers).")
    return modules


class NWorkerEncoder(nn.Module):
    """``(B, K, D) -> (B, N, D)``: the N workers' coded inputs."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int]):
        super().__init__()
        check_nworker_sizes(type(self).__name__, k, n_workers)
        self.k, self.n_workers, self.in_dim = k, n_workers, list(in_dim)

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class NWorkerDecoder(nn.Module):
    """``(B, N, n)`` worker outputs (unavailable ones zeroed) and ``(B, N)`` availability -> ``(B, K, n)``.
    ``min_answering``: the fewest answering workers it decodes from (random stragglers are drawn with at least
    this many answering)."""

    min_answering = 1

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int]):
        super().__init__()
        check_nworker_sizes(type(self).__name__, k, n_workers)
        self.k, self.n_workers, self.in_dim = k, n_workers, list(in_dim)

    def forward(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class BerrutEncoder(Placed, NWorkerEncoder):
    """Worker i gets Berrut's interpolant of the K inputs at worker point i (module docstring)."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], points: Optional[str] = None,
                 data_points: Optional[str] = None, worker_points: Optional[str] = None):
        super().__init__(k, n_workers, in_dim)
        alpha, beta = self.place(k, n_workers, points, data_points, worker_points)
        matrix = berrut_coefficients(alpha, beta, berrut_weights(alpha))  # (N, K)
        self.register_buffer("matrix", matrix, persistent=False)
        self.register_buffer("matrix32", matrix.float(), persistent=False)  # float32 inputs: no cast per call

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:
        matrix = self.matrix32 if in_data.dtype == torch.float32 else self.matrix.to(in_data.dtype)
        return torch.matmul(matrix, in_data)


class BerrutDecoder(Placed, NWorkerDecoder):
    """Berrut's interpolant through the answering workers, evaluated at the K data points, in factored form:
    ``(C (w * y)) / (C w)`` with the fixed Cauchy matrix ``C = 1 / (alpha_j - beta_i)`` ``(K, N)`` and each
    group's weights w (``berrut_weights`` over its answering workers). A data point that is a worker point
    (``C`` infinite there) takes that worker's output when it answered: the interpolant passes through it."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], points: Optional[str] = None,
                 data_points: Optional[str] = None, worker_points: Optional[str] = None):
        super().__init__(k, n_workers, in_dim)
        alpha, beta = self.place(k, n_workers, points, data_points, worker_points)
        self.register_buffer("alpha", alpha, persistent=False)
        self.register_buffer("beta", beta, persistent=False)
        diff = alpha.unsqueeze(1) - beta.unsqueeze(0)  # (K, N)
        hit = diff == 0
        self.register_buffer("cauchy", torch.where(hit, 0.0, 1.0 / torch.where(hit, 1.0, diff)), persistent=False)
        self.register_buffer("has_hit", hit.any(1), persistent=False)  # (K,): alpha_j is a worker's point
        self.register_buffer("hit_worker", hit.double().argmax(1), persistent=False)  # (K,): which (0 if none)

    def forward(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        if bool((~available.any(dim=1)).any()):
            raise ValueError("the Berrut decoder needs at least one answering worker in every group.")
        weights = berrut_weights(self.beta, available)  # (B, N) float64, zero at stragglers
        denominator = weights @ self.cauchy.T  # (B, K), in float64: the alternating sum cancels
        numerator = torch.matmul(self.cauchy.to(outputs.dtype), weights.to(outputs.dtype).unsqueeze(-1) * outputs)
        denominator = torch.where(denominator == 0, 1.0, denominator)  # only where the row takes its hit below
        rebuilt = numerator / denominator.to(outputs.dtype).unsqueeze(-1)
        if not bool(self.has_hit.any()):
            return rebuilt
        take = self.has_hit & available[:, self.hit_worker]  # (B, K)
        return torch.where(take.unsqueeze(-1), outputs[:, self.hit_worker], rebuilt)


class MLPEncoder(Placed, NWorkerEncoder):
    """Learned: Linear(K*D, h) -> ReLU -> Linear(h, N*D) over the K inputs stacked (h = ``hidden``,
    default K*D). With ``residual`` (default) the network learns a correction to Berrut's
    encoding (placed by ``data_points`` / ``worker_points``), so training starts from the Berrut code
    instead of from noise."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], hidden: Optional[int] = None,
                 residual: bool = True, data_points: Optional[str] = None, worker_points: Optional[str] = None):
        super().__init__(k, n_workers, in_dim)
        self.place(k, n_workers, None, data_points, worker_points)
        d = get_flattened_dim(in_dim)
        h = check_size(hidden, k * d)
        self.nn = nn.Sequential(nn.Linear(k * d, h), nn.ReLU(), nn.Linear(h, n_workers * d))
        self.start = BerrutEncoder(k, n_workers, in_dim, data_points=self.data_points,
                                   worker_points=self.worker_points) if residual else None
        if residual:  # the correction starts at zero: the untrained code is Berrut's
            nn.init.zeros_(self.nn[-1].weight)
            nn.init.zeros_(self.nn[-1].bias)

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:
        b, k, d = in_data.shape
        out = self.nn(in_data.reshape(b, k * d)).view(b, self.n_workers, d)
        return out if self.start is None else out + self.start(in_data)


class MLPDecoder(Placed, NWorkerDecoder):
    """Learned: the N outputs (stragglers zeroed) and the availability mask, stacked, through
    Linear -> ReLU -> Linear -> ReLU -> Linear to K*n (widths ``hidden``, default N*n). With
    ``residual`` (default) it learns a correction to Berrut's decoding (placed as the encoder's)."""

    def __init__(self, k: int, n_workers: int, in_dim: Sequence[int], hidden: Optional[int] = None,
                 residual: bool = True, data_points: Optional[str] = None, worker_points: Optional[str] = None):
        super().__init__(k, n_workers, in_dim)
        self.place(k, n_workers, None, data_points, worker_points)
        n = get_flattened_dim(in_dim)
        m = n_workers * (n + 1)
        h = check_size(hidden, n_workers * n)
        self.nn = nn.Sequential(nn.Linear(m, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k * n))
        self.start = BerrutDecoder(k, n_workers, in_dim, data_points=self.data_points,
                                   worker_points=self.worker_points) if residual else None
        if residual:
            nn.init.zeros_(self.nn[-1].weight)
            nn.init.zeros_(self.nn[-1].bias)

    def forward(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        b, m, n = outputs.shape
        flat = torch.cat([outputs.reshape(b, m * n), available.to(outputs.dtype)], 1)
        out = self.nn(flat).view(b, self.k, n)
        return out if self.start is None else out + self.start(outputs, available)


# -- straggler patterns ------------------------------------------------------------------------------
def pattern_count(n_workers: int, stragglers: int) -> int:
    """C(N, S): how many sets of S late workers there are."""
    return math.comb(n_workers, stragglers)


def patterns_used(n_workers: int, stragglers: int, max_patterns: int) -> int:
    """``min(C(N, S), max_patterns)``, without computing a huge C(N, S) in full."""
    count = 1
    for i in range(min(stragglers, n_workers - stragglers)):
        count = count * (n_workers - i) // (i + 1)
        if count > max_patterns:
            return max_patterns
    return min(count, max_patterns)


def straggler_patterns(n_workers: int, stragglers: int, max_patterns: int, seed: int = 0) -> torch.Tensor:
    """Boolean ``(P, N)``, True where a worker answers; S workers are late in every row.

    Every pattern (``itertools.combinations`` order) when there are at most
    ``max_patterns`` of them; otherwise ``max_patterns`` distinct patterns
    drawn with ``seed`` (the same seed draws the same patterns, in order).
    """
    if not 0 <= stragglers < n_workers:
        raise ValueError(f"needs 0 <= S < N (at least one worker answers); got N = {n_workers}, S = {stragglers}.")
    if max_patterns < 1:
        raise ValueError(f"max_patterns must be 1 or more; got {max_patterns}.")
    total = pattern_count(n_workers, stragglers)
    if total <= max_patterns:
        late_sets = list(itertools.combinations(range(n_workers), stragglers))
    else:
        gen = torch.Generator().manual_seed(seed)
        seen, late_sets = set(), []
        while len(late_sets) < max_patterns:  # distinct sets; total > max_patterns, so this ends
            late = tuple(sorted(torch.randperm(n_workers, generator=gen)[:stragglers].tolist()))
            if late not in seen:
                seen.add(late)
                late_sets.append(late)
    rows = torch.ones(len(late_sets), n_workers, dtype=torch.bool)
    for row, late in zip(rows, late_sets):
        row[list(late)] = False
    return rows


# -- the computation ---------------------------------------------------------------------------------
class NWorkerCode(nn.Module):
    """F (frozen), an N-worker encoder and decoder: the one computation of an N-worker code.

    Data ``(B, K, *shape)`` -> coded inputs ``(B, N, *shape)`` -> worker outputs
    ``(B, N, n)`` -> rebuilt outputs ``(B, K, n)`` from the workers marked available.
    """

    def __init__(self, base: nn.Module, encoder: NWorkerEncoder, decoder: NWorkerDecoder,
                 k: int, n_workers: int, stragglers: int):
        super().__init__()
        self.base = base.requires_grad_(False).eval()
        self.encoder, self.decoder = encoder, decoder
        self.k, self.n_workers, self.stragglers = k, n_workers, stragglers

    def train(self, mode: bool = True) -> "NWorkerCode":
        super().train(mode)
        self.base.eval()  # F never leaves eval mode
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K, *shape) -> (B, N, *shape)``."""
        b, shape = x.shape[0], x.shape[2:]
        return self.encoder(x.reshape(b, self.k, -1)).reshape(b, self.n_workers, *shape)

    def worker_outputs(self, coded: torch.Tensor) -> torch.Tensor:
        """``(B, N, *shape) -> (B, N, n)``: F on every coded input (what the workers compute)."""
        b = coded.shape[0]
        return self.base(coded.flatten(0, 1)).reshape(b, self.n_workers, -1)

    def decode(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """``(B, N, n)`` outputs and ``(B, N)`` availability -> ``(B, K, n)``. Late workers' outputs
        are replaced by zeros here, whatever they hold (NaN included), so the decoder never reads them."""
        masked = torch.where(available.unsqueeze(-1), outputs, torch.zeros((), dtype=outputs.dtype,
                                                                          device=outputs.device))
        return self.decoder(masked, available)

    def decode_groups(self, outputs: torch.Tensor, available: torch.Tensor, groups) -> torch.Tensor:
        """Serving's decode of whole groups (their numbers ``groups``, which seed a perturbation: none here)."""
        return self.decode(outputs, available)

    def decode_patterns(self, outputs: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
        """``(B, N, n)`` outputs and P patterns ``(P, N)`` -> ``(P, B, K, n)``, in one decoder call."""
        b = outputs.shape[0]
        p = patterns.shape[0]
        avail = patterns.repeat_interleave(b, 0)  # (P * B, N), pattern-major
        out = self.decode(outputs.repeat(p, 1, 1), avail)
        return out.view(p, b, self.k, -1)

    def forward_patterns(self, x: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
        """Data ``(B, K, *shape)`` -> rebuilt outputs ``(P, B, K, n)`` under every pattern."""
        return self.decode_patterns(self.worker_outputs(self.encode(x)), patterns)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """The whole coded computation: data ``(B, K, *shape)``, the workers that answered ``(B, N)``
        -> ``(B, K, n)``."""
        return self.decode(self.worker_outputs(self.encode(x)), available)
