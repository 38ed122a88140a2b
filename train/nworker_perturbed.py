"""N-worker runs under perturbations: adversaries, noisy outputs, probabilistic stragglers (docs/nworker.md).

:class:`PerturbedNWorkerRun` is :class:`train.nworker.NWorkerRun` (``python train.py`` makes every
N-worker run one) with, where the config asks for them:

* ``adversaries`` / ``output_noise``: its code is a :class:`coders.perturb.PerturbedNWorkerCode`, so every
  decode of training and evaluation sees the corrupted, noisy outputs. Training draws from the run's training
  seed; every evaluation restarts its draws from the config's ``seed`` + 2, so each epoch's scores, and every
  family of a sweep, meet the same corrupted workers with the same values. A decoder that locates corrupted
  workers (coders/adversary.py) adds ``<split>_located`` (the share of them it found) and
  ``<split>_false_alarms`` (good workers it dropped, per corrupted one) to the metrics rows.
* ``straggler_p``: every training step draws ``max_patterns`` fresh patterns from the law (each worker late
  with probability p, coders.perturb.late_patterns); evaluation uses one draw of ``max_patterns`` made with
  the config's ``seed`` + 1. Draws in which fewer workers answer than the decoder needs are drawn again; how
  often that happens is recorded in config.json (``undecodable_probability``).
* ``worker_latency`` with ``deadline_ms`` (coders/deadline.py): evaluation draws ``max_patterns`` groups of
  completion times from the law with the config's ``seed`` + 1 and decodes each from exactly the workers done
  by the deadline; groups with fewer than the decoder needs are not answered, left out of the error, and the
  metrics rows gain ``<split>_answered`` (the fraction answered). Training draws fresh answered patterns from
  the same law and deadline at every step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from train.config import Config
from coders.deadline import answered_patterns, by_deadline
from coders.perturb import Perturbation, PerturbedNWorkerCode, late_patterns, min_answering, undecodable_probability
from train.metrics import Tally
from util.errors import UserError
from coders.form import RunSpec
from train.nworker import NWorkerRun


class PerturbedNWorkerRun(NWorkerRun):
    """An N-worker run with the config's perturbations (module docstring); without any, the plain run."""

    def __init__(self, cfg: Config, spec: RunSpec, folder: Optional[Path] = None):
        super().__init__(cfg, spec, folder)
        train_seed = spec.train_seed(cfg)
        self.perturbation = Perturbation.of(cfg)
        if self.perturbation.active:  # the same encoder, decoder and F: the optimizer's parameters stay
            self.code = PerturbedNWorkerCode(self.code, self.perturbation, seed=train_seed + 2)
        self.p = cfg.straggler_p
        if self.p is not None:
            self.fewest = min_answering(self.decoder)
            self.law_gen = torch.Generator().manual_seed(train_seed)
            self.eval_patterns = self.draw(torch.Generator().manual_seed(cfg.seed + 1))
            self.train_patterns = self.draw(self.law_gen)
            self.config.update(undecodable_probability=undecodable_probability(self.n, self.p, self.fewest),
                               train_patterns=len(self.train_patterns), eval_patterns=len(self.eval_patterns))
        self.deadline = cfg.deadline_ms
        if self.deadline is not None:
            self.fewest = min_answering(self.decoder)
            self.law_rng = np.random.default_rng(train_seed)
            self.eval_patterns, self.answered = self.by_deadline(np.random.default_rng(cfg.seed + 1))
            self.train_patterns = self.draw_deadline()
            self.config.update(eval_answered=self.answered, train_patterns=len(self.train_patterns),
                               eval_patterns=len(self.eval_patterns))

    def by_deadline(self, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
        patterns, answered = by_deadline(self.cfg.worker_latency, self.deadline, self.n, self.cfg.max_patterns,
                                         rng, self.fewest)
        return patterns.to(self.device), answered

    def draw_deadline(self) -> torch.Tensor:
        try:
            patterns = answered_patterns(self.cfg.worker_latency, self.deadline, self.n, self.cfg.max_patterns,
                                         self.law_rng, self.fewest)
        except ValueError as exc:
            if self.cfg.num_epoch:
                raise UserError(f"Config key 'deadline_ms': training {exc}") from None
            patterns = self.eval_patterns  # nothing is trained: the evaluation patterns stand in
        return patterns.to(self.device)

    def draw(self, gen: torch.Generator) -> torch.Tensor:
        return late_patterns(self.n, self.p, self.cfg.max_patterns, gen, self.fewest).to(self.device)

    def step(self, idx: torch.Tensor, tally: Tally) -> None:
        if self.p is not None:  # fresh patterns from the law at every step
            self.train_patterns = self.draw(self.law_gen)
        elif self.deadline is not None:
            self.train_patterns = self.draw_deadline()
        super().step(idx, tally)

    @torch.no_grad()
    def evaluate(self, split: str) -> dict:
        if self.deadline is not None:
            return self.evaluate_by_deadline(split)
        return self.evaluate_perturbed(split)

    def evaluate_by_deadline(self, split: str) -> dict:
        """The error over the answered groups, and the fraction answered (no group answered: the errors are NaN)."""
        if len(self.eval_patterns):
            row = self.evaluate_perturbed(split)
        else:
            nothing = self.eval_patterns
            self.eval_patterns = torch.ones(1, self.n, dtype=torch.bool, device=self.device)
            try:
                row = {k: (float("nan") if isinstance(v, float) else v)
                       for k, v in self.evaluate_perturbed(split).items()}
            finally:
                self.eval_patterns = nothing
        return {**row, f"{split}_answered": self.answered}

    def evaluate_perturbed(self, split: str) -> dict:
        if not self.perturbation.active:
            return super().evaluate(split)
        train_gen = self.code.gen
        self.code.reseed(self.cfg.seed + 2)
        try:
            row = super().evaluate(split)
        finally:
            rate, corrupted, false = self.code.location_rate(), self.code.corrupted, self.code.false_alarms
            self.code.gen = train_gen
        if rate is not None:
            row.update({f"{split}_located": rate, f"{split}_false_alarms": false / corrupted})
        return row

    def banner(self) -> str:
        extra = []
        if self.perturbation.active:
            pert = self.perturbation
            extra.append(f"adversaries: {pert.adversaries} ({pert.kind}"
                         + (f", scale {pert.scale:g}" if pert.kind == "gaussian" else "")
                         + f"); output noise sd {pert.noise:g}")
        if self.p is not None:
            extra.append(f"each worker late with probability {self.p:g}; P(fewer than {self.fewest} answer) = "
                         f"{self.config['undecodable_probability']:.3g}")
        if self.deadline is not None:
            extra.append(f"deadline {self.deadline:g} ms on times drawn from {self.cfg.worker_latency}; "
                         f"{100 * self.answered:.1f}% of the evaluation groups answered")
        return "\n   ".join([super().banner(), *extra])
