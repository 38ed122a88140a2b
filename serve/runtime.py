"""Serving a trained code on Ray: model instances as actors, one frontend that answers queries.

The frontend (this process) executes a :class:`serve.plan.Plan`: it sends
each request when the plan says (open loop: arrivals never wait for
answers), and answers each query the moment its own output arrives or, for
the coded strategy, the moment the decoder has k outputs of its group in
hand, whichever is first. The encoder and decoder are the trained code's own
(:class:`coders.code.Code`), run here; F and the parity models run in the
actors. Late outputs are dropped. A request that fails because its actor
died is answered by reconstruction when its group can still be decoded,
else sent again to a live instance of the same role, so no query is lost.

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
import os
import subprocess
import sys
import time
from typing import Optional

import numpy as np
import torch

from serve.dispatch import Dispatcher, Request
from serve.plan import ROLE_BACKUP, ROLE_F, Plan
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
            raise UserError(f"Config key 'app.pool': the pool '{self.name}' on this Ray cluster holds instances of "
                            f"another code (weights {', '.join(sorted(others))}, this run's are "
                            f"{self.prefix.split(':')[1]}). Fix: serve the same run and checkpoint as the front end "
                            f"that started it, or pick another pool name with --set app.pool=NAME.")

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


class Frontend:
    """Executes one plan against live actors; see the module docstring.

    The plan says when each request goes and where; what happens to it after
    that is :class:`serve.dispatch.Dispatcher`'s, the same code the HTTP service runs.
    """

    def __init__(self, plan: Plan, actors: list, code, inputs: torch.Tensor, pad_output: torch.Tensor):
        import ray

        self.ray = ray
        self.plan, self.actors, self.code, self.inputs = plan, actors, code, inputs
        n = len(plan.queries.arrival)
        self.done = np.full(n, np.nan)
        self.answers = np.zeros(n, dtype=int)
        self.reconstructed = np.zeros(n, dtype=bool)
        self.retried = np.zeros(n, dtype=bool)
        self.predicted = np.full(n, -1)
        self.served = np.zeros((n, pad_output.shape[-1]), dtype=np.float32)
        self.arrived = np.zeros(n, dtype=bool)
        self.next = 0
        self.core = Dispatcher(plan.strategy, plan.roles, actors, code, pad_output, inputs.shape[1:], self.clock,
                               self.record, to_come=self.to_come, copy_to_come=self.copy_to_come)

    @property
    def dead(self) -> set:
        return self.core.dead

    def record(self, q: int, output: torch.Tensor, now: float, reconstructed: bool, retried: bool) -> None:
        self.answers[q] += 1
        self.done[q] = now
        self.reconstructed[q] = reconstructed
        self.retried[q] = retried
        self.predicted[q] = int(output.argmax())
        self.served[q] = output.numpy()

    def request(self, n: int) -> Request:
        p = self.plan
        return Request("plan", int(p.query[n]), int(p.group[n]), int(p.slot[n]))

    def arrive(self, n: int) -> None:
        """Register request ``n``'s query (at its first request) and, for coded, its group (all members)."""
        p, core = self.plan, self.core
        q = int(p.query[n])
        if q >= 0 and not self.arrived[q]:
            self.arrived[q] = True
            core.add_query(q, self.inputs[p.queries.index[q]].numpy())
        g = int(p.group[n])
        if p.strategy == "coded" and g not in core.groups and not self.opened[g]:
            self.opened[g] = True
            core.open_group(g)
            for s, member in enumerate(p.members[g]):
                if member >= 0:
                    core.join(g, s, int(member), self.inputs[p.queries.index[member]])
            core.seal(g)

    def payload(self, n: int) -> np.ndarray:
        p = self.plan
        if p.query[n] >= 0:
            return self.inputs[p.queries.index[p.query[n]]].numpy()
        return self.core.parity(int(p.group[n]), int(p.slot[n]) - p.k)

    def to_come(self, g: int) -> int:
        """Requests of group ``g`` the plan has still to send, to an instance not dead."""
        future = np.nonzero(self.plan.group[self.next:] == g)[0] + self.next
        return sum(1 for n in future if self.plan.instance[n] >= 0 and self.plan.instance[n] not in self.dead)

    def copy_to_come(self, q: int) -> bool:
        return bool(np.any(self.plan.query[self.next:] == q))

    # -- the loop ----------------------------------------------------------------------------------
    def clock(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, interference: Optional[dict] = None) -> Outcome:
        ray, p, core = self.ray, self.plan, self.core
        self.opened = np.zeros(len(p.closed) if p.closed is not None else 0, dtype=bool)
        kills = sorted((t, i) for i, t in p.failures.items())
        busy = []
        if interference:
            busy = [self.actors[i] for i in interference["instances"] if i < len(self.actors)]
            ray.get([a.start_interference.remote(interference["processes"]) for a in busy])
        self.t0 = time.perf_counter()
        self.next = 0
        n_req = len(p)
        while core.open or not self.arrived.all():
            now = self.clock()
            while self.next < n_req and p.time[self.next] <= now:
                n = self.next
                self.next += 1
                self.arrive(n)
                inst = int(p.instance[n])
                if inst < 0 or inst in self.dead:  # never sent: no live instance of its role
                    core.on_failure(self.request(n), inst)
                    continue
                core.send(inst, self.payload(n), float(p.delay[n]), float(p.factor[n]), self.request(n))
            while kills and kills[0][0] <= now:
                _, i = kills.pop(0)
                core.kill(i)
            upcoming = min(p.time[self.next] if self.next < n_req else np.inf, kills[0][0] if kills else np.inf)
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
                core.settle(ref, now)
        if np.any(self.answers == 0):  # every path above answers or re-sends; this would be a bug
            raise RuntimeError(f"{int(np.sum(self.answers == 0))} queries of strategy {p.strategy} were never "
                               f"answered and nothing is left to wait for")
        # Late outputs are dropped, but the next strategy must find the instances idle.
        if core.pending:
            ray.wait(list(core.pending), num_returns=len(core.pending), timeout=60)
        if busy:
            ray.get([a.stop_interference.remote() for a in busy if self.actors.index(a) not in self.dead])
        q = p.queries
        return Outcome(q.arrival, self.done, self.reconstructed, self.retried, self.predicted, q.label, q.index,
                       dict(core.cost), {k: np.asarray(v) for k, v in core.req.items()}, self.answers, self.served)


