"""A discrete-event simulator of a serving plan: the Ray runtime's behaviour, with no model run for latency.

It executes the same :class:`serve.plan.Plan` as ``serve/runtime.py`` and
returns the same :class:`serve.runtime.Outcome`, so a config moves between the
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
  requests batched by the runtime's own :class:`serve.batching.Batchers`; a call of n holds its instance
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
deferred parities or hedged copies: :mod:`serve.policy`) is run event by
event instead (:class:`EventRun`): the policy's :class:`serve.policy.PolicyMachine`
makes every decision, this loop keeps each instance's FIFO queue and the
clock. A cancelled request still queued is dropped without holding its
instance; one already started runs on. Compute draws come from the same
streams as the fixed plans', so a policy that decides nothing differently
gives the very same figures (tested).

Randomness (compute and overhead draws) comes from its own seeded streams,
so the same config and seed give the same figures.
"""
from __future__ import annotations

import csv
import heapq
import io
from collections import deque
from pathlib import Path
from typing import Optional

import numpy as np

from serve.batching import Batchers, batching_of
from serve.config import STRATEGIES, ServeConfig
from serve.plan import ROLE_F, Plan, is_nworker, sample_delays
from serve.runtime import Outcome
from util.errors import ConfigError, UserError
from util.files import atomic_write_text

MAX_ROUNDS = 50  # retries and queues settle in a few rounds; more means something oscillates
PROFILE_COLUMNS = ["role", "actor", "compute_ms", "overhead_ms"]
BATCH_COLUMN = "batch"  # requests in the call a row's request went in (a profile without it: every call held one)


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


# -- service times ------------------------------------------------------------------------------------
def role_positions(roles: list[int]) -> np.ndarray:
    """Each instance's position among the instances of its role: the actor it is in the Ray pool."""
    roles_arr = np.asarray(roles)
    pos = np.zeros(len(roles), dtype=int)
    for role in np.unique(roles_arr):
        idx = np.nonzero(roles_arr == role)[0]
        pos[idx] = np.arange(len(idx))
    return pos


def read_profile(path: str) -> dict:
    """A profile CSV as arrays: role, actor, compute_ms, overhead_ms (NaN where not measured)."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or any(c not in rows[0] for c in PROFILE_COLUMNS):
            raise ValueError(f"needs the columns {', '.join(PROFILE_COLUMNS)} and at least one row")
        out = {c: np.array([float(row[c]) if row[c] != "" else np.nan for row in rows]) for c in PROFILE_COLUMNS}
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"Config key 'profile': '{path}' could not be read as a service profile ({exc}). Fix: "
                          f"name the profile.csv that a run with \"engine\": \"ray\" wrote under out_dir/<setting>/.") \
            from None
    compute = out["compute_ms"]
    if np.all(np.isnan(compute)) or np.any(compute[~np.isnan(compute)] < 0):
        raise ConfigError(f"Config key 'profile': '{path}' holds no non-negative compute_ms values.")
    batch = np.array([float(row.get(BATCH_COLUMN) or 1) for row in rows])
    if np.any(~np.isfinite(batch) | (batch < 1)):
        raise ConfigError(f"Config key 'profile': '{path}' has a batch value below 1; rewrite it with a ray run.")
    out[BATCH_COLUMN] = batch
    ok = ~np.isnan(compute)
    out["a_ms"], out["b_ms"] = fit_batch_cost(batch[ok], compute[ok])
    # Each row's compute as the call of one request it stands for: its call's time, scaled back to batch 1.
    out["compute_ms"] = compute * batch * batch_scale(out["a_ms"], out["b_ms"], 1) / \
        batch_scale(out["a_ms"], out["b_ms"], batch)
    return out


def fit_batch_cost(batch: np.ndarray, compute_ms: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` in milliseconds with a call of n requests taking a + b x n, fitted by least squares to a
    profile's rows (``compute_ms``: each request's share of its call, ``batch``: the call's n). A call of n
    appears as n rows, so each row weighs 1/n: every call counts once. With fewer than two batch sizes there is
    nothing to fit: a = the mean call time, b = 0 (a call costs the same whatever it carries)."""
    batch, call = np.asarray(batch, float), np.asarray(compute_ms, float) * np.asarray(batch, float)
    if len(np.unique(batch)) < 2:
        return (float(call.mean()) if len(call) else 0.0), 0.0
    w = 1.0 / batch
    x_mean, y_mean = np.average(batch, weights=w), np.average(call, weights=w)
    b = float(np.average((batch - x_mean) * (call - y_mean), weights=w) / np.average((batch - x_mean) ** 2, weights=w))
    a = y_mean - b * x_mean
    if a <= 0 or b < 0:  # noise past the physics: keep the straight line's mean through a non-negative cost
        a, b = max(a, 1e-9), max(b, 0.0)
    return float(a), float(b)


