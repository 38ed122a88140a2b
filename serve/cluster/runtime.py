"""Serving a trained code on Ray: model instances as actors, one frontend that answers queries.

The frontend (this process) executes a :class:`serve.core.plan.Plan` under its
policy (:class:`Frontend`; a fixed strategy is the policy with the fixed
layout), or serves clients' queries as they come (:class:`ServiceFrontend`,
for ``python -m serve.app``). Both are drivers of one
:class:`serve.core.policy.PolicyMachine`, which decides where and when each
request goes, what is deferred or dropped, and what answers a query (the
moment its own output arrives or, for the coded strategy, the moment the
decoder has k outputs of its group in hand, whichever is first); a request
whose actor died is recovered by reconstruction when its group can still be
decoded, else sent again to a live instance holding F, so no query is lost.
The encoder and decoder are the trained code's own
(:class:`coders.code.Code`), run here by :class:`serve.cluster.dispatch.Dispatcher`;
F and the parity models run in the actors. Late outputs are dropped.

Why Ray Core actors rather than Ray Serve: the frontend must decide per
request which instance gets it (round robin, replicas, a group's parities on
parity instances) and see each output the moment it lands, to decode early;
Ray Serve's router picks replicas itself and hides individual replicas, and
its HTTP proxy would add its own latency to every figure. An actor per
instance also gives real per-instance queues (an actor runs one request at a
time, in arrival order), which is what a straggling server looks like.
"""
from __future__ import annotations

import heapq
import itertools
import time
from typing import Optional

import numpy as np
import torch

from serve.core.batching import Batching, batching_of
from serve.core.config import PolicyConfig
from serve.cluster.dispatch import Dispatcher, GroupFormer, Request
from serve.web.online import Service
from serve.core.plan import Plan, Queries, code_layout, pool_roles, route, sample_delays
from serve.cluster.pool import POOL_NAMESPACE, Instance, Pool, fingerprint  # noqa: F401  (serve.cluster.runtime.Pool, as before)
from serve.core.results import Outcome
from serve.core.strategies import get as strategy_of, seed_index
from serve.core.workers import outputs_used, with_deadline
from util.ray_cluster import start_ray  # noqa: F401  (serve.cluster.runtime.start_ray, as before)


