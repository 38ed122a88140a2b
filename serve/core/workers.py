"""What N-worker serving does about its workers: decode by a deadline, and serve perturbed outputs.

Two serving keys, both read by the ``nworker`` strategy of an N-worker run (docs/nworker.md), on Ray
(``python -m serve``), over HTTP (``python -m serve.app``) and in the simulator (``"engine": "sim"``) alike:

* ``deadline_ms`` (null: off, a group waits for N - S outputs as always). A group is decoded the moment
  N - S of its outputs are in, as without a deadline, or at its close + ``deadline_ms`` from whatever arrived
  by then, whichever is first; where fewer than the decoder's minimum had arrived by the deadline
  (:func:`coders.perturb.min_answering`: 1 for Berrut, 5 for the splines) it decodes the moment that many are
  in. Outputs arriving after the decode are ignored for that group. :class:`Deadline` is the
  :class:`serve.core.policy.PolicyMachine`'s part of it: the wake-up at the deadline and the count a group
  then needs, so every driver (the simulator's event loop, the Ray frontends) runs the same rule.
* ``perturb`` (null: none): the perturbation of training (coders/perturb.py, the keys of
  coders/perturb_config.py: ``adversaries``, ``adversary``, ``adversary_scale``, ``adversary_target``,
  ``output_noise``) applied to the outputs the instances return, before the decoder reads them. The run's
  own decoder decodes (a locating Berrut or robust spline where the run was configured with one). Group g's
  draws come from a generator seeded by (``seed``, g) (:meth:`coders.perturb.PerturbedNWorkerCode.decode_groups`),
  so Ray and the simulator corrupt the same workers of a group with the same values wherever the same
  outputs are in hand.

Probabilistic stragglers need no key of their own: a delay model with ``"probability": p``
(util/latency.py, the law training's ``worker_latency`` draws from) delays each request independently with
probability p.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from serve.core.routing import PLANNED
from serve.core.worker_keys import decodes_only, perturbation
from util.errors import ConfigError


class Deadline:
    """The deadline of a PolicyMachine's groups: armed at a group's first request, it wakes the machine at
    the group's close + ``seconds``, and from then on the group decodes from ``fewest`` outputs."""

    def __init__(self, machine, seconds: float, fewest: int):
        self.machine, self.seconds, self.fewest = machine, seconds, fewest
        self.waking: dict = {}   # request whose wake-up is the deadline of its group -> the group
        self.armed: set = set()  # groups whose deadline is set
        self.passed: set = set()  # groups whose deadline has passed

    def due(self, n: int, now: float) -> bool:
        """Called first by ``due(n, now)``: True when this call is a group's deadline (the machine does nothing
        more with it); else the group of request ``n`` gets its wake-up, once."""
        m = self.machine
        g = self.waking.pop(n, None)
        if g is not None:
            self.passed.add(g)
            if m.count[g] >= self.fewest and m.unanswered[g] > 0:
                m.decode_group(g, now)
            return True
        g = m.p_group[n]
        if g >= 0 and g not in self.armed and m.state[n] == PLANNED:  # its first call
            self.armed.add(g)
            self.waking[n] = g
            m.driver.wake(n, m.closed[g] + self.seconds)
        return False

    def need(self, g: int) -> int:
        return min(self.fewest, self.machine.need) if g in self.passed else self.machine.need


def deadline_of(machine) -> Optional[Deadline]:
    """The machine's :class:`Deadline`, or None (no ``deadline_s`` in its plan, or not ``nworker``)."""
    p = machine.plan
    if getattr(p, "deadline_s", None) is None or not decodes_only(p.strategy):
        return None
    return Deadline(machine, p.deadline_s, p.fewest or p.need)


def served_code(cfg, code, run: str = ""):
    """The code a run is served with: wrapped in its ``perturb`` (checked against the run: fewer adversaries
    than the N - S outputs a group decodes from) when the config has one and the run is an N-worker one."""
    from serve.core.plan import code_layout, is_nworker

    if cfg.perturb is None or not is_nworker(code):
        return code
    from coders.perturb import PerturbedNWorkerCode

    pert = perturbation(cfg.perturb)
    _, _, need = code_layout(code)
    if pert.adversaries >= need:
        raise ConfigError(f"Config key 'perturb': {pert.adversaries} adversaries, but run '{run}' decodes from "
                          f"N - S = {need} outputs. Fix: at most {need - 1} adversaries.")
    return PerturbedNWorkerCode(code, pert, seed=cfg.seed)


def with_deadline(plan, cfg, code):
    """``plan`` with the config's deadline and the decoder's minimum answering count (an N-worker run's
    ``nworker`` row; a systematic run's has no decoder of its own, so it waits for N - S)."""
    from serve.core.plan import is_nworker

    if cfg.deadline_ms is None or not decodes_only(plan.strategy):
        return plan
    fewest = plan.need
    if is_nworker(code):
        from coders.perturb import min_answering

        fewest = min(min_answering(code.decoder), plan.need)
    return dataclasses.replace(plan, deadline_s=cfg.deadline_ms / 1000.0, fewest=fewest)


def outputs_used(group_of, available, reconstructed) -> np.ndarray:
    """Per query: how many outputs the decode that answered it used (0: answered by its own output)."""
    used = np.zeros(len(reconstructed), dtype=int)
    if group_of is None or available is None:
        return used
    group_of = np.asarray(group_of)
    rec = np.asarray(reconstructed, dtype=bool) & (group_of >= 0)
    used[rec] = np.asarray(available, dtype=bool).sum(axis=1)[group_of[rec]]
    return used
