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

The policy's parts, each in a module of its own that :class:`PolicyMachine` is made of: **routing**
(:mod:`serve.core.routing`: static, ``jsq``, ``p2c``), **deferral and cancellation** (:mod:`serve.core.deferral`)
and **failure recovery** (:mod:`serve.core.recovery`). What the strategy does (copies, groups, who answers, which
role a request goes to) the machine asks its :class:`serve.core.strategies.Strategy`.

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

from serve.core.deferral import WARM_SAMPLES, Deferral  # noqa: F401  (policy's names since they began)
from serve.core.plan import ROLE_F, Plan
from serve.core.recovery import Recovery
from serve.core.routing import CANCELLED, DONE, LOST, OUTSTANDING, PLANNED, SKIPPED, Routing  # noqa: F401
from serve.core.strategies import get as strategy_of
from serve.core.workers import deadline_of


class PolicyMachine(Routing, Deferral, Recovery):
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
        self.kind = strategy_of(plan.strategy)
        n = len(plan.queries.arrival)
        self.roles = [int(x) for x in plan.roles]
        self.num = len(self.roles)
        self.all_f = max(self.roles) == ROLE_F  # every instance holds F (a request of any role may go anywhere)
        self.outstanding = [0] * self.num
        self.dead = [False] * self.num
        self.fail_at = np.full(self.num, np.inf)  # -inf once failed: what the failover rule reads
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
        self.copies: list = []                  # a strategy with copies (replicate, backup): each query's rows
        self.copied = not self.kind.grouped and self.kind.copies > 1
        if self.copied:
            copies = np.full((n, self.kind.copies), -1)
            copies[plan.query, plan.slot] = np.arange(len(plan))
            self.copies = copies.tolist()
        # The outputs a group needs before it decodes: k of its k + r for a systematic code, N - S of its N
        # for an N-worker code (plan.need). The one place the threshold lives (in output() and lost()).
        self.need = plan.need
        # a grouped strategy's requests belong to groups of k queries; an nworker request carries no query (it
        # is one of the group's N coded inputs), so every answer of its group is the decoder's
        self.grouped = self.kind.grouped
        self.nworker = not self.kind.own_outputs
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
        if self.copied:
            self.copies.append([-1] * self.kind.copies)
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
        elif self.copied:
            self.copies[q][slot] = n
        return n

    # -- events ----------------------------------------------------------------------------------------
    def due(self, n: int, now: float) -> None:
        if self.deadline is not None and self.deadline.due(n, now):
            return
        if self.state[n] != PLANNED:
            return
        if self.held(n):
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
            if self.kind.hedges == "copy" and self.p_slot[n] == 0:
                self.record_latency(now - self.sent[n])
            if not self.answers_of[q]:  # backup: the backup model's copy (the last) answers approximately
                self.answer(q, now, self.kind.approximate_copy and self.p_slot[n] == self.kind.copies - 1)
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
            self.fail_at[i] = -np.inf
            self.levels[self.roles[i]][self.outstanding[i]].discard(i)
            self.live[self.roles[i]].remove(i)

    def answer(self, q: int, now: float, reconstructed: bool) -> None:
        self.answers_of[q] += 1
        self.done_at[q] = now
        self.rebuilt[q] = reconstructed
        if self.grouped:
            self.unanswered[self.group_list[q]] -= 1
