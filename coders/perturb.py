"""What can go wrong with an N-worker code's workers besides a fixed number S being late.

* **Adversaries** (:class:`Perturbation`, ``adversaries`` = A): A of the
  answering workers return a corrupted output. ``"gaussian"`` adds
  N(0, scale^2) to every coordinate (ApproxIFER's adversary, scale 100);
  ``"sign"`` returns the output negated; ``"swap"`` (a targeted class swap,
  classifiers) exchanges the output's top class with the ``target`` class
  (``target`` null: the class after the top one), so a decoder that trusts
  the worker is pulled towards the target.
* **Noise** (``noise`` = sigma): every worker's output gets N(0, sigma^2)
  added to each coordinate (noisy computation, as LeTCC analyses it).
* **Probabilistic stragglers** (:func:`late_patterns`, ``straggler_p`` = p):
  each worker is late independently with probability p, so the number late
  is Binomial(N, p); a group decodes from whatever arrived.

Every draw comes from a ``torch.Generator`` the caller seeds, so the same
seed corrupts the same workers of the same groups with the same values.
:class:`PerturbedNWorkerCode` is :class:`coders.nworker.NWorkerCode` with a
perturbation between the workers and the decoder: the one computation that
training, evaluation and the benches of docs/nworker.md call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from coders.nworker import NWorkerCode
from coders.perturb_config import ADVERSARY_KINDS


@dataclass(frozen=True)
class Perturbation:
    """A corrupted workers among the answering ones (``kind``, ``scale``, ``target``), then noise of
    standard deviation ``noise`` on every output. ``Perturbation()`` changes nothing."""

    adversaries: int = 0
    kind: str = "gaussian"
    scale: float = 100.0
    target: Optional[int] = None
    noise: float = 0.0

    @classmethod
    def of(cls, cfg) -> "Perturbation":
        """The perturbation a run config's keys name."""
        return cls(cfg.adversaries, cfg.adversary, float(cfg.adversary_scale), cfg.adversary_target,
                   float(cfg.output_noise))

    def __post_init__(self):
        if isinstance(self.adversaries, bool) or not isinstance(self.adversaries, int) or self.adversaries < 0:
            raise ValueError(f"the number of adversaries must be an integer >= 0; got {self.adversaries!r}.")
        if self.kind not in ADVERSARY_KINDS:
            raise ValueError(f"the adversary must be one of {', '.join(ADVERSARY_KINDS)}; got {self.kind!r}.")
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"the adversary's scale must be a finite number >= 0; got {self.scale!r}.")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"the noise's standard deviation must be a finite number >= 0; got {self.noise!r}.")
        if self.target is not None and (isinstance(self.target, bool) or not isinstance(self.target, int)
                                        or self.target < 0):
            raise ValueError(f"the swap's target class must be an integer >= 0 or null; got {self.target!r}.")

    @property
    def active(self) -> bool:
        return self.adversaries > 0 or self.noise > 0

    def apply(self, outputs: torch.Tensor, available: torch.Tensor,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, N, n)`` outputs, ``(B, N)`` availability -> the perturbed outputs and the ``(B, N)`` mask of the
        corrupted workers (A of the answering ones in every row, all of them where fewer answered)."""
        corrupted = choose_adversaries(available, self.adversaries, gen)
        out = outputs
        if self.adversaries > 0:
            if self.kind == "gaussian":
                bad = outputs + self.scale * _normal(outputs.shape, gen, outputs)
            elif self.kind == "sign":
                bad = -outputs
            else:
                bad = swap_classes(outputs, self.target)
            out = torch.where(corrupted.unsqueeze(-1), bad, outputs)
        if self.noise > 0:
            out = out + self.noise * _normal(outputs.shape, gen, outputs)
        return out, corrupted


def _normal(shape, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws from ``gen`` (a CPU generator: the same numbers on every device)."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(like.device, like.dtype)


def choose_adversaries(available: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """``(B, N)`` boolean: ``count`` of each row's available workers, uniformly at random (all where fewer)."""
    if count == 0:
        return torch.zeros_like(available)
    keys = torch.rand(available.shape, generator=gen, dtype=torch.float64).to(available.device)
    keys = torch.where(available, keys, torch.full_like(keys, 2.0))  # late workers sort last
    rank = keys.argsort(1).argsort(1)
    return (rank < count) & available


def swap_classes(outputs: torch.Tensor, target: Optional[int]) -> torch.Tensor:
    """Each output vector ``(..., n)`` with its top class and the target class exchanged (``target`` None:
    the class after the top one, cyclically; a top class equal to the target swaps with the next)."""
    n = outputs.shape[-1]
    if n < 2:
        raise ValueError("a class swap needs an F with at least 2 outputs.")
    if target is not None and target >= n:
        raise ValueError(f"the swap's target class {target} is not one of F's {n} outputs.")
    top = outputs.argmax(-1, keepdim=True)
    other = (top + 1) % n if target is None else torch.where(top == target, (top + 1) % n,
                                                              torch.full_like(top, target))
    swapped = outputs.scatter(-1, top, outputs.gather(-1, other))
    return swapped.scatter(-1, other, outputs.gather(-1, top))