def batch_scale(a: float, b: float, n):
    """A call of ``n`` requests' time relative to a call of one: (a + b n) / (a + b); 1 without a cost."""
    return (a + b * np.asarray(n, float)) / (a + b) if a + b > 0 else np.ones_like(np.asarray(n, float))


def draw_from_pools(keys: np.ndarray, pool_keys: np.ndarray, values: np.ndarray, rng: np.random.Generator,
                    fallback: np.ndarray) -> np.ndarray:
    """For each entry of ``keys``, a random value among ``values`` whose pool key matches; keys with no
    measured value draw from ``fallback``."""
    ok = ~np.isnan(values)
    pool_keys, values = pool_keys[ok], values[ok]
    order = np.argsort(pool_keys, kind="stable")
    pool_keys, values = pool_keys[order], values[order]
    lo = np.searchsorted(pool_keys, keys, side="left")
    hi = np.searchsorted(pool_keys, keys, side="right")
    u = rng.random(len(keys))
    own = values[np.minimum(lo + (u * (hi - lo)).astype(np.int64), max(len(values) - 1, 0))] if len(values) \
        else np.zeros(len(keys))
    other = fallback[(u * len(fallback)).astype(np.int64)] if len(fallback) else np.zeros(len(keys))
    return np.where(hi > lo, own, other)


