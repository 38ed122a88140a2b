"""Serving policies as one state machine: where each request goes, and which requests are deferred or dropped.

Not to be confused with :mod:`serve.cluster.dispatch`, the answering core (payloads, encoding once, decoding,
recording answers): every decision is made here, and the Ray frontends (:class:`serve.cluster.runtime.Frontend` for a
plan, :class:`serve.cluster.runtime.ServiceFrontend` for the HTTP service) carry it out with that core. A fixed
strategy is the policy with routing "static", pool "split", no cancellation and no deferral, so fixed
layouts and ``policies`` rows run through the same machine everywhere.

A :class:`PolicyMachine` executes a :class:`serve.core.plan.Plan` under its policy
(:class:`serve.core.config.PolicyConfig`); it owns every decision and every
answer, and knows nothing of clocks or actors. Drivers feed it events:
the simulator's event loop (``serve/simulator/simulate.py``) in simulated time and the Ray
frontends (``serve/cluster/runtime.py``) in wall-clock time, so all run one policy
with the same rules. A plan's requests are known in advance; a service adds
its queries, groups and requests as clients make them (``add_query``,
``open_group``, ``join_group``, ``close_group``, ``add_request``) and calls
``due`` on each at once. The driver calls

* ``due(n, now)``: plan request n's earliest time has come (or a wake-up the
  dispatcher asked for);
* ``output(n, now)``: request n's output is back;
* ``lost(n, now)``: request n will never answer (its instance failed);
* ``cancelled(n)``: a cancel the dispatcher asked for took effect (the
  request had not started, so it never will);
* ``failed(i, now)``: instance i has failed (before the losses it causes);

and the dispatcher calls the driver's ``send(n, instance, delay_s,
factor)``, ``cancel(n)`` (drop n if it has not started), ``wake(n, t)``
(call ``due(n, t)`` at t) and, for served outputs, ``answer_own(q, n)`` and
``answer_decoded(g, queries, available)``, and, if it has one,
``unanswerable(q)`` when no live instance holds F to send ``q`` again (without
it, a UserError stops the run). Retries are requests too, numbered after
every request made before them (``is_retry``).

The policy's parts:

* **Routing.** ``static``: the plan's fixed instance (the strategy's layout),
  or, when that one has failed, the next live instance of its role.
  ``jsq``: the live instance with the fewest outstanding requests (sent, not
  yet answered, as the frontend counts them), ties broken round robin;
  ``p2c``: the one with fewer of two live instances drawn at random. Either
  avoids an instance that already holds a request of the same group (coded)
  or query (replicate) when another is free of one, so redundant requests
  never queue behind each other. The candidates are the instances of the
  request's role: with ``pool`` "shared" (a code whose parities go through
  F) every instance serves data and parities; with "split" the data
  instances balance among themselves and parity j's among themselves.
* **Cancellation.** Once every member of a group is answered, its requests
  still queued (parities, and data requests of rebuilt queries) are
  dropped; once a query of ``replicate`` is answered its other copy still
  queued is dropped; a deferred request whose reason is gone is never sent.
  A request already started runs on (an instance cannot be interrupted).
* **Deferral.** A group's parities wait ``d`` after the group closes and go
  out only if a member is still unanswered then; ``replicate``'s second copy
  waits ``d`` after arrival (a hedged request). ``d`` is fixed, or the
  percentile of the last ``window`` latencies of first requests (data
  requests, first copies), no delay until 50 are in. A failure in the group
  (or of the first copy) sends the deferred requests at once.
* **Failures**, as the fixed plans recover them: a lost request's query is
  rebuilt when its group can still reach k outputs (in hand, in flight or
  still to be sent), and is otherwise sent again (with no injected delay) to
  a live F instance: the next after the failed one (static), or the routed
  one. ``replicate`` sends a query again when both copies are lost.

``nworker`` (an N-worker code, docs/nworker.md) is a grouped strategy like
``coded`` whose requests carry no query: a group's N coded inputs fall due at
its close, blank padding has no known output, and every member is answered by
the decoder once ``need`` = N - S outputs are in (``Plan.need``) or, with a
deadline (``Plan.deadline_s``, serve/core/workers.py), from those in at the
group's close + deadline, whichever is first; a group that
can no longer reach N - S sends every unanswered member again. It runs with
the fixed layout only (no ``policies`` row names it).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from serve.core.plan import ROLE_BACKUP, ROLE_F, Plan, slow_table
from serve.core.workers import deadline_of
from util.errors import UserError

PLANNED, OUTSTANDING, DONE, LOST, CANCELLED, SKIPPED = range(6)
WARM_SAMPLES = 50  # latencies needed before a percentile deferral delays anything


class PolicyMachine:
    """The decisions and answers of one policy over one plan; see the module docstring."""

    def __init__(self, plan: Plan, driver, rng: Optional[np.random.Generator] = None):
        self.plan, self.driver = plan, driver
        pol = plan.policy
        self.routing = pol.routing if pol else "static"
        self.cancel_on = bool(pol and pol.cancel)
        self.defer = pol.defer if pol else None
        self.rng = rng if rng is not None else np.random.default_rng([plan.seed, 11])
        self.k, self.r = plan.k, plan.r
        self.strategy = plan.strategy
        n = len(plan.queries.arrival)
        self.roles = [int(x) for x in plan.roles]
        self.num = len(self.roles)
        self.all_f = max(self.roles) == ROLE_F  # every instance holds F (a request of any role may go anywhere)
        self.outstanding = [0] * self.num
        self.dead = [False] * self.num
        # Live instances of each role bucketed by outstanding count: shortest queue without a scan.
        self.levels = {role: [set(i for i in range(self.num) if self.roles[i] == role)] for role in set(self.roles)}
        self.live = {role: [i for i in range(self.num) if self.roles[i] == role] for role in set(self.roles)}
        self.coins: list = []
        # per request (plan rows, then rows added while serving and retries, in the order they are made)
        self.p_query, self.p_group = plan.query.tolist(), plan.group.tolist()
        self.p_slot, self.p_inst, self.p_time = plan.slot.tolist(), plan.instance.tolist(), plan.time.tolist()
        self.p_delay = (plan.delay_any if plan.delay_any is not None else plan.delay).tolist()
        self.p_factor = plan.factor.tolist()
        self.retry_row = [False] * len(plan)
        self.state = [PLANNED] * len(plan)
        self.inst = [-1] * len(plan)
        self.sent = [np.nan] * len(plan)
        # per query
        self.done_at = [np.inf] * n
        self.rebuilt = [False] * n
        self.was_retried = [False] * n
        self.answers_of = [0] * n
        self.retry_of = [-1] * n                # the query's retry in flight, or -1
        self.woken = set()
        self.retry_query: list[int] = []
        self.retry_from: list[int] = []
        self.delay_set = None if plan.delay_instances is None else set(plan.delay_instances)
        self.slow = None
        self.copies: list = []                  # replicate, backup: each query's two rows
        if self.strategy in ("replicate", "backup"):
            copies = np.full((n, 2), -1)
            copies[plan.query, plan.slot] = np.arange(len(plan))
            self.copies = copies.tolist()
        # The outputs a group needs before it decodes: k of its k + r for a systematic code, N - S of its N
        # for an N-worker code (plan.need). The one place the threshold lives (in output() and lost()).
        self.need = plan.need
        # coded and nworker requests belong to groups of k queries; an nworker request carries no query (it is
        # one of the group's N coded inputs), so every answer of its group is the decoder's
        self.grouped = self.strategy in ("coded", "nworker")
        self.nworker = self.strategy == "nworker"
        if self.grouped:
            g = len(plan.closed)
            rows = np.full((g, self.k + self.r), -1)
            rows[plan.group, plan.slot] = np.arange(len(plan))
            self.rows = [[x for x in row if x >= 0] for row in rows.tolist()]
            self.parity_rows = [[x for x in row[self.k:] if x >= 0] for row in rows.tolist()]
            self.members = plan.members.tolist()
            self.closed = plan.closed.tolist()
            gq = np.full(n, -1)  # each query's group, from the members (an nworker request names no query)
            in_group = plan.members >= 0
            gq[plan.members[in_group]] = np.nonzero(in_group)[0]
            self.group_list = gq.tolist()
            self._group_of = gq
            have = np.zeros((g, self.k + self.r), dtype=bool)
            if not self.nworker:  # blank padding: its output is known in advance (an N-worker code encodes it)
                have[:, :self.k] = plan.members < 0
            self.count = have.sum(axis=1).tolist()
            self.have = have.tolist()
            self.slot_lost = np.zeros((g, self.k + self.r), dtype=bool).tolist()
            self.urgent = [False] * g                          # a loss in the group: no more deferral
            self.decoded = {}                                  # group -> the outputs in hand when it decoded
            self.unanswered = (plan.members >= 0).sum(axis=1).tolist()
            self.unmade = [0] * g                              # requests of an open group not yet added (online)
        # recent first-request latencies, for a percentile deferral
        self.window = np.zeros(int(self.defer.get("window", 1)) if self.defer else 1)
        self.samples = 0
        self.delay_now = 0.0
        self.deadline = deadline_of(self)  # nworker with deadline_ms: decode from what arrived by then

    # -- what the drivers read ------------------------------------------------------------------------
    @property
    def done(self) -> np.ndarray:
        return np.asarray(self.done_at, dtype=float)

    @property
    def reconstructed(self) -> np.ndarray:
        return np.asarray(self.rebuilt, dtype=bool)

    @property
    def retried(self) -> np.ndarray:
        return np.asarray(self.was_retried, dtype=bool)

    @property
    def available(self) -> np.ndarray:
        """(groups, k + r): the outputs each group had in hand when it decoded (all False if it never did)."""
        out = np.zeros((len(self.have), self.k + self.r), dtype=bool)
        for g, mask in self.decoded.items():
            out[g] = mask
        return out

    @property
    def answers(self) -> np.ndarray:
        return np.asarray(self.answers_of, dtype=int)

    def query_of(self, n: int) -> int:
        return self.p_query[n]

    def is_retry(self, n: int) -> bool:
        return self.retry_row[n]

    # -- requests made while serving (a service, whose queries are not known in advance) ----------------
    def add_query(self) -> int:
        """A new query (the next number); its requests follow with :meth:`add_request`."""
        q = len(self.done_at)
        self.done_at.append(np.inf)
        self.rebuilt.append(False)
        self.was_retried.append(False)
        self.answers_of.append(0)
        self.retry_of.append(-1)
        if self.strategy in ("replicate", "backup"):
            self.copies.append([-1, -1])
        if self.grouped:
            self.group_list.append(-1)
        return q

    def open_group(self) -> int:
        """Coded, nworker: a new group (the next number), empty, whose members and parities are still to come."""
        g = len(self.rows)
        width = self.k + self.r
        for name, value in (("rows", []), ("parity_rows", []), ("members", [-1] * self.k), ("closed", np.inf),
                            ("have", [False] * width), ("count", 0), ("slot_lost", [False] * width),
                            ("urgent", False), ("unanswered", 0), ("unmade", width)):
            getattr(self, name).append(value)
        return g

    def join_group(self, g: int, slot: int, q: int) -> None:
        """Query ``q`` takes ``slot`` of open group ``g`` (its data request is added next)."""
        self.members[g][slot] = q
        self.group_list[q] = g
        self.unanswered[g] += 1

    def close_group(self, g: int, t: float) -> None:
        """Group ``g`` has its members at ``t``: its empty slots are blank padding, known at once (its
        parities are added next)."""
        self.closed[g] = t
        for s, q in enumerate(self.members[g]):
            if q < 0 and not self.nworker:  # an N-worker group sends all N coded inputs, padding or not
                self.have[g][s] = True
                self.count[g] += 1
                self.unmade[g] -= 1

    def add_request(self, q: int, g: int, slot: int, instance: int, t: float, delay: float,
                    factor: float = np.nan) -> int:
        """A request of the strategy's layout, due at ``t`` (call :meth:`due` then): query ``q`` (-1: a
        parity), coded group ``g`` and ``slot``, its fixed-layout ``instance``, its injected delay on any
        instance the delay model covers; ``factor`` NaN: the slow periods' factor where it goes."""
        n = len(self.state)
        for name, value in (("p_query", q), ("p_group", g), ("p_slot", slot), ("p_inst", instance),
                            ("p_time", t), ("p_delay", delay), ("p_factor", factor), ("retry_row", False),
                            ("state", PLANNED), ("inst", -1), ("sent", np.nan)):
            getattr(self, name).append(value)
        if self.grouped:
            self.rows[g].append(n)
            self.unmade[g] -= 1
            if slot >= self.k:
                self.parity_rows[g].append(n)
        elif self.strategy in ("replicate", "backup"):
            self.copies[q][slot] = n
        return n

    # -- events ----------------------------------------------------------------------------------------
    def due(self, n: int, now: float) -> None:
        if self.deadline is not None and self.deadline.due(n, now):
            return
        if self.state[n] != PLANNED:
            return
        if self.strategy == "coded" and self.p_query[n] < 0:
            g = self.p_group[n]
            if self.unanswered[g] == 0 and (self.cancel_on or self.defer is not None):
                self.skip(n)
                return
            if self.defer is not None and n not in self.woken and not self.urgent[g]:
                self.woken.add(n)
                d = self.defer_s()
                if d > 0:
                    self.driver.wake(n, self.closed[g] + d)
                    return
        elif self.strategy == "replicate" and self.p_slot[n] == 1:
            q = self.p_query[n]
            if self.answers_of[q] and (self.cancel_on or self.defer is not None):
                self.skip(n)
                return
            if self.defer is not None and n not in self.woken:
                self.woken.add(n)
                first = self.copies[q][0]
                d = self.defer_s()
                if d > 0 and self.state[first] in (PLANNED, OUTSTANDING):
                    self.driver.wake(n, self.p_time[n] + d)
                    return
        self.route_and_send(n, now)

    def output(self, n: int, now: float) -> None:
        if self.state[n] != OUTSTANDING:
            return  # a late output of a request already written off
        self.state[n] = DONE
        self.leave(self.inst[n])
        q = self.query_of(n)
        if self.is_retry(n):
            self.retry_of[q] = -1
            if not self.answers_of[q]:
                self.answer(q, now, False)
                self.driver.answer_own(q, n)
                self.after_answer(q)
            return
        if not self.grouped:
            if self.strategy == "replicate" and self.p_slot[n] == 0:
                self.record_latency(now - self.sent[n])
            if not self.answers_of[q]:  # backup: the backup model's copy answers approximately
                self.answer(q, now, self.strategy == "backup" and self.p_slot[n] == 1)
                self.driver.answer_own(q, n)
                self.after_answer(q)
            return
        g, slot = self.p_group[n], self.p_slot[n]
        self.have[g][slot] = True
        self.count[g] += 1
        if q >= 0:
            self.record_latency(now - self.sent[n])
            if not self.answers_of[q]:
                self.answer(q, now, False)
                self.driver.answer_own(q, n)
                self.after_answer(q)
        if self.count[g] >= self.need_of(g) and self.unanswered[g] > 0:
            self.decode_group(g, now)

    def need_of(self, g: int) -> int:
        """The outputs group ``g`` decodes from now (fewer once its deadline has passed)."""
        return self.need if self.deadline is None else self.deadline.need(g)

    def decode_group(self, g: int, now: float) -> None:
        """Answer group ``g``'s waiting members by the decoder, from the outputs in hand."""
        waiting = [x for x in self.members[g] if x >= 0 and not self.answers_of[x]]
        self.decoded[g] = list(self.have[g])
        for x in waiting:
            self.answer(x, now, True)
        self.driver.answer_decoded(g, waiting, self.decoded[g])
        for x in waiting:
            self.after_answer(x)

    def cancelled(self, n: int) -> None:
        if self.state[n] == OUTSTANDING:
            self.state[n] = CANCELLED
            self.leave(self.inst[n])
            if self.is_retry(n):
                self.retry_of[self.query_of(n)] = -1

    def failed(self, i: int, now: float) -> None:
        if not self.dead[i]:
            self.dead[i] = True
            self.levels[self.roles[i]][self.outstanding[i]].discard(i)
            self.live[self.roles[i]].remove(i)

    def lost(self, n: int, now: float) -> None:
        if self.state[n] == OUTSTANDING:
            self.leave(self.inst[n])
        elif self.state[n] != PLANNED:
            return
        self.state[n] = LOST
        failed = max(self.inst[n], 0)
        q = self.query_of(n)
        if self.is_retry(n):
            self.retry_of[q] = -1
            if not self.answers_of[q]:
                self.retry(q, failed, now)
            return
        if self.grouped:
            g = self.p_group[n]
            self.slot_lost[g][self.p_slot[n]] = True
            self.urgent[g] = True
            for row in self.parity_rows[g]:  # deferred parities go out now: the group needs them
                if self.state[row] == PLANNED and row in self.woken:
                    self.route_and_send(row, now)
            coming = sum(1 for row in self.rows[g] if self.state[row] in (PLANNED, OUTSTANDING)) + self.unmade[g]
            if self.count[g] + coming >= self.need_of(g):
                return  # the decoder will still get the outputs it needs
            for s, x in enumerate(self.members[g]):  # nworker: no member has an output of its own to wait for
                if x >= 0 and not self.answers_of[x] and (self.slot_lost[g][s] or self.nworker):
                    self.retry(x, failed, now)
            return
        if self.answers_of[q]:
            return
        if self.strategy in ("replicate", "backup"):
            other = self.copies[q][1 - self.p_slot[n]]
            if self.state[other] == OUTSTANDING:
                return
            if self.state[other] == PLANNED:
                if other in self.woken:  # a hedged copy waiting for its delay: it goes now
                    self.route_and_send(other, now)
                return
        self.retry(q, failed, now)

    # -- decisions ---------------------------------------------------------------------------------------
    def defer_s(self) -> float:
        d = self.defer
        if "ms" in d:
            return d["ms"] / 1000.0
        return self.delay_now

    def record_latency(self, seconds: float) -> None:
        if self.defer is None or "ms" in self.defer:
            return
        w = len(self.window)
        self.window[self.samples % w] = seconds
        self.samples += 1
        if self.samples >= min(WARM_SAMPLES, w) and self.samples % max(1, w // 20) == 0:
            self.delay_now = float(np.percentile(self.window[:min(self.samples, w)], self.defer["percentile"]))

    def answer(self, q: int, now: float, reconstructed: bool) -> None:
        self.answers_of[q] += 1
        self.done_at[q] = now
        self.rebuilt[q] = reconstructed
        if self.grouped:
            self.unanswered[self.group_list[q]] -= 1

    def after_answer(self, q: int) -> None:
        """With cancellation: drop what the answer made useless, if it has not started."""
        if not self.cancel_on:
            return
        if self.retry_of[q] >= 0:
            self.driver.cancel(self.retry_of[q])
        if self.strategy in ("replicate", "backup"):
            for row in self.copies[q]:
                if row >= 0 and self.state[row] == OUTSTANDING:
                    self.driver.cancel(row)
        elif self.grouped:
            g = self.group_list[q]
            if self.unanswered[g] == 0:
                for row in self.rows[g]:
                    if self.state[row] == OUTSTANDING:
                        self.driver.cancel(row)

    def skip(self, n: int) -> None:
        self.state[n] = SKIPPED

    def role_of(self, n: int) -> int:
        if self.all_f or self.is_retry(n):
            return ROLE_F  # a retry, or any request when every instance holds F
        if self.strategy == "backup" and self.p_slot[n] == 1:
            return ROLE_BACKUP
        if self.p_query[n] >= 0:
            return ROLE_F
        return self.p_slot[n] - self.k

    def route_and_send(self, n: int, now: float) -> None:
        inst = self.route(n)
        if inst < 0:  # no live instance of its role: lost at dispatch, recovered like any loss
            self.lost(n, now)
            return
        self.send(n, inst, now)

    def route(self, n: int) -> int:
        role = self.role_of(n)
        if self.routing == "static":
            planned = self.p_inst[n]
            if planned >= 0 and not self.dead[planned]:
                return planned
            return self.next_live(role, planned if planned >= 0 else 0)
        busy = self.holders(n)
        if self.routing == "p2c":
            live = self.live.get(role, [])
            free = [i for i in live if i not in busy] if busy else live
            free = free or live
            if len(free) <= 2:
                return min(free, key=self.outstanding.__getitem__) if free else -1
            if not self.coins:
                self.coins = self.rng.random(8192).tolist()
            a = int(self.coins.pop() * len(free))
            b = int(self.coins.pop() * (len(free) - 1))
            b += b >= a
            a, b = free[a], free[b]
            return a if self.outstanding[a] <= self.outstanding[b] else b
        fallback = -1
        for level in self.levels.get(role, []):  # jsq: the first live instance of the lowest count
            for i in level:
                if i not in busy:
                    return i
                if fallback < 0:
                    fallback = i
            if fallback >= 0 and not busy:
                break
        return fallback

    def holders(self, n: int) -> list:
        """Instances holding an outstanding request of n's group (coded) or query (replicate)."""
        if self.is_retry(n):
            return []
        if self.grouped:
            rows = self.rows[self.p_group[n]]
        elif self.strategy in ("replicate", "backup"):
            rows = self.copies[self.p_query[n]]
        else:
            return []
        return [self.inst[row] for row in rows if row >= 0 and self.state[row] == OUTSTANDING]

    def join(self, i: int) -> None:
        c = self.outstanding[i]
        self.outstanding[i] = c + 1
        if not self.dead[i]:
            levels = self.levels[self.roles[i]]
            levels[c].discard(i)
            if len(levels) <= c + 1:
                levels.append(set())
            levels[c + 1].add(i)

    def leave(self, i: int) -> None:
        c = self.outstanding[i]
        self.outstanding[i] = c - 1
        if not self.dead[i]:
            levels = self.levels[self.roles[i]]
            levels[c].discard(i)
            levels[c - 1].add(i)

    def next_live(self, role: int, after: int) -> int:
        for step in range(1, self.num + 1):
            i = (after + step) % self.num
            if self.roles[i] == role and not self.dead[i]:
                return i
        return -1

    def send(self, n: int, inst: int, now: float) -> None:
        if self.is_retry(n):
            delay, factor = 0.0, 1.0
        else:
            delay = self.p_delay[n]
            if self.delay_set is not None and inst not in self.delay_set:
                delay = 0.0
            factor = self.p_factor[n]  # the plan's, where the plan sends it; else the slow periods' at ``now``
            if inst != self.p_inst[n] or n in self.woken or factor != factor:  # NaN: a row added while serving
                factor = self.factor_at(inst, now)
        self.state[n] = OUTSTANDING
        self.inst[n] = inst
        self.sent[n] = now
        self.join(inst)
        self.driver.send(n, inst, delay, factor)

    def factor_at(self, inst: int, now: float) -> float:
        s = self.plan.slowdown
        if s is None:
            return 1.0
        period = int(now // (s["period_ms"] / 1000.0))
        if self.slow is None or period >= len(self.slow):
            self.slow = slow_table(self.plan.seed, s, max(2 * period + 1, 16), self.num)
        return float(s["factor"]) if self.slow[period, inst] else 1.0

    def retry(self, q: int, failed: int, now: float) -> None:
        """Send query ``q`` again (no injected delay), once while that retry is in flight."""
        if self.retry_of[q] >= 0:
            return
        n = len(self.state)
        for name, value in (("p_query", q), ("p_group", -1), ("p_slot", 0), ("p_inst", -1), ("p_time", now),
                            ("p_delay", 0.0), ("p_factor", 1.0), ("retry_row", True), ("state", PLANNED),
                            ("inst", -1), ("sent", np.nan)):
            getattr(self, name).append(value)
        self.retry_query.append(q)
        self.retry_from.append(failed)
        if self.routing == "static":
            inst = self.next_live(ROLE_F, failed)
        else:
            inst = self.route(n)
        if inst < 0:
            self.state[n] = LOST
            give_up = getattr(self.driver, "unanswerable", None)
            if give_up is None:
                raise UserError("Every instance holding F has failed, so some queries cannot be answered. Fix: "
                                "fail fewer instances in 'failures'.")
            self.answer(q, np.inf, False)  # no answer will come: counted off, so nothing more waits for it
            give_up(q)
            return
        self.was_retried[q] = True
        self.retry_of[q] = n
        self.send(n, inst, now)