class Driver:
    """What a Ray frontend does for its :class:`serve.core.policy.PolicyMachine` (``self.policy``).

    The machine makes every decision, as it does in the simulator: which request goes to which instance and
    when, which are dropped, and which output or decoding answers a query. A driver keeps the clock and carries
    those decisions out on actors through the answering core (:class:`serve.cluster.dispatch.Dispatcher`,
    ``self.core``): it builds each request's payload (a parity is encoded once, when the first goes out),
    sends it, reports back what became of it (:meth:`settle`), decodes, and records each answer. Queue lengths
    are the frontend's count of requests sent to an actor and not yet back. A cancel is ``ray.cancel`` on the
    request: Ray drops it if the actor has not started it (its ``ray.get`` then raises TaskCancelledError) and
    lets it run otherwise. Subclasses give :meth:`input_of` (a query's input), :meth:`wake` (a timer) and
    ``clock()``.
    """

    policy = None  # the PolicyMachine
    core: Dispatcher

    def init_driver(self) -> None:
        self.ref_of: dict = {}      # request n -> its ticket in the core
        self.n_of: dict = {}        # ticket -> request n
        self.outputs_of: dict = {}  # request n -> its output, while the machine reads it

    def input_of(self, q: int) -> np.ndarray:
        raise NotImplementedError

    def open_group(self, g: int) -> None:
        """Make sure the core holds group ``g`` (members and inputs) before one of its requests goes."""

    # -- what the policy machine calls -----------------------------------------------------------------
    def send(self, n: int, inst: int, delay: float, factor: float) -> None:
        d = self.policy
        q = d.query_of(n)
        if d.is_retry(n):
            x, req = self.input_of(q), Request("retry", q, -1, 0)
        else:
            g, slot = d.p_group[n], d.p_slot[n]
            if g >= 0:
                self.open_group(g)
            req = Request("plan", q, g, slot)
            x = self.input_of(q) if q >= 0 else None  # a coded slot: encoded when its batch goes out
        ticket = self.core.send(inst, x, delay, factor, req)
        self.ref_of[n] = ticket
        self.n_of[ticket] = n

    def cancel(self, n: int) -> None:
        """Drop request ``n`` if it has not started: out of its batcher at once, or its whole call by
        ``ray.cancel`` once every request of the call is dropped."""
        ticket = self.ref_of.get(n)
        if ticket is not None and self.core.withdraw(ticket):
            del self.n_of[ticket], self.ref_of[n]
            self.policy.cancelled(n)

    def answer_own(self, q: int, n: int) -> None:
        d = self.policy
        self.core.answer(q, self.outputs_of.pop(n), self.clock(), d.rebuilt[q], d.was_retried[q])
        self.release(q)

    def answer_decoded(self, g: int, queries: list, available) -> None:
        """Decode group ``g`` from the outputs the machine says are in hand; the core answers ``queries``."""
        d = self.policy
        self.core.decode(g, queries, available, self.clock(), retried=lambda q: d.was_retried[q])
        self.release(queries[0] if queries else -1)

    def release(self, q: int) -> None:
        """Once a coded group is answered under a policy that drops its unsent parities, the core forgets it."""
        d = self.policy
        if q < 0 or not d.grouped or not (d.cancel_on or d.defer is not None):
            return
        g = d.group_list[q]
        if d.unanswered[g] == 0:
            self.core.forget(g)

    # -- what the actors report ------------------------------------------------------------------------
    def settle(self, ref, now: float, reply=None) -> None:
        """A call's ref is ready: tell the machine, for each request it carried, whether it answered, was
        cancelled, or was lost. ``reply``: the ref's done future, when the driver has it (else it is read with
        ``ray.get``). Call ``self.core.end_round`` after a round of these."""
        d = self.policy
        for ticket, req, inst, output, ok, cancelled in self.core.collect(ref, now, reply):
            n = self.n_of.pop(ticket)
            del self.ref_of[n]  # both maps hold only requests in flight: a long-running service keeps none
            if cancelled:
                d.cancelled(n)
            elif not ok:  # its actor died
                d.failed(inst, now)
                d.lost(n, now)
            else:
                self.outputs_of[n] = self.core.keep(req, output)
                d.output(n, now)
                self.outputs_of.pop(n, None)

    def kill(self, i: int, now: float) -> None:
        """A planned fail-stop: the actor goes, and the machine sends nothing more there."""
        self.core.kill(i)
        self.policy.failed(i, now)