class ServiceModel:
    """Compute time and response overhead (seconds) of requests to given instances."""

    def __init__(self, cfg: ServeConfig, roles: list[int]):
        self.cfg = cfg
        self.roles = np.asarray(roles)
        self.profile = read_profile(cfg.profile) if cfg.profile else None
        if self.profile is not None:
            pos = role_positions(roles)
            width = int(max(pos.max(), self.profile["actor"].max())) + 1
            self.width = width
            self.inst_key = (self.roles + 1) * width + pos        # (role, actor) as one integer
            self.prof_key = (self.profile["role"].astype(int) + 1) * width + self.profile["actor"].astype(int)

    def scale(self, n: int) -> float:
        """A call of ``n`` requests' compute over a call of one's: the profile's fitted (a + b n) / (a + b); 1
        without a profile (the ``service`` distribution gives a call's time whatever it carries)."""
        if self.profile is None or n == 1:
            return 1.0
        return float(batch_scale(self.profile["a_ms"], self.profile["b_ms"], n))

    def draw(self, instance: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.profile is None:
            return sample_delays(self.cfg.service, instance, rng), np.zeros(len(instance))
        p = self.profile
        keys = self.inst_key[instance]
        same_role = p["role"].astype(int)
        out = []
        for column in ("compute_ms", "overhead_ms"):
            values = p[column]
            # An actor missing from the profile draws from its role, a role missing from every row.
            by_role = draw_from_pools(self.roles[instance], same_role, values, rng,
                                      values[~np.isnan(values)])
            fallback_rows = values[~np.isnan(values)]
            drawn = draw_from_pools(keys, self.prof_key, values, rng, fallback_rows)
            has_actor = np.isin(keys, self.prof_key[~np.isnan(values)])
            out.append(np.where(has_actor, drawn, by_role) / 1000.0)
        return out[0], out[1]


# -- the simulation -----------------------------------------------------------------------------------
def next_live_f(roles: np.ndarray, fail_at: np.ndarray, after: np.ndarray, t: np.ndarray) -> np.ndarray:
    """For each (failed instance ``after``, time ``t``): the next instance holding F, cyclically after it,
    that is still live at ``t``; -1 where none is."""
    num = len(roles)
    steps = np.arange(1, num + 1)
    cand = (np.asarray(after)[:, None] + steps[None, :]) % num          # (R, num), small R: retries are rare
    live = (roles[cand] == ROLE_F) & (fail_at[cand] > np.asarray(t)[:, None])
    first = live.argmax(axis=1)
    return np.where(live.any(axis=1), cand[np.arange(len(cand)), first], -1)


class _Run:
    """The state of one simulation: the plan's requests with their draws, and the retries found so far."""

    def __init__(self, plan: Plan, cfg: ServeConfig):
        self.plan, self.cfg = plan, cfg
        index = STRATEGIES.index(plan.strategy) if plan.strategy in STRATEGIES else len(STRATEGIES)
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
        if p.strategy in ("none", "equal-resources"):
            answer = np.full(n, np.inf)
            answer[p.query] = arrive
            need = np.nonzero(np.isinf(arrive))[0]
            return p.query[need], lost_at[need], p.instance[need], answer
        if p.strategy in ("replicate", "backup"):
            answer = np.full(n, np.inf)
            np.minimum.at(answer, p.query, arrive)
            copies = np.full((n, 2), np.inf)
            copies[p.query, p.slot] = lost_at
            rows = np.full((n, 2), -1)
            rows[p.query, p.slot] = np.arange(len(p))
            need = np.nonzero(np.isinf(answer))[0]
            later = copies[need].argmax(axis=1)  # the copy lost last triggers the retry
            req = rows[need, later]
            return need, lost_at[req], p.instance[req], answer
        return self.coded_retries(state)

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
                if q >= 0 and p.strategy == "nworker":  # no own output to wait for: every query goes again
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
                target = next_live_f(self.roles, self.fail_at, np.maximum(level_from, 0), level_t)
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
    if plan.dynamic or cfg.batch_size > 1:  # the array path serves one request a call
        return EventRun(plan, cfg).outcome(code, inputs, batch, backup)
    run = _Run(plan, cfg)
    done, retried, state, retries = run.run()
    n = len(plan.queries.arrival)
    if np.any(np.isinf(done)):
        raise UserError("The simulation left a query unanswered; this is a bug in serve/sim.py.")
    reconstructed = np.zeros(n, dtype=bool)
    if plan.strategy in ("coded", "nworker"):
        decoded = run.decode_time[run.group_of]
        reconstructed = (decoded < run.own) & ~retried
    if plan.strategy == "backup":  # answered by the backup model: its copy arrived first
        copies = np.full((n, 2), np.inf)
        copies[plan.query, plan.slot] = state["arrive"]
        reconstructed = (copies[:, 1] < copies[:, 0]) & ~retried
    available = None
    if plan.strategy == "nworker":  # each group's first N - S outputs (ties in slot order), as Ray decodes
        first = np.argsort(run.slot_arrive, axis=1, kind="stable")[:, :plan.need]
        available = np.zeros(run.slot_arrive.shape, dtype=bool)
        np.put_along_axis(available, first, True, axis=1)
    elif plan.strategy == "coded":
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
        "cancelled": np.zeros(int(sent.sum()), dtype=bool),
    }
    return Outcome(q.arrival, done, reconstructed, retried, predicted, q.label, q.index, {}, requests,
                   np.ones(n, dtype=int))


