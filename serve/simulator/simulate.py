"""A discrete-event simulator of a serving plan: the Ray runtime's behaviour, with no model run for latency.

It executes the same :class:`serve.core.plan.Plan` as ``serve/cluster/runtime.py`` and
returns the same :class:`serve.cluster.runtime.Outcome`, so a config moves between the
two by its key ``engine``. What it models:

* **Service.** A request holds its instance for ``(compute + delay) x factor``
  seconds, as the runtime's actor does: ``delay`` and ``factor`` come from the
  plan, ``compute`` is drawn from the config's ``service`` distribution, or,
  when ``profile`` names a CSV written by a ray run, from the compute times
  measured on the same instance (same role, same position among its role).
  A profile also gives each request a response overhead, drawn from the
  overheads measured there: the time Ray takes to carry a request to an idle
  actor and its answer back, which delays the answer but does not hold the
  instance.
* **Batching** (``batch_size`` above 1): run event by event (:class:`EventRun`), each instance's
  requests batched by the runtime's own :class:`serve.core.batching.Batchers`; a call of n holds its instance
  for (c x (a + b n) / (a + b) + largest delay) x largest factor, c the first request's compute draw and
  a + b x batch fitted to the profile's call times (:func:`fit_batch_cost`; without one, b = 0).
* **Queueing.** Each instance serves one request at a time in dispatch order
  (an actor's FIFO): completion_i = max(dispatch_i, completion_{i-1}) +
  service_i, computed for every instance at once with cumulative sums and a
  running maximum (no Python per request).
* **Answers.** ``none`` / ``equal-resources``: the request's own output;
  ``replicate``: the first of its two copies; ``coded``: the earlier of its
  own output and the moment its group has k outputs (blank padding counts
  from the start), the latter being a reconstruction; ``nworker``: the
  moment its group has N - S of its N coded outputs (the (N - S)-th order
  statistic of their arrivals; ``Plan.need``), every answer a reconstruction.
* **Failures.** An instance failing at T loses every request it has not
  finished by T; a request with no live instance of its role (plan instance
  -1) is lost at dispatch. As in the runtime, a lost request is recovered by
  decoding when its group still gets k outputs (more than r lost slots
  otherwise), else its query is sent again at the loss time, with no
  injected delay, to the next live instance holding F after the failed one;
  a retry joins that instance's queue. A query of ``replicate`` is sent
  again when both copies are lost. Retries and queues depend on each other,
  so the simulation repeats until the set of retries no longer changes.
* **Served accuracy** (when ``code`` and ``inputs`` are given): F's argmax
  for queries answered by their own output, and the trained decoder's
  reconstruction, from exactly the outputs in hand at the decoding moment,
  for reconstructed ones, computed offline in batches. ``nworker`` with an
  N-worker run decodes each group from its first N - S outputs with the
  code itself (:class:`coders.nworker.NWorkerCode`), as the Ray frontend
  does; ``nworker`` with a systematic run is latency alone. Without a code,
  predictions are -1 and accuracy reads n/a.

A plan with a dynamic policy (shortest-queue routing, cancellation,
deferred parities or hedged copies: :mod:`serve.core.policy`) is run event by
event instead (:class:`EventRun`): the policy's :class:`serve.core.policy.PolicyMachine`
makes every decision, this loop keeps each instance's FIFO queue and the
clock. A cancelled request still queued is dropped without holding its
instance; one already started runs on. Compute draws come from the same
streams as the fixed plans', so a policy that decides nothing differently
gives the very same figures (tested).

Randomness (compute and overhead draws) comes from its own seeded streams,
so the same config and seed give the same figures.

This module holds the array path; the event loop is in :mod:`serve.simulator.events`, service times and profiles in
:mod:`serve.simulator.profiles`, served predictions in :mod:`serve.simulator.predictions`; every name stays importable from here.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from serve.core.config import ServeConfig
from serve.core.plan import ROLE_F, Plan, next_live
from serve.core.strategies import get as strategy_of, seed_index
from serve.cluster.runtime import Outcome
from serve.core.workers import outputs_used
from serve.simulator.events import EventRun
from serve.simulator.predictions import group_inputs, nworker_predictions, predictions, served_predictions
from serve.simulator.profiles import (BATCH_COLUMN, PROFILE_COLUMNS, ServiceModel, batch_scale, draw_from_pools,
                               fit_batch_cost, profile_rows, read_profile, role_positions, write_profile)
from util.errors import UserError

__all__ = ["BATCH_COLUMN", "EventRun", "MAX_ROUNDS", "PROFILE_COLUMNS", "ServiceModel", "batch_scale",
           "draw_from_pools", "fifo_completion", "fit_batch_cost", "group_inputs", "next_live_f",
           "nworker_predictions", "predictions", "profile_rows", "read_profile", "role_positions",
           "served_predictions", "simulate", "write_profile"]

MAX_ROUNDS = 50  # retries and queues settle in a few rounds; more means something oscillates


# -- queues -------------------------------------------------------------------------------------------
def fifo_completion(instance: np.ndarray, arrival: np.ndarray, service: np.ndarray) -> np.ndarray:
    """Completion time of each request when every instance serves its requests one at a time.

    Requests must be ordered by arrival; among equal arrivals at one instance the
    earlier in the arrays is served first. Per instance, with S the cumulative
    service, completion_i = S_i + max_{j <= i} (arrival_j - S_{j-1}) (Lindley's
    recursion unrolled); the running maximum restarts at every instance by adding
    a per-instance offset larger than the values' whole range.
    """
    n = len(instance)
    if n == 0:
        return np.zeros(0)
    # A stable sort on a small integer type is a radix sort in numpy: fast.
    small = instance.astype(np.int16) if instance.max() < 2 ** 15 else instance
    order = np.argsort(small, kind="stable")
    inst, t, s = instance[order], arrival[order], service[order]
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(inst[1:], inst[:-1], out=first[1:])
    segment = np.cumsum(first) - 1
    total = np.cumsum(s)
    before = (total - s)[first][segment]       # service of earlier instances' requests
    s_incl = total - before
    key = t - (s_incl - s)
    offset = segment * (float(key.max() - key.min()) + 1.0)
    best = np.maximum.accumulate(key + offset) - offset
    out = np.empty(n)
    out[order] = best + s_incl
    return out


# -- the simulation -----------------------------------------------------------------------------------
def next_live_f(roles: np.ndarray, fail_at: np.ndarray, after: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The next instance holding F after each failed one still live at each time: the one failover rule,
    :func:`serve.core.plan.next_live` (this module's name for it since it began)."""
    return next_live(roles, fail_at, ROLE_F, after, t)