# -- probabilistic stragglers ----------------------------------------------------------------------
def undecodable_probability(n_workers: int, p: float, min_answering: int) -> float:
    """P(fewer than ``min_answering`` of N workers answer) when each is late independently with probability p."""
    return sum(math.comb(n_workers, a) * (1 - p) ** a * p ** (n_workers - a) for a in range(min_answering))


def late_patterns(n_workers: int, p: float, rows: int, gen: torch.Generator, min_answering: int = 1) -> torch.Tensor:
    """``(rows, N)`` boolean, True where a worker answers: each worker late independently with probability p,
    conditioned on at least ``min_answering`` answering (a draw with fewer, which no decoder can use, is
    drawn again; :func:`undecodable_probability` is how often that happens)."""
    if not 0 <= p < 1:
        raise ValueError(f"the straggling probability p must be in [0, 1); got {p!r}.")
    if not 1 <= min_answering <= n_workers:
        raise ValueError(f"needs 1 <= min_answering <= N; got {min_answering} with N = {n_workers}.")
    if 1 - undecodable_probability(n_workers, p, min_answering) < 1e-6:
        raise ValueError(f"with p = {p}, {min_answering} of {n_workers} workers almost never answer; "
                         f"lower p or add workers.")
    out = torch.empty(rows, n_workers, dtype=torch.bool)
    todo = torch.arange(rows)
    while len(todo):
        draw = torch.rand(len(todo), n_workers, generator=gen, dtype=torch.float64) >= p
        out[todo] = draw
        todo = todo[draw.sum(1) < min_answering]
    return out


def min_answering(decoder) -> int:
    """The fewest answering workers ``decoder`` can decode from: its ``min_answering``
    (:class:`coders.nworker.NWorkerDecoder` declares 1, each decoder that needs more its own), 1 for a user's
    decoder that declares none."""
    return int(getattr(decoder, "min_answering", 1))


def group_generator(seed: int, group: int) -> torch.Generator:
    """The generator of served group ``group``'s perturbation: seeded by (seed, group) alone."""
    state = np.random.SeedSequence([seed, 7, int(group)]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


# -- the computation with a perturbation --------------------------------------------------------------
class PerturbedNWorkerCode(NWorkerCode):
    """:class:`NWorkerCode` whose pattern decodes (:meth:`decode_patterns`, what training and evaluation call)
    see the workers' outputs through ``perturbation``, drawn from ``self.gen``. It counts, in
    ``located`` / ``corrupted``, how many corrupted workers a decoder that reports ``last_located`` found."""

    def __init__(self, code: NWorkerCode, perturbation: Perturbation, seed: int = 0):
        super().__init__(code.base, code.encoder, code.decoder, code.k, code.n_workers, code.stragglers)
        self.perturbation = perturbation
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the draws (and the location counts): the same seed draws the same perturbations."""
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.located, self.corrupted, self.false_alarms = 0, 0, 0

    def location_rate(self) -> Optional[float]:
        """The share of corrupted workers the decoder located since :meth:`reseed` (None: none corrupted, or a
        decoder that does not locate)."""
        return self.located / self.corrupted if self.corrupted else None

    def decode_groups(self, outputs: torch.Tensor, available: torch.Tensor, groups) -> torch.Tensor:
        """Serving's decode of whole groups (numbers ``groups``): group g's outputs perturbed by draws from a
        generator seeded by (seed, g) alone, so a group meets the same corruption however groups are batched."""
        rows = [self.perturbation.apply(outputs[i:i + 1], available[i:i + 1], group_generator(self.seed, g))
                for i, g in enumerate(groups)]
        if not rows:
            return self.decode(outputs, available)
        perturbed = torch.cat([out for out, _ in rows])
        out = self.decode(perturbed, available)
        self.count_located(torch.cat([bad for _, bad in rows]))
        return out

    def count_located(self, corrupted: torch.Tensor) -> None:
        """Add the last decode's located corrupted workers (a decoder that reports ``last_located``) to the counts."""
        found = getattr(self.decoder, "last_located", None)
        if found is not None and self.perturbation.adversaries > 0:
            self.located += int((found & corrupted).sum())
            self.false_alarms += int((found & ~corrupted).sum())
            self.corrupted += int(corrupted.sum())

    def decode_patterns(self, outputs: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
        if not self.perturbation.active:
            return super().decode_patterns(outputs, patterns)
        b, p = outputs.shape[0], patterns.shape[0]
        avail = patterns.repeat_interleave(b, 0)
        perturbed, corrupted = self.perturbation.apply(outputs.repeat(p, 1, 1), avail, self.gen)
        out = self.decode(perturbed, avail)
        self.count_located(corrupted)
        return out.view(p, b, self.k, -1)