class EventRun:
    """One plan under a dynamic policy, event by event: the driver of a :class:`serve.policy.PolicyMachine`.

    Events at one time: outputs first, then failures, then dispatches (as the fixed plans' reference order).
    """

    FINISH, ARRIVE, FAIL, DUE, WAKE = 0, 1, 2, 3, 4  # the order of events at one time

    def __init__(self, plan: Plan, cfg: ServeConfig):
        from serve.policy import PolicyMachine

        self.plan, self.cfg = plan, cfg
        name = plan.policy.strategy if plan.policy else plan.strategy
        index = STRATEGIES.index(name) if name in STRATEGIES else len(STRATEGIES)
        self.roles = np.asarray(plan.roles)
        self.model = ServiceModel(cfg, plan.roles)
        # The fixed plans' compute draws, request by request; with a profile, drawn at each send instead.
        rng = np.random.default_rng([cfg.seed, 8, index])
        self.compute, self.overhead = self.model.draw(np.maximum(plan.instance, 0), rng)
        self.profile_rng = np.random.default_rng([cfg.seed, 10, index])
        self.retry_rng_seed = [cfg.seed, 9, index]
        self.retry_compute: Optional[np.ndarray] = None
        self.policy = PolicyMachine(plan, self, np.random.default_rng([cfg.seed, 11, index]))
        self.heap: list = []
        self.seq = 0
        self.now = 0.0
        num = len(plan.roles)
        # Each instance batches as the runtime's (serve.batching.Batchers: the same decisions), and serves its
        # calls one at a time in the order they went out. A call: [instance, requests, sent, lost].
        self.batchers = Batchers(num, batching_of(cfg), self.call, lambda t, fn: self.push(t, self.WAKE, fn),
                                 lambda: self.now)
        self.calls: list[list] = []
        self.queue = [deque() for _ in range(num)]   # calls waiting for their instance
        self.running = [-1] * num                    # the call each instance is serving
        self.call_of: dict = {}                      # request -> its call, once it went out
        self.withdrawn: dict = {}                    # call not started -> its requests cancelled
        self.compute_l, self.overhead_l = self.compute.tolist(), self.overhead.tolist()
        # per request (plan rows, then retries in the order they are made): what happened to it
        size = len(plan)
        self.rec = {name: [np.nan] * size for name in ("instance", "sent", "start", "finish", "compute", "delay",
                                                       "factor", "overhead", "batch")}
        self.status = [None] * size  # None: never sent; queued, running, done, lost, cancelled

    # -- the driver interface the policy machine calls --------------------------------------------------------
    def send(self, n: int, inst: int, delay: float, factor: float) -> None:
        if n < len(self.compute_l):
            if self.model.profile is None:
                compute, overhead = self.compute_l[n], self.overhead_l[n]
            else:
                c, o = self.model.draw(np.array([inst]), self.profile_rng)
                compute, overhead = float(c[0]), float(o[0])
        else:
            compute, overhead = self.retry_draw(self.policy.query_of(n))
            for column in self.rec.values():
                column.append(np.nan)
            self.status.append(None)
        rec = self.rec
        rec["instance"][n], rec["sent"][n], rec["finish"][n] = inst, self.now, np.inf
        rec["compute"][n], rec["delay"][n], rec["factor"][n], rec["overhead"][n] = compute, delay, factor, overhead
        self.status[n] = "queued"
        self.batchers.add(inst, n, self.now)

    def call(self, inst: int, requests: list) -> None:
        """The batcher of ``inst`` sends ``requests`` as one call: it queues at its instance."""
        c = len(self.calls)
        self.calls.append([inst, requests, self.now, False])
        for n in requests:
            self.call_of[n] = c
        self.queue[inst].append(c)
        if self.running[inst] < 0:
            self.start_next(inst)

    def cancel(self, n: int) -> None:
        """As the runtime: a request still in its batcher never goes out; a call not started is dropped once
        every request it carries is cancelled; one started runs on."""
        if self.status[n] != "queued":
            return
        c = self.call_of.get(n)
        if c is None:
            self.batchers.withdraw(int(self.rec["instance"][n]), n)
            self.status[n] = "cancelled"
            self.policy.cancelled(n)
            return
        marked = self.withdrawn.setdefault(c, [])
        marked.append(n)
        if len(marked) == len(self.calls[c][1]):
            inst = self.calls[c][0]
            self.queue[inst].remove(c)
            self.batchers.returned(inst, self.now - self.calls[c][2], self.now)
            for m in marked:
                self.status[m] = "cancelled"
                self.policy.cancelled(m)

    def wake(self, n: int, t: float) -> None:
        self.push(t, self.DUE, n)

    def answer_own(self, q: int, n: int) -> None:
        pass

    def answer_decoded(self, g: int, queries: list, available: np.ndarray) -> None:
        pass

    # -- the loop -----------------------------------------------------------------------------------------
    def retry_draw(self, q: int) -> tuple[float, float]:
        if self.retry_compute is None:
            n = len(self.plan.queries.arrival)
            f_instances = np.nonzero(self.roles == ROLE_F)[0]
            self.retry_compute, self.retry_overhead = self.model.draw(
                f_instances[np.arange(n) % len(f_instances)], np.random.default_rng(self.retry_rng_seed))
        return float(self.retry_compute[q]), float(self.retry_overhead[q])

    def push(self, t: float, kind: int, payload: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, payload))

    def start_next(self, inst: int) -> None:
        """Start ``inst``'s next call: the compute drawn for its first request, scaled to the batch by the
        profile's a + b x batch, plus the largest delay, times the largest factor among its requests (a
        straggler delays its whole call); each request is charged an equal share of the compute."""
        rec, q = self.rec, self.queue[inst]
        if not q:
            self.running[inst] = -1
            return
        c = q.popleft()
        reqs = self.calls[c][1]
        first = reqs[0]
        compute = rec["compute"][first] * self.model.scale(len(reqs))
        delay = max(rec["delay"][n] for n in reqs) if len(reqs) > 1 else rec["delay"][first]
        factor = max(rec["factor"][n] for n in reqs) if len(reqs) > 1 else rec["factor"][first]
        end = self.now + (compute + delay) * factor
        for n in reqs:
            self.status[n] = "running"
            rec["start"][n], rec["finish"][n] = self.now, end
            rec["batch"][n] = len(reqs)
            if len(reqs) > 1:
                rec["compute"][n] = compute / len(reqs)
        self.running[inst] = c
        self.push(end, self.FINISH, c)

    def run(self) -> None:
        p, d = self.plan, self.policy
        for i, t in p.failures.items():
            self.push(t, self.FAIL, i)
        times = p.time
        nxt, n_plan = 0, len(p)
        heap = self.heap
        while nxt < n_plan or heap:
            if heap and (nxt >= n_plan or heap[0][0] < times[nxt] or (heap[0][0] == times[nxt] and heap[0][1] < self.DUE)):
                t, kind, _, x = heapq.heappop(heap)
                self.now = t
                if kind == self.FINISH:
                    self.finish(x, t)
                elif kind == self.FAIL:
                    self.fail(x, t)
                elif kind == self.DUE:
                    d.due(x, t)
                elif kind == self.WAKE:
                    x()
                else:  # an output reaching the frontend after its response overhead
                    d.output(x, t)
            else:
                self.now = float(times[nxt])
                d.due(nxt, self.now)
                nxt += 1

    def finish(self, c: int, t: float) -> None:
        inst, reqs, sent, lost = self.calls[c]
        if lost:
            return  # lost to a failure before it finished
        for n in reqs:
            self.status[n] = "done"
        overhead = self.rec["overhead"][reqs[0]]  # one call, one answer: its first request's overhead draw
        self.start_next(inst)
        self.batchers.returned(inst, t - sent, t)
        self.batchers.consider(inst, t)
        for n in reqs:
            self.rec["overhead"][n] = overhead
            if overhead > 0:
                self.push(t + overhead, self.ARRIVE, n)
            else:
                self.policy.output(n, t)

    def fail(self, i: int, t: float) -> None:
        self.policy.failed(i, t)
        lost = []
        calls = ([self.running[i]] if self.running[i] >= 0 else []) + list(self.queue[i])
        for c in calls:
            self.calls[c][3] = True
            lost += [n for n in self.calls[c][1] if self.status[n] in ("queued", "running")]
        lost += [n for n in self.batchers.queue[i] if self.status[n] == "queued"]
        self.batchers.queue[i], self.batchers.inflight[i] = [], 0
        self.queue[i].clear()
        self.running[i] = -1
        for n in lost:
            self.status[n] = "lost"
            self.rec["finish"][n] = t
        for n in lost:
            self.policy.lost(n, t)

    def outcome(self, code=None, inputs=None, batch: int = 2048, backup=None) -> Outcome:
        self.run()
        p, d = self.plan, self.policy
        if np.any(np.isinf(d.done)):
            raise UserError("The simulation left a query unanswered; this is a bug in serve/policy.py.")
        grouped = p.strategy in ("coded", "nworker")
        predicted = served_predictions(p, d._group_of if grouped else None, d.available if grouped else None,
                                       d.reconstructed, code, inputs, batch, backup)
        status = np.array([x or "" for x in self.status])
        sent = status != ""
        rec = {name: np.asarray(v, dtype=float)[sent] for name, v in self.rec.items()}
        status = status[sent]
        inst = rec["instance"].astype(int)
        started = np.isfinite(rec["start"])
        ok = status == "done"
        requests = {
            "instance": inst, "role": self.roles[inst], "sent": rec["sent"],
            "done": np.where(ok, rec["finish"] + rec["overhead"], rec["finish"]),
            "compute": rec["compute"], "delay": rec["delay"], "factor": rec["factor"], "ok": ok,
            "started": started, "busy": np.where(started, rec["finish"] - rec["start"], 0.0),
            "cancelled": status == "cancelled", "batch": np.nan_to_num(rec["batch"], nan=0).astype(int),
        }
        q = p.queries
        return Outcome(q.arrival, d.done, d.reconstructed, d.retried, predicted, q.label, q.index, {}, requests,
                       d.answers)