class Frontend(Driver):
    """Executes a plan under its policy against live actors; see the module docstring.

    A plain strategy is the policy with the fixed layout (routing "static", pool "split", no cancellation, no
    deferral), so fixed strategies and ``policies`` rows run through this one driver of a
    :class:`serve.core.policy.PolicyMachine` (see :class:`Driver`), in one wait loop: the plan's requests fall
    due at their times, the machine's deferred requests at their timers, fail-stops at theirs, and every
    output is reported the moment Ray has it.
    """

    def __init__(self, plan: Plan, actors: list, code, inputs: torch.Tensor, pad_output: torch.Tensor,
                 seed_index: int = 0, batching: Batching = Batching()):
        import ray

        from serve.core.policy import PolicyMachine

        self.ray = ray
        self.plan, self.actors, self.code, self.inputs = plan, actors, code, inputs
        self.inputs_np = inputs.numpy()  # a view: rows as numpy without a conversion per query
        n = len(plan.queries.arrival)
        self.predicted = np.full(n, -1)
        self.recorded = np.zeros(n, dtype=bool)
        self.served = np.zeros((n, pad_output.shape[-1]), dtype=np.float32)
        self.opened = np.zeros(len(plan.closed) if plan.closed is not None else 0, dtype=bool)
        self.next = 0
        self.t0 = time.perf_counter()
        self.timers: list = []
        self.wakeups: list = []  # (t, seq, fn): the batchers' waits
        self.seq = itertools.count()
        self.core = Dispatcher(plan.strategy, plan.roles, actors, code, pad_output, inputs.shape[1:], self.clock,
                               self.record, batching=batching, schedule=self.at)
        self.policy = PolicyMachine(plan, self, np.random.default_rng([plan.seed, 11, seed_index]))
        self.init_driver()

    @property
    def dead(self) -> set:
        return self.core.dead

    def record(self, q: int, output: np.ndarray, now: float, reconstructed: bool, retried: bool) -> None:
        self.served[q] = output  # the predictions are the served rows' argmax, taken once at the end
        self.recorded[q] = True

    def input_of(self, q: int) -> np.ndarray:
        return self.inputs_np[self.plan.queries.index[q]]

    def open_group(self, g: int) -> None:
        p, core = self.plan, self.core
        if self.opened[g]:
            return
        self.opened[g] = True
        core.open_group(g)
        for s, member in enumerate(p.members[g]):
            if member >= 0:
                core.join(g, s, int(member), self.inputs_np[p.queries.index[member]])
        core.seal(g)

    def wake(self, n: int, t: float) -> None:
        heapq.heappush(self.timers, (t, n))

    def at(self, t: float, fn) -> None:
        heapq.heappush(self.wakeups, (t, next(self.seq), fn))

    def clock(self) -> float:
        return time.perf_counter() - self.t0

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, interference: Optional[dict] = None) -> Outcome:
        ray, p, d, core = self.ray, self.plan, self.policy, self.core
        for q, index in enumerate(p.queries.index):  # every query can be answered from the start (a retry or a
            core.add_query(q, self.inputs_np[index])  # decoding may answer it before its own request goes)
        kills = sorted((t, i) for i, t in p.failures.items())
        busy = [self.actors[i] for i in interference["instances"] if i < len(self.actors)] if interference else []
        if busy:
            ray.get([a.start_interference.remote(interference["processes"]) for a in busy])
        self.t0 = time.perf_counter()
        self.next = 0
        n_req = len(p)
        while not all(d.answers_of):
            now = self.clock()
            while kills and kills[0][0] <= now:
                self.kill(heapq.heappop(kills)[1], now)
            while self.next < n_req and p.time[self.next] <= now:
                self.next += 1
                d.due(self.next - 1, now)
            while self.timers and self.timers[0][0] <= now:
                d.due(heapq.heappop(self.timers)[1], now)
            core.flush_decodes()  # a deadline's decode is answered at once, not with the next reply
            while self.wakeups and self.wakeups[0][0] <= now:
                heapq.heappop(self.wakeups)[2]()
            upcoming = min(p.time[self.next] if self.next < n_req else np.inf, kills[0][0] if kills else np.inf,
                           self.timers[0][0] if self.timers else np.inf,
                           self.wakeups[0][0] if self.wakeups else np.inf)
            wait = max(0.0, min(upcoming - self.clock(), 1.0))
            if not core.pending:
                if upcoming == np.inf:
                    break
                time.sleep(wait)
                continue
            ready, _ = ray.wait(list(core.pending), num_returns=1, timeout=wait)
            if not ready:
                continue
            ready, _ = ray.wait(list(core.pending), num_returns=len(core.pending), timeout=0)
            now = self.clock()
            for ref in ready:
                self.settle(ref, now)
            core.end_round(now)
        if not all(d.answers_of):  # every path answers or re-sends; this would be a bug
            name = p.policy.name if p.policy is not None and p.policy.name else p.strategy
            raise RuntimeError(f"{sum(1 for a in d.answers_of if not a)} queries of {name} were never answered "
                               f"and nothing is left to wait for")
        if core.pending:  # late outputs are dropped, but the next row must find the instances idle
            ray.wait(list(core.pending), num_returns=len(core.pending), timeout=60)
        if busy:
            ray.get([a.stop_interference.remote() for a in busy if self.actors.index(a) not in self.dead])
        q = p.queries
        self.predicted = np.where(self.recorded, self.served.argmax(1), -1)
        grouped = d.grouped
        return Outcome(q.arrival, d.done, d.reconstructed, d.retried, self.predicted, q.label, q.index,
                       dict(core.cost), {k: np.asarray(v) for k, v in core.req.items()}, d.answers, self.served,
                       outputs_used(d._group_of if grouped else None, d.available if grouped else None,
                                    d.reconstructed))


