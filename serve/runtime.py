"""Serving a trained code on Ray: model instances as actors, one frontend that answers queries.

The frontend (this process) executes a :class:`serve.plan.Plan` under its
policy (:class:`Frontend`; a fixed strategy is the policy with the fixed
layout), or serves clients' queries as they come (:class:`ServiceFrontend`,
for ``python -m serve.app``). Both are drivers of one
:class:`serve.policy.PolicyMachine`, which decides where and when each
request goes, what is deferred or dropped, and what answers a query (the
moment its own output arrives or, for the coded strategy, the moment the
decoder has k outputs of its group in hand, whichever is first); a request
whose actor died is recovered by reconstruction when its group can still be
decoded, else sent again to a live instance holding F, so no query is lost.
The encoder and decoder are the trained code's own
(:class:`coders.code.Code`), run here by :class:`serve.dispatch.Dispatcher`;
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

import hashlib
import heapq
import itertools
import os
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import torch

from serve.batching import Batching, batching_of
from serve.config import STRATEGIES, PolicyConfig
from serve.dispatch import Dispatcher, GroupFormer, Request
from serve.online import Service
from serve.plan import ROLE_BACKUP, ROLE_F, Plan, Queries, code_layout, pool_roles, route, sample_delays
from serve.results import Outcome
from util.errors import UserError
from util.ray_cluster import start_ray  # noqa: F401  (serve.runtime.start_ray, as before)

class Instance:
    """One model instance: holds F or one parity model and serves one request at a time.

    A request's service time is the model's compute plus the injected delay,
    times the slow-down factor; the actor sleeps what the compute did not take.
    """

    def __init__(self, module: torch.nn.Module, threads: int, flush: bool, device: str):
        from util.hardware import flush_denormals

        torch.set_num_threads(threads)
        flush_denormals(flush)
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.busy: list[subprocess.Popen] = []

    def ready(self) -> int:
        return os.getpid()

    @torch.no_grad()
    def infer(self, x: np.ndarray, delay_s: float, factor: float) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        out = self.module(torch.as_tensor(x, device=self.device).unsqueeze(0))[0].float().cpu().numpy()
        compute = time.perf_counter() - start
        remaining = (compute + delay_s) * factor - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        return out, compute

    @torch.no_grad()
    def infer_batch(self, x: np.ndarray, delay_s: float, factor: float) -> tuple[np.ndarray, float]:
        """F over a batch of inputs (B, ...) in one call: its (B, outputs), and the compute time. The call takes
        (compute + delay) x factor, the largest injected delay and factor among its requests (the dispatcher's),
        so a straggler delays every request of the call it lands in."""
        start = time.perf_counter()
        out = self.module(torch.as_tensor(x, device=self.device)).float().cpu().numpy()
        compute = time.perf_counter() - start
        remaining = (compute + delay_s) * factor - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        return out, compute

    def start_interference(self, processes: int) -> int:
        """Start ``processes`` busy loops competing for this instance's CPU (real, not seeded)."""
        for _ in range(processes):
            self.busy.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        return len(self.busy)

    def stop_interference(self) -> None:
        for p in self.busy:
            p.kill()
            p.wait()
        self.busy = []


POOL_NAMESPACE = "lcc"  # the Ray namespace of shared pools' named actors (every front end's driver looks there)


def fingerprint(modules) -> str:
    """A short digest of the modules' weights: front ends share a pool only when they serve the same code."""
    h = hashlib.sha1()
    for m in modules:
        for key, t in m.state_dict().items():
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class Pool:
    """The actors of one setting: F instances and parity instances, shared by the strategies.

    With a ``name`` the actors are named Ray actors (namespace ``lcc``,
    ``<name>:<fingerprint of the code>:<slot>``, slot ``f0``, ``p0.1``, ``b0``),
    so every front end on the same Ray cluster that builds a pool of the same
    name and code gets the same instances: a slot that exists is attached, a
    missing one is started. A pool stops only the actors it started
    (:meth:`shutdown`); Ray ends them too when their starter's process exits.
    """

    def __init__(self, code, cfg, num_f: int, num_parity: list[int], backup=None, num_backup: int = 0,
                 name: str = ""):
        import ray

        self.ray = ray
        self.code, self.cfg, self.name = code, cfg, name
        opts = {"num_cpus": cfg.instance_cpus, "max_restarts": 0}
        if cfg.device.startswith("cuda"):
            opts["num_gpus"] = 1.0 / (num_f + sum(num_parity))
        self.remote = ray.remote(**opts)(Instance)
        self.backup_model = backup
        self.started: list = []   # the actors this pool started (and stops); the rest were attached
        self.prefix = ""
        if name:
            modules = [code.base] + [code.parity_model(j) for j in range(len(num_parity))] + ([backup] if backup else [])
            self.prefix = f"{name}:{fingerprint(modules)}:"
            self._check_shared_name()
        self.f = [self._start(code.base, f"f{i}") for i in range(num_f)]
        self.parity = [[self._start(code.parity_model(j), f"p{j}.{i}") for i in range(n)]
                       for j, n in enumerate(num_parity)]
        self.backup = [self._start(backup, f"b{i}") for i in range(num_backup)]
        self.wait_ready(self.f + [a for row in self.parity for a in row] + self.backup)

    def _named(self) -> set:
        return {a["name"] for a in self.ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == POOL_NAMESPACE}

    def _check_shared_name(self) -> None:
        others = {n.split(":")[1] for n in self._named() if n.startswith(self.name + ":")} - {self.prefix.split(":")[1]}
        if others:
            raise UserError(f"Config key 'app.pool_name': the pool '{self.name}' on this Ray cluster holds instances of "
                            f"another code (weights {', '.join(sorted(others))}, this run's are "
                            f"{self.prefix.split(':')[1]}). Fix: serve the same run and checkpoint as the front end "
                            f"that started it, or pick another pool name with --set app.pool_name=NAME.")

    def _start(self, module, slot: str = "", replace: bool = False):
        """A new actor holding ``module``; in a shared pool, the named one of ``slot`` (attached when it exists,
        unless ``replace``: then the dead one's name is waited for and taken)."""
        cfg = self.cfg
        args = (module, cfg.instance_threads, cfg.flush_denormal, cfg.device)
        if not self.name:
            actor = self.remote.remote(*args)
            self.started.append(actor)
            return actor
        name = self.prefix + slot
        for attempt in range(100):
            if not replace:
                try:
                    return self.ray.get_actor(name, namespace=POOL_NAMESPACE)
                except ValueError:  # not there: start it
                    pass
            try:
                actor = self.remote.options(name=name, namespace=POOL_NAMESPACE).remote(*args)
            except ValueError:  # taken: another front end started it a moment ago, or a killed one still holds it
                time.sleep(0.1 if replace else 0.0)
                continue
            self.started.append(actor)
            return actor
        raise UserError(f"The instance '{name}' of pool '{self.name}' could neither be found nor started on this Ray "
                        f"cluster. Fix: start the front ends one after another.")

    @property
    def attached(self) -> int:
        """How many of this pool's instances another front end started."""
        return len(self.f) + sum(len(row) for row in self.parity) + len(self.backup) - len(self.started)

    def wait_ready(self, actors) -> None:
        try:
            self.ray.get([a.ready.remote() for a in actors], timeout=300)
        except self.ray.exceptions.GetTimeoutError:
            raise UserError("The model instances did not start within 300 s: the Ray cluster lacks the resources "
                            "they ask for. Fix: lower 'instance_cpus', or add nodes.") from None

    def actors_for(self, roles: list[int]) -> list:
        """Actor of each instance of a strategy, in order: F actors for ROLE_F, parity actors for j."""
        counters = {}
        out = []
        for role in roles:
            n = counters.get(role, 0)
            counters[role] = n + 1
            out.append(self.f[n] if role == ROLE_F else self.backup[n] if role == ROLE_BACKUP else self.parity[role][n])
        return out

    def replace_dead(self, dead: set) -> None:
        """Start a fresh actor in place of every killed one, so the next strategy has its full pool."""
        fresh = []
        for i, a in enumerate(self.f):
            if a in dead:
                self.f[i] = self._start(self.code.base, f"f{i}", replace=True)
                fresh.append(self.f[i])
        for j, row in enumerate(self.parity):
            for i, a in enumerate(row):
                if a in dead:
                    row[i] = self._start(self.code.parity_model(j), f"p{j}.{i}", replace=True)
                    fresh.append(row[i])
        for i, a in enumerate(self.backup):
            if a in dead:
                self.backup[i] = self._start(self.backup_model, f"b{i}", replace=True)
                fresh.append(self.backup[i])
        if fresh:
            self.wait_ready(fresh)

    def shutdown(self) -> None:
        """Stop the actors this pool started (a shared pool's attached ones belong to the front end that started them)."""
        for a in self.started:
            self.ray.kill(a)
        self.started = []


class Driver:
    """What a Ray frontend does for its :class:`serve.policy.PolicyMachine` (``self.policy``).

    The machine makes every decision, as it does in the simulator: which request goes to which instance and
    when, which are dropped, and which output or decoding answers a query. A driver keeps the clock and carries
    those decisions out on actors through the answering core (:class:`serve.dispatch.Dispatcher`,
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
            del self.n_of[ticket]
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
        if q < 0 or d.strategy != "coded" or not (d.cancel_on or d.defer is not None):
            return
        g = d.group_list[q]
        if d.unanswered[g] == 0:
            self.core.forget(g)

    # -- what the actors report ------------------------------------------------------------------------
    def settle(self, ref, now: float) -> None:
        """A call's ref is ready: tell the machine, for each request it carried, whether it answered, was
        cancelled, or was lost. Call ``self.core.end_round`` after a round of these."""
        d = self.policy
        for ticket, req, inst, output, ok, cancelled in self.core.collect(ref, now):
            n = self.n_of.pop(ticket)
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
    :class:`serve.policy.PolicyMachine` (see :class:`Driver`), in one wait loop: the plan's requests fall
    due at their times, the machine's deferred requests at their timers, fail-stops at theirs, and every
    output is reported the moment Ray has it.
    """

    def __init__(self, plan: Plan, actors: list, code, inputs: torch.Tensor, pad_output: torch.Tensor,
                 seed_index: int = 0, batching: Batching = Batching()):
        import ray

        from serve.policy import PolicyMachine

        self.ray = ray
        self.plan, self.actors, self.code, self.inputs = plan, actors, code, inputs
        n = len(plan.queries.arrival)
        self.predicted = np.full(n, -1)
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

    def record(self, q: int, output: torch.Tensor, now: float, reconstructed: bool, retried: bool) -> None:
        self.predicted[q] = int(output.argmax())
        self.served[q] = output.numpy()

    def input_of(self, q: int) -> np.ndarray:
        return self.inputs[self.plan.queries.index[q]].numpy()

    def open_group(self, g: int) -> None:
        p, core = self.plan, self.core
        if self.opened[g]:
            return
        self.opened[g] = True
        core.open_group(g)
        for s, member in enumerate(p.members[g]):
            if member >= 0:
                core.join(g, s, int(member), self.inputs[p.queries.index[member]])
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
            core.add_query(q, self.inputs[index].numpy())  # decoding may answer it before its own request goes)
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
        return Outcome(q.arrival, d.done, d.reconstructed, d.retried, self.predicted, q.label, q.index,
                       dict(core.cost), {k: np.asarray(v) for k, v in core.req.items()}, d.answers, self.served)


PolicyFrontend = Frontend  # the name the policies' frontend had before fixed strategies ran through it too



def service_roles(strategy: str, m: int, k: int, r: int, policy: Optional[PolicyConfig] = None) -> list[int]:
    """The role of each instance the HTTP service runs for ``strategy``'s layout or ``policy``'s pool."""
    return pool_roles(policy.strategy if policy else strategy, m, k, r, policy.pool if policy else "split")


class ServiceFrontend(Driver, Service):
    """The HTTP service's frontend: queries from clients, decided by a policy machine, answered by the core.

    ``policy`` (a ``policies`` row, :class:`serve.config.PolicyConfig`) or, when None, ``app.strategy``'s
    fixed layout; ``actors``: one per instance of :func:`service_roles`. Admission, the answers' futures and
    the metrics are :class:`serve.online.Service`'s; arrivals are grouped by
    :class:`serve.dispatch.GroupFormer` (closing at the k-th arrival or ``group_timeout_ms`` after the first, by
    a timer on the event loop). Each request the layout makes is added to the
    :class:`serve.policy.PolicyMachine` as it is made and falls due at once; the machine routes, defers, drops
    and recovers it exactly as it does a plan's in the benchmark and the simulator. Actors report through Ray
    futures' callbacks onto the event loop, which owns all of this state (no locks).
    """

    def __init__(self, cfg, app, code, actors: list, pad_output: torch.Tensor, input_shape, classifier: bool,
                 policy: Optional[PolicyConfig] = None):
        import dataclasses

        from serve.policy import PolicyMachine

        pol = policy if policy is not None else PolicyConfig(strategy=app.strategy, name=app.strategy)
        super().__init__(cfg, dataclasses.replace(app, strategy=pol.strategy), code, input_shape, classifier)
        self.policy_config = pol
        self.roles = service_roles(pol.strategy, self.m, self.k, self.r, pol)
        self.core = Dispatcher(self.strategy, self.roles, actors, code, pad_output, input_shape, self.clock,
                               self._answered, watch=self._watch, log_requests=False, batching=batching_of(cfg),
                               schedule=self.at)
        self.ray = self.core.ray
        self.former = GroupFormer(self.k, cfg.group_timeout_ms / 1000.0)
        self.any_delay = {**self.delay_model, "instances": None}  # the machine applies the model's instances
        index = STRATEGIES.index(pol.strategy)
        self.policy = PolicyMachine(service_plan(cfg, pol, self.k, self.r, self.roles, self.delay_model,
                                                 code_layout(code)[2]), self,
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
        if self.strategy in ("coded", "nworker"):
            g, slot, closed = self.former.add(q, now)
            if slot == 0:
                core.open_group(g)
                d.open_group()
                self.loop.call_later(self.former.timeout, self._expire, g)
            core.join(g, slot, q, x)
            d.join_group(g, slot, q)
            if self.strategy == "coded":  # an N-worker query has no request of its own: its group's go at the close
                d.due(self.add(q, g, slot, now), now)
            for done_group, _, t in closed:
                self._close(done_group, t)
        else:
            rows = [self.add(q, -1, c, now) for c in range(2 if self.strategy in ("replicate", "backup") else 1)]
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
        self.loop.call_later(max(0.0, t - self.clock()), lambda: self.policy.due(n, self.clock()))

    def at(self, t: float, fn) -> None:
        self.loop.call_later(max(0.0, t - self.clock()), fn)

    def _settle(self, ref) -> None:
        now = self.clock()
        self.settle(ref, now)
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
    (``need``: the outputs a group decodes from, :func:`serve.plan.code_layout`)."""
    z, zi = np.zeros(0), np.zeros(0, dtype=int)
    grouped = policy.strategy in ("coded", "nworker")
    return Plan(policy.strategy, k, r, roles, Queries(z, zi, zi), z, zi, zi, zi, zi, z, z,
                np.zeros((0, k), dtype=int) if grouped else None, z if grouped else None, {}, policy, None,
                delay.get("instances"), cfg.slowdown, cfg.seed, need)