def served_predictions(plan: Plan, group_of, available, reconstructed: np.ndarray, code, inputs, batch: int,
                       backup=None) -> np.ndarray:
    """Every query's served prediction, from who answered it (``reconstructed``: by decoding, or for ``backup`` by
    the backup model) and what each group had in hand (``available``); -1 without a code and inputs, and for
    ``nworker`` of a systematic run (its latency alone, no N-worker code)."""
    n = len(plan.queries.arrival)
    if code is None or inputs is None:
        return np.full(n, -1)
    if plan.strategy == "nworker":
        if not is_nworker(code):
            return np.full(n, -1)
        return nworker_predictions(plan, group_of, available, reconstructed, code, inputs, batch)
    coded = plan.strategy == "coded"
    predicted = predictions(plan, group_of if coded else None, available if coded else None,
                            reconstructed if coded else np.zeros(n, dtype=bool), code, inputs, batch)
    if plan.strategy == "backup" and backup is not None and reconstructed.any():
        import torch

        with torch.no_grad():
            images = inputs[torch.as_tensor(plan.queries.index[reconstructed])]
            predicted[reconstructed] = torch.cat([backup(images[i:i + 4096]) for i in
                                                  range(0, len(images), 4096)]).argmax(1).numpy()
    return predicted


def group_inputs(plan: Plan, groups: np.ndarray, inputs):
    """``(members, real, x)`` of ``groups``: their member queries ((B, k), -1 for blank padding), which slots
    hold one, and the k inputs of each group ((B, k, ...)) with blank padding as zeros, as the frontend encodes
    them."""
    import torch

    members = plan.members[groups]
    real = members >= 0
    img = np.where(real, plan.queries.index[np.maximum(members, 0)], 0)
    x = inputs[torch.as_tensor(img.reshape(-1))].reshape(len(groups), plan.k, *inputs.shape[1:]).clone()
    x[torch.as_tensor(~real)] = 0.0
    return members, real, x