class _Run:
    """The state of one simulation: the plan's requests with their draws, and the retries found so far."""

    def __init__(self, plan: Plan, cfg: ServeConfig):
        self.plan, self.cfg = plan, cfg
        index = seed_index(plan.strategy)
        self.kind = strategy_of(plan.strategy)
        self.roles = np.asarray(plan.roles)
        self.fail_at = np.full(len(plan.roles), np.inf)
        for i, t in plan.failures.items():
            self.fail_at[i] = t
        self.model = ServiceModel(cfg, plan.roles)
        rng = np.random.default_rng([cfg.seed, 8, index])
        live_inst = np.maximum(plan.instance, 0)
        self.compute, self.overhead = self.model.draw(live_inst, rng)
        self.service = (self.compute + plan.delay) * plan.factor
        # Retries draw compute per query from their own stream, once, so rounds agree.
        self.retry_rng_seed = [cfg.seed, 9, index]
        self.retry_compute: Optional[np.ndarray] = None
        self.retry_overhead: Optional[np.ndarray] = None

    def retry_draws(self, query: np.ndarray, instance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.retry_compute is None:
            n = len(self.plan.queries.arrival)
            rng = np.random.default_rng(self.retry_rng_seed)
            f_instances = np.nonzero(self.roles == ROLE_F)[0]
            # One draw per query, as if served by F instance (q mod #F): stable across rounds.
            self.retry_compute, self.retry_overhead = self.model.draw(f_instances[np.arange(n) % len(f_instances)],
                                                                      rng)
        return self.retry_compute[query], self.retry_overhead[query]

    def serve(self, retries: dict) -> dict:
        """Completion of every plan request and retry: when its output reaches the frontend, or inf if lost
        (then ``lost_at``: when the frontend learns of it)."""
        p = self.plan
        n_plan = len(p)
        inst = np.concatenate([p.instance, retries["instance"]])
        time = np.concatenate([p.time, retries["time"]])
        r_compute, r_overhead = self.retry_draws(retries["query"], retries["instance"])
        service = np.concatenate([self.service, r_compute])
        overhead = np.concatenate([self.overhead, r_overhead])
        sent = inst >= 0
        order = np.nonzero(sent)[0]
        if len(retries["time"]):
            order = order[np.argsort(time[order], kind="stable")]
        finish = np.full(len(inst), np.inf)
        finish[order] = fifo_completion(inst[order], time[order], service[order])
        fail = np.where(sent, self.fail_at[np.maximum(inst, 0)], -np.inf)
        lost = finish > fail
        lost_at = np.where(lost, np.where(sent, fail, time), np.inf)
        arrive = np.where(lost, np.inf, finish + overhead)
        return {"arrive": arrive[:n_plan], "lost_at": lost_at[:n_plan], "finish": finish,
                "r_arrive": arrive[n_plan:], "r_lost_at": lost_at[n_plan:], "inst": inst, "time": time,
                "compute": np.concatenate([self.compute, r_compute]), "lost": lost}

    def first_retries(self, state: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Queries whose plan requests leave them unanswered: (query, time, failed instance, answer time or inf),
        plus the answer times of every query from the plan alone."""
        p = self.plan
        n = len(p.queries.arrival)
        arrive, lost_at = state["arrive"], state["lost_at"]
        if self.kind.grouped:
            return self.coded_retries(state)
        c = self.kind.copies  # each query's copies (one or more): the first output answers it
        answer = np.full(n, np.inf)
        np.minimum.at(answer, p.query, arrive)
        copies = np.full((n, c), np.inf)
        copies[p.query, p.slot] = lost_at
        rows = np.full((n, c), -1)
        rows[p.query, p.slot] = np.arange(len(p))
        need = np.nonzero(np.isinf(answer))[0]
        later = copies[need].argmax(axis=1)  # the copy lost last triggers the retry
        req = rows[need, later]
        return need, lost_at[req], p.instance[req], answer

    def coded_retries(self, state: dict):
        p = self.plan
        k, r = p.k, p.r
        n = len(p.queries.arrival)
        g_count = len(p.closed)
        slots = np.full((g_count, k + r), -np.inf)  # blank padding: available from the start
        slots[p.group, p.slot] = state["arrive"]
        lost = np.full((g_count, k + r), np.inf)
        lost[p.group, p.slot] = state["lost_at"]
        need = p.need  # coded: k of the k + r outputs; nworker: N - S of the N
        decode = np.partition(slots, need - 1, axis=1)[:, need - 1]
        own = np.full(n, np.inf)  # nworker: no request carries a query, so no answer is a query's own output
        data = p.query >= 0
        own[p.query[data]] = state["arrive"][data]
        group_of = np.full(n, -1)
        in_group = p.members >= 0
        group_of[p.members[in_group]] = np.nonzero(in_group)[0]
        answer = np.minimum(own, decode[group_of])
        self.decode_time, self.own, self.group_of, self.slot_arrive = decode, own, group_of, slots
        # A group that loses more than k + r - need of its k + r slots cannot decode: at the loss that makes it
        # one more (time t_star), every member lost so far is sent again; members lost later, at their own loss.
        spare = k + r - need
        n_lost = np.isfinite(lost).sum(axis=1)
        bad = np.nonzero(n_lost > spare)[0]
        if len(bad) == 0:
            return np.zeros(0, int), np.zeros(0), np.zeros(0, int), answer
        req_of = np.full((g_count, k + r), -1)
        req_of[p.group, p.slot] = np.arange(len(p))
        qs, ts, frm = [], [], []
        for g in bad:  # rare: only groups hit by failures beyond r
            order = np.argsort(lost[g], kind="stable")
            star = order[spare]
            t_star = lost[g, star]
            for s in range(k):
                q = p.members[g, s]
                if q >= 0 and not self.kind.own_outputs:  # no own output to wait for: every query goes again
                    qs.append(q), ts.append(t_star), frm.append(p.instance[req_of[g, star]])
                    continue
                if q < 0 or not np.isfinite(lost[g, s]):
                    continue
                if lost[g, s] <= t_star:
                    qs.append(q), ts.append(t_star), frm.append(p.instance[req_of[g, star]])
                else:
                    qs.append(q), ts.append(lost[g, s]), frm.append(p.instance[req_of[g, s]])
        return np.asarray(qs, int), np.asarray(ts, float), np.asarray(frm, int), answer

    def run(self) -> tuple[np.ndarray, np.ndarray, dict, dict]:
        empty = {"query": np.zeros(0, int), "time": np.zeros(0), "instance": np.zeros(0, int)}
        retries = empty
        for _ in range(MAX_ROUNDS):
            state = self.serve(retries)
            q, t, frm, answer = self.first_retries(state)
            # Chains: a retry lost to a later failure is sent again at that failure, after its instance.
            found_q, found_t, found_i = [], [], []
            done = answer.copy()
            retried = np.zeros(len(done), dtype=bool)
            prev_q = retries["query"]
            prev_inst, prev_arrive, prev_lost = retries["instance"], state["r_arrive"], state["r_lost_at"]
            level_q, level_t, level_from = q, t, frm
            while len(level_q):
                target = next_live(self.roles, self.fail_at, ROLE_F, np.maximum(level_from, 0), level_t)
                if np.any(target < 0):
                    raise UserError("Every instance holding F has failed, so some queries cannot be answered. "
                                    "Fix: fail fewer instances in 'failures'.")
                found_q.append(level_q), found_t.append(level_t), found_i.append(target)
                retried[level_q] = True
                # Outcome of these retries in the last round's simulation, when it held the same retry.
                got_arrive, got_lost = self._lookup(level_q, level_t, target, prev_q, retries["time"], prev_inst,
                                                    prev_arrive, prev_lost)
                ok = np.isfinite(got_arrive)
                np.minimum.at(done, level_q[ok], got_arrive[ok])
                again = ~ok & np.isfinite(got_lost)
                level_q, level_t, level_from = level_q[again], got_lost[again], target[again]
            new = {"query": np.concatenate(found_q) if found_q else empty["query"],
                   "time": np.concatenate(found_t) if found_t else empty["time"],
                   "instance": np.concatenate(found_i) if found_i else empty["instance"]}
            if self._same(new, retries):
                return done, retried, state, retries
            retries = new
        raise UserError("The simulator's retries did not settle (failures keep moving load between instances). "
                        "Fix: report the config; fewer 'failures' avoid it.")

    @staticmethod
    def _lookup(q, t, inst, prev_q, prev_t, prev_inst, prev_arrive, prev_lost):
        """Arrival / loss of retries (q, t, inst) in the previous round; unknown ones read (inf, nan): not yet
        simulated, so the next round adds them."""
        arrive = np.full(len(q), np.inf)
        lost = np.full(len(q), np.nan)
        if len(prev_q) == 0:
            return arrive, lost
        index = {(int(a), float(b), int(c)): i for i, (a, b, c) in enumerate(zip(prev_q, prev_t, prev_inst))}
        for j, key in enumerate(zip(q.tolist(), t.tolist(), inst.tolist())):
            i = index.get(key)
            if i is not None:
                arrive[j], lost[j] = prev_arrive[i], prev_lost[i]
        return arrive, lost

    @staticmethod
    def _same(a: dict, b: dict) -> bool:
        if len(a["query"]) != len(b["query"]):
            return False
        key_a = sorted(zip(a["query"].tolist(), a["time"].tolist(), a["instance"].tolist()))
        key_b = sorted(zip(b["query"].tolist(), b["time"].tolist(), b["instance"].tolist()))
        return key_a == key_b


def simulate(plan: Plan, cfg: ServeConfig, code=None, inputs=None, batch: int = 2048, backup=None) -> Outcome:
    """Execute ``plan`` in simulated time; see the module docstring. ``code`` (a coders.code.Code) and
    ``inputs`` (the split's images) add served predictions; without them predictions are -1. ``backup``:
    the backup model, whose answers ("backup", copy 1 first) are predicted with it."""
    kind = strategy_of(plan.strategy)
    if plan.dynamic or cfg.batch_size > 1 or not kind.array_path or plan.deadline_s is not None:
        # the array path serves one request a call, and decodes by a fixed rule
        return EventRun(plan, cfg).outcome(code, inputs, batch, backup)
    run = _Run(plan, cfg)
    done, retried, state, retries = run.run()
    n = len(plan.queries.arrival)
    if np.any(np.isinf(done)):
        raise UserError("The simulation left a query unanswered; this is a bug in serve/simulator/simulate.py.")
    reconstructed = np.zeros(n, dtype=bool)
    if kind.grouped:
        decoded = run.decode_time[run.group_of]
        reconstructed = (decoded < run.own) & ~retried
    if kind.approximate_copy:  # answered by the cheaper model: its copy (the last) arrived first
        copies = np.full((n, kind.copies), np.inf)
        copies[plan.query, plan.slot] = state["arrive"]
        reconstructed = (copies[:, -1] < copies[:, :-1].min(axis=1)) & ~retried
    available = None
    if kind.grouped and not kind.own_outputs:  # each group's first N - S outputs (ties in slot order), as Ray decodes
        first = np.argsort(run.slot_arrive, axis=1, kind="stable")[:, :plan.need]
        available = np.zeros(run.slot_arrive.shape, dtype=bool)
        np.put_along_axis(available, first, True, axis=1)
    elif kind.grouped:
        available = run.slot_arrive <= run.decode_time[:, None]
    predicted = served_predictions(plan, getattr(run, "group_of", None), available, reconstructed, code, inputs,
                                   batch, backup)
    q = plan.queries
    n_plan = len(plan)
    inst = state["inst"]
    sent = inst >= 0
    roles = np.where(sent, run.roles[np.maximum(inst, 0)], ROLE_F)
    delay = np.concatenate([plan.delay, np.zeros(len(inst) - n_plan)])
    factor = np.concatenate([plan.factor, np.ones(len(inst) - n_plan)])
    held = (state["compute"] + delay) * factor
    # A lost request held its instance from its start (finish - service) until the failure, if it had begun.
    fail = run.fail_at[np.maximum(inst, 0)]
    busy = np.where(state["lost"], np.clip(fail - (state["finish"] - held), 0.0, None), held)
    busy = np.where(np.isfinite(busy), busy, 0.0)
    requests = {
        "instance": inst[sent], "role": roles[sent], "sent": state["time"][sent],
        "done": np.where(state["lost"], np.where(sent, fail, state["time"]),
                         np.concatenate([state["arrive"], state["r_arrive"]]))[sent],
        "compute": state["compute"][sent], "delay": delay[sent], "factor": factor[sent],
        "ok": ~state["lost"][sent], "started": (busy > 0)[sent] | ~state["lost"][sent], "busy": busy[sent],
        "cancelled": np.zeros(int(sent.sum()), dtype=bool), "batch": np.ones(int(sent.sum()), dtype=int),
    }
    return Outcome(q.arrival, done, reconstructed, retried, predicted, q.label, q.index, {}, requests,
                   np.ones(n, dtype=int), used=outputs_used(getattr(run, "group_of", None), available, reconstructed))