class PolicyFrontend(Frontend):
    """Executes a plan under a dynamic policy (:mod:`serve.policy`) against live actors.

    The policy's :class:`serve.policy.PolicyMachine` makes every decision, as it does in the simulator: which
    request goes to which instance and when, which are dropped, and which output or decoding answers a query.
    This loop keeps the wall clock and carries those decisions out with the answering core the fixed plans
    and the HTTP service share (:class:`serve.dispatch.Dispatcher`, ``self.core``): it sends and logs the
    requests, encodes a group's parities once (when the first one goes out), decodes, and records each answer.
    Queue lengths are the frontend's count of requests sent to an actor and not yet back. A cancel is
    ``ray.cancel`` on the request: Ray drops it if the actor has not started it (its ``ray.get`` then raises
    TaskCancelledError), and lets it run otherwise.
    """

    def __init__(self, plan: Plan, actors: list, code, inputs: torch.Tensor, pad_output: torch.Tensor,
                 seed_index: int = 0):
        from serve.policy import PolicyMachine

        super().__init__(plan, actors, code, inputs, pad_output)
        self.policy = PolicyMachine(plan, self, np.random.default_rng([plan.seed, 11, seed_index]))
        self.timers: list = []
        self.ref_of: dict = {}    # request n -> its ObjectRef
        self.n_of: dict = {}      # ObjectRef -> request n
        self.outputs_of: dict = {}
        self.core.req["cancelled"] = []

    # -- what the policy machine calls -----------------------------------------------------------------
    def send(self, n: int, inst: int, delay: float, factor: float) -> None:  # noqa: D102 (the driver's send)
        d, p = self.policy, self.plan
        if d.is_retry(n):
            q = d.query_of(n)
            x, req = self.inputs[p.queries.index[q]].numpy(), Request("retry", q, -1, 0)
        else:
            self.arrive(n)  # the group's members join the core's group, for its parities and its decoding
            x, req = self.payload(n), self.request(n)
        ref = self.core.send(inst, x, delay, factor, req)
        self.ref_of[n] = ref
        self.n_of[ref] = n

    def cancel(self, n: int) -> None:
        ref = self.ref_of.get(n)
        if ref is not None and ref in self.core.pending:
            self.ray.cancel(ref)

    def wake(self, n: int, t: float) -> None:
        import heapq

        heapq.heappush(self.timers, (t, n))

    def answer_own(self, q: int, n: int) -> None:
        self.core.answer(q, self.outputs_of.pop(n), self.clock(), reconstructed=False)

    def answer_decoded(self, g: int, queries: list, available) -> None:
        """Decode group ``g`` from the outputs the machine says are in hand; the core answers ``queries``."""
        grp = self.core.groups[g]
        grp.have = torch.as_tensor(np.asarray(available, dtype=bool))
        waiting = {int(q) for q in queries}
        if {q for q in grp.members if q >= 0 and q in self.core.open} != waiting:
            raise RuntimeError(f"group {g}: the policy and the answering core disagree on which queries wait")
        self.core.try_decode(g, self.clock())

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, interference: Optional[dict] = None) -> Outcome:
        import heapq

        ray, p, d, core = self.ray, self.plan, self.policy, self.core
        self.opened = np.zeros(len(p.closed) if p.closed is not None else 0, dtype=bool)
        for q, index in enumerate(p.queries.index):  # every query can be answered from the start (a retry or a
            core.add_query(q, self.inputs[index].numpy())  # decoding may answer it before its own request goes)
        self.arrived[:] = True
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
                _, i = kills.pop(0)
                core.kill(i)
                d.failed(i, now)
            while self.next < n_req and p.time[self.next] <= now:
                self.next += 1
                d.due(self.next - 1, now)
            while self.timers and self.timers[0][0] <= now:
                _, n = heapq.heappop(self.timers)
                d.due(n, now)
            upcoming = min(p.time[self.next] if self.next < n_req else np.inf, kills[0][0] if kills else np.inf,
                           self.timers[0][0] if self.timers else np.inf)
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
                n = self.n_of.pop(ref)
                req, inst, output, ok, cancelled = core.collect(ref, now)
                core.req["cancelled"].append(cancelled)
                if cancelled:
                    d.cancelled(n)
                elif not ok:
                    self.dead.add(inst)
                    d.lost(n, now)
                else:
                    out = torch.from_numpy(np.array(output))
                    grp = core.groups.get(req.group) if req.kind == "plan" and req.group >= 0 else None
                    if grp is not None:  # a coded output, for the decoder
                        grp.outputs[req.slot] = out
                        grp.have[req.slot] = True
                    self.outputs_of[n] = out
                    d.output(n, now)
                    self.outputs_of.pop(n, None)
        if not all(d.answers_of):  # every path answers or re-sends; this would be a bug
            raise RuntimeError(f"{sum(1 for a in d.answers_of if not a)} queries of policy "
                               f"{p.policy.name or p.strategy} were never answered and nothing is left to wait for")
        if core.pending:  # late outputs are dropped, but the next policy must find the instances idle
            ray.wait(list(core.pending), num_returns=len(core.pending), timeout=60)
        if busy:
            ray.get([a.stop_interference.remote() for a in busy if self.actors.index(a) not in self.dead])
        q = p.queries
        return Outcome(q.arrival, d.done, d.reconstructed, d.retried, self.predicted, q.label, q.index,
                       dict(core.cost), {k: np.asarray(v) for k, v in core.req.items()}, d.answers, self.served)
