"""The simulator's event loop (:class:`EventRun`): a plan run event by event, for dynamic policies
(:mod:`serve.core.policy`) and for batching (:mod:`serve.core.batching`). See serve/simulator/simulate.py's docstring."""
from __future__ import annotations

import heapq
from collections import deque
from typing import Optional

import numpy as np

from serve.core.batching import Batchers, batching_of
from serve.core.config import ServeConfig
from serve.core.plan import ROLE_F, Plan
from serve.core.strategies import seed_index
from serve.core.workers import outputs_used
from serve.cluster.runtime import Outcome
from serve.simulator.predictions import served_predictions
from serve.simulator.profiles import ServiceModel
from util.errors import UserError


class EventRun:
    """One plan under a dynamic policy, event by event: the driver of a :class:`serve.core.policy.PolicyMachine`.

    Events at one time: outputs first, then failures, then dispatches (as the fixed plans' reference order).
    """

    FINISH, ARRIVE, FAIL, DUE, WAKE = 0, 1, 2, 3, 4  # the order of events at one time

    def __init__(self, plan: Plan, cfg: ServeConfig):
        from serve.core.policy import PolicyMachine

        self.plan, self.cfg = plan, cfg
        name = plan.policy.strategy if plan.policy else plan.strategy
        index = seed_index(name)
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
        # Each instance batches as the runtime's (serve.core.batching.Batchers: the same decisions), and serves its
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
                compute, overhead = self.model.draw_one(inst, self.profile_rng)
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
            self.batchers.returned(inst, self.now - self.calls[c][2])
            self.batchers.consider(inst, self.now)  # the freed slot sends what waits, as after a finished call
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
        self.batchers.returned(inst, t - sent)
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
        lost += [n for n in self.batchers.clear(i) if self.status[n] == "queued"]
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
            raise UserError("The simulation left a query unanswered; this is a bug in serve/core/policy.py.")
        grouped = d.grouped
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
                       d.answers, used=outputs_used(d._group_of if grouped else None,
                                                    d.available if grouped else None, d.reconstructed))