PolicyFrontend = Frontend  # the name the policies' frontend had before fixed strategies ran through it too



def service_roles(strategy: str, m: int, k: int, r: int, policy: Optional[PolicyConfig] = None) -> list[int]:
    """The role of each instance the HTTP service runs for ``strategy``'s layout or ``policy``'s pool."""
    return pool_roles(policy.strategy if policy else strategy, m, k, r, policy.pool if policy else "split")


class ServiceFrontend(Driver, Service):
    """The HTTP service's frontend: queries from clients, decided by a policy machine, answered by the core.

    ``policy`` (a ``policies`` row, :class:`serve.core.config.PolicyConfig`) or, when None, ``app.strategy``'s
    fixed layout; ``actors``: one per instance of :func:`service_roles`. Admission, the answers' futures and
    the metrics are :class:`serve.web.online.Service`'s; arrivals are grouped by
    :class:`serve.cluster.dispatch.GroupFormer` (closing at the k-th arrival or ``group_timeout_ms`` after the first, by
    a timer on the event loop). Each request the layout makes is added to the
    :class:`serve.core.policy.PolicyMachine` as it is made and falls due at once; the machine routes, defers, drops
    and recovers it exactly as it does a plan's in the benchmark and the simulator. Actors report through Ray
    futures' callbacks onto the event loop, which owns all of this state (no locks).
    """

    def __init__(self, cfg, app, code, actors: list, pad_output: torch.Tensor, input_shape, classifier: bool,
                 policy: Optional[PolicyConfig] = None):
        import dataclasses

        from serve.core.policy import PolicyMachine

        pol = policy if policy is not None else PolicyConfig(strategy=app.strategy, name=app.strategy)
        super().__init__(cfg, dataclasses.replace(app, strategy=pol.strategy), code, input_shape, classifier)
        self.policy_config = pol
        self.roles = service_roles(pol.strategy, self.m, self.k, self.r, pol)
        self.core = Dispatcher(self.strategy, self.roles, actors, code, pad_output, input_shape, self.clock,
                               self._answered, watch=self._watch, log_requests=False, batching=batching_of(cfg),
                               schedule=self.at, soon=self.soon)
        self.ray = self.core.ray
        self.former = GroupFormer(self.k, cfg.group_timeout_ms / 1000.0)
        self.any_delay = {**self.delay_model, "instances": None}  # the machine applies the model's instances
        index = seed_index(pol.strategy)
        self.policy = PolicyMachine(with_deadline(service_plan(cfg, pol, self.k, self.r, self.roles, self.delay_model,
                                                               code_layout(code)[2]), cfg, code), self,
                                    np.random.default_rng([cfg.seed, 11, index]))
        self.init_driver()

    # -- life cycle --------------------------------------------------------------------------------------
    def start(self, loop) -> None:
        """Begin serving on ``loop``: the clock starts, and the config's fail-stop kills are scheduled."""
        self.loop = loop
        self.t0 = time.perf_counter()
        for f in self.cfg.failures:
            if f["instance"] < len(self.roles):
                self.timers.append(loop.call_later(f["at_ms"] / 1000.0, self._kill, f["instance"]))

    def _kill(self, i: int) -> None:
        self.kill(i, self.clock())

    # -- queries in --------------------------------------------------------------------------------------
    def submit(self, x: np.ndarray):
        d, core = self.policy, self.core
        q = d.add_query()
        self.next_query = q + 1
        now = self.clock()
        fut = self.loop.create_future()
        self.futures[q] = (fut, now)
        core.add_query(q, x)
        kind = strategy_of(self.strategy)
        if kind.grouped:
            g, slot, closed = self.former.add(q, now)
            if slot == 0:
                core.open_group(g)
                d.open_group()
                self.loop.call_later(self.former.timeout, self._expire, g)
            core.join(g, slot, q, x)
            d.join_group(g, slot, q)
            if kind.own_outputs:  # an N-worker query has no request of its own: its group's go at the close
                d.due(self.add(q, g, slot, now), now)
            for done_group, _, t in closed:
                self._close(done_group, t)
        else:
            rows = [self.add(q, -1, c, now) for c in range(kind.copies)]
            for n in rows:
                d.due(n, now)
        return fut

    def add(self, q: int, g: int, slot: int, now: float) -> int:
        """A request of the layout, due now: its fixed-layout instance and its injected delay."""
        inst = int(route(self.strategy, self.m, self.k, self.r, q, slot, g))
        delay = float(sample_delays(self.any_delay, np.array([inst]), self.rng)[0])
        return self.policy.add_request(q, g, slot, inst, now, delay)

    def _close(self, g: int, t: float) -> None:
        """Group ``g`` has its members (closed at ``t``): seal it; its parities (an N-worker code's N coded
        inputs) fall due now."""
        d, now = self.policy, self.clock()
        self.core.seal(g)
        d.close_group(g, t)
        rows = [self.add(-1, g, slot, now) for slot in range(self.core.first_coded, self.k + self.r)]
        for n in rows:
            d.due(n, now)
        if d.unanswered[g] == 0 and (d.cancel_on or d.defer is not None):
            self.core.forget(g)

    def _expire(self, g: int) -> None:
        if self.former.members and self.former.group == g:
            _, _, t = self.former.flush()
            self._close(g, t)

    # -- the driver's hooks ------------------------------------------------------------------------------
    def input_of(self, q: int) -> np.ndarray:
        return self.core.open[q]

    def wake(self, n: int, t: float) -> None:
        self.loop.call_later(max(0.0, t - self.clock()), self._due, n)

    def _due(self, n: int) -> None:
        now = self.clock()
        self.policy.due(n, now)
        self.core.end_round(now)  # a deadline's decode is answered at once

    def at(self, t: float, fn) -> None:
        self.loop.call_later(max(0.0, t - self.clock()), fn)

    def soon(self, fn) -> None:
        self.loop.call_soon(fn)

    def _settle(self, replies: list) -> None:
        """Replies in hand (``(ref, its done future)``): settle each, then end the round (decode, send what the
        batchers let go)."""
        now = self.clock()
        for ref, reply in replies:
            self.settle(ref, now, reply)
        self.core.end_round(now)

    def unanswerable(self, q: int) -> None:
        """No live instance holds F to send ``q`` again: its client gets 503."""
        g = self.core.group_of.get(q)
        if g is not None and g in self.core.groups:
            self.core.groups[g].waiting.discard(q)
        self._unanswerable(q)


def service_plan(cfg, policy: PolicyConfig, k: int, r: int, roles: list[int], delay: dict,
                 need: Optional[int] = None) -> Plan:
    """The empty plan a service's policy machine starts from: no query yet, the policy, the slow periods
    (``need``: the outputs a group decodes from, :func:`serve.core.plan.code_layout`)."""
    z, zi = np.zeros(0), np.zeros(0, dtype=int)
    grouped = strategy_of(policy.strategy).grouped
    return Plan(policy.strategy, k, r, roles, Queries(z, zi, zi), z, zi, zi, zi, zi, z, z,
                np.zeros((0, k), dtype=int) if grouped else None, z if grouped else None, {}, policy, None,
                delay.get("instances"), cfg.slowdown, cfg.seed, need)