def predictions(plan: Plan, group_of: np.ndarray, available: np.ndarray, reconstructed: np.ndarray, code, inputs,
                batch: int) -> np.ndarray:
    """F's argmax for own answers; the decoder's reconstruction from the outputs in hand for reconstructed ones
    (``available``: (groups, k + r), which outputs each group had when it decoded)."""
    import torch

    q = plan.queries
    images, where = np.unique(q.index, return_inverse=True)
    with torch.no_grad():
        fx = torch.cat([code.base(inputs[torch.as_tensor(images[i:i + 4096])]) for i in range(0, len(images), 4096)])
        pad_output = code.base(torch.zeros(1, *inputs.shape[1:]))[0]
    predicted = fx.argmax(1).numpy()[where]
    if not reconstructed.any():
        return predicted
    k = plan.k
    groups = np.unique(group_of[reconstructed])
    for lo in range(0, len(groups), batch):
        g = groups[lo:lo + batch]
        members, real, x = group_inputs(plan, g, inputs)
        with torch.no_grad():
            own = fx[torch.as_tensor(where[np.maximum(members, 0)].reshape(-1))].reshape(len(g), k, -1).clone()
            own[torch.as_tensor(~real)] = pad_output
            parity = code.parity_outputs(code.encode(x))
            recon = code.decode(torch.cat([own, parity], 1), torch.as_tensor(available[g]))
        pick = real & reconstructed[np.maximum(members, 0)]
        rows, cols = np.nonzero(pick)
        predicted[members[rows, cols]] = recon[torch.as_tensor(rows), torch.as_tensor(cols)].argmax(-1).numpy()
    return predicted


def nworker_predictions(plan: Plan, group_of: np.ndarray, available: np.ndarray, reconstructed: np.ndarray, code,
                        inputs, batch: int) -> np.ndarray:
    """An N-worker code's served predictions: F's argmax for queries answered by a retry (their own output), and
    for the rest the code itself (:class:`coders.nworker.NWorkerCode`: encode, F on every coded input, decode) on
    the group's members, from the outputs ``available`` ((groups, N)) when it decoded."""
    import torch

    predicted = predictions(plan, None, None, np.zeros(len(reconstructed), dtype=bool), code, inputs, batch)
    groups = np.unique(group_of[reconstructed])
    for lo in range(0, len(groups), batch):
        g = groups[lo:lo + batch]
        members, real, x = group_inputs(plan, g, inputs)
        recon = code(x, torch.as_tensor(available[g]))
        rows, cols = np.nonzero(real & reconstructed[np.maximum(members, 0)])
        predicted[members[rows, cols]] = recon[torch.as_tensor(rows), torch.as_tensor(cols)].argmax(-1).numpy()
    return predicted


# -- profiles measured by the ray runtime ------------------------------------------------------------
def profile_rows(roles: list[int], requests: dict) -> list[list]:
    """Rows (role, actor, compute_ms, overhead_ms, batch) of one strategy's served requests on Ray.

    ``overhead_ms`` is what the runtime added beyond the instance's service, measured only on requests that
    found their instance idle (its previous answer was back before they were sent), so no queueing is in it.
    """
    if not len(requests.get("instance", [])):
        return []
    pos = role_positions(roles)
    inst = np.asarray(requests["instance"])
    sent, done = np.asarray(requests["sent"]), np.asarray(requests["done"])
    compute, delay, factor = (np.asarray(requests[c], dtype=float) for c in ("compute", "delay", "factor"))
    ok = np.asarray(requests["ok"], dtype=bool)
    batch = np.asarray(requests.get(BATCH_COLUMN, np.ones(len(inst))), dtype=int)
    rows = []
    for i in np.unique(inst):
        idx = np.nonzero((inst == i) & ok)[0]
        idx = idx[np.argsort(sent[idx], kind="stable")]
        prev_done = np.concatenate([[-np.inf], done[idx][:-1]])
        idle = sent[idx] >= prev_done
        overhead = (done[idx] - sent[idx]) - (compute[idx] + delay[idx]) * factor[idx]
        for j, n in enumerate(idx):
            rows.append([int(roles[i]), int(pos[i]), f"{1000 * compute[n]:.4f}",
                         f"{1000 * max(overhead[j], 0.0):.4f}" if idle[j] else "", int(batch[n])])
    return rows


def write_profile(path: Path, strategies: list[tuple[list[int], dict]]) -> None:
    """``profile.csv`` of one setting from every strategy's requests on Ray (``[(roles, requests), ...]``)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(PROFILE_COLUMNS + [BATCH_COLUMN])
    for roles, requests in strategies:
        w.writerows(profile_rows(roles, requests))
    atomic_write_text(buf.getvalue(), path)
