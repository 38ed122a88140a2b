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

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from serve.plan import ROLE_BACKUP, ROLE_F, Plan
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


class Pool:
    """The actors of one setting: F instances and parity instances, shared by the strategies."""

    def __init__(self, code, cfg, num_f: int, num_parity: list[int], backup=None, num_backup: int = 0):
        import ray

        self.ray = ray
        self.code, self.cfg = code, cfg
        opts = {"num_cpus": cfg.instance_cpus, "max_restarts": 0}
        if cfg.device.startswith("cuda"):
            opts["num_gpus"] = 1.0 / (num_f + sum(num_parity))
        self.remote = ray.remote(**opts)(Instance)
        self.f = [self._start(code.base) for _ in range(num_f)]
        self.parity = [[self._start(code.parity_model(j)) for _ in range(n)] for j, n in enumerate(num_parity)]
        self.backup_model = backup
        self.backup = [self._start(backup) for _ in range(num_backup)]
        self.wait_ready(self.f + [a for row in self.parity for a in row] + self.backup)

    def _start(self, module):
        cfg = self.cfg
        return self.remote.remote(module, cfg.instance_threads, cfg.flush_denormal, cfg.device)

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
                self.f[i] = self._start(self.code.base)
                fresh.append(self.f[i])
        for j, row in enumerate(self.parity):
            for i, a in enumerate(row):
                if a in dead:
                    row[i] = self._start(self.code.parity_model(j))
                    fresh.append(row[i])
        for i, a in enumerate(self.backup):
            if a in dead:
                self.backup[i] = self._start(self.backup_model)
                fresh.append(self.backup[i])
        if fresh:
            self.wait_ready(fresh)

    def shutdown(self) -> None:
        for a in self.f + [a for row in self.parity for a in row] + self.backup:
            self.ray.kill(a)


@dataclass
class Outcome:
    """What happened to every query of one strategy (arrays of length N, times in seconds)."""

    arrival: np.ndarray
    done: np.ndarray
    reconstructed: np.ndarray
    retried: np.ndarray
    predicted: np.ndarray
    label: np.ndarray
    image: np.ndarray
    frontend_s: dict          # seconds the frontend spent encoding, dispatching and decoding
    requests: dict            # per request: instance, role, sent, done, compute, delay, factor, ok
    answers: np.ndarray       # how many times each query was answered (1 when all is well)
    outputs: Optional[np.ndarray] = None  # (N, n): each query's served answer (F's output or a reconstruction)


class Frontend:
    """Executes one plan against live actors; see the module docstring."""

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
        self.k, self.r = plan.k, plan.r
        self.pad = pad_output
        self.cost = {"encode": 0.0, "dispatch": 0.0, "decode": 0.0}
        self.dead: set = set()
        self.retrying: set = set()  # queries with a retry in flight
        self.req = {name: [] for name in ("instance", "role", "sent", "done", "compute", "delay", "factor", "ok")}
        if plan.strategy == "coded":
            g = len(plan.closed)
            self.outputs = torch.zeros(g, self.k + self.r, pad_output.shape[-1])
            self.have = torch.zeros(g, self.k + self.r, dtype=torch.bool)
            self.lost = np.zeros((g, self.k + self.r), dtype=bool)
            pads = torch.as_tensor(plan.members < 0)
            self.have[:, :self.k] = pads
            self.outputs[:, :self.k][pads] = pad_output
            self.parities: dict = {}

    # -- sending -----------------------------------------------------------------------------------
    def payload(self, n: int) -> np.ndarray:
        p = self.plan
        if p.query[n] >= 0:
            return self.inputs[p.queries.index[p.query[n]]].numpy()
        g = int(p.group[n])
        if g not in self.parities:  # the group has just closed: encode its k inputs once
            t = time.perf_counter()
            members = p.members[g]
            x = torch.zeros(self.k, *self.inputs.shape[1:])
            real = members >= 0
            x[torch.as_tensor(real)] = self.inputs[p.queries.index[members[real]]]
            with torch.no_grad():
                self.parities[g] = [self.code.encode(x.unsqueeze(0))[0], self.r]
            self.cost["encode"] += time.perf_counter() - t
        entry = self.parities[g]
        entry[1] -= 1
        parity = entry[0][int(p.slot[n]) - self.k].numpy()
        if entry[1] == 0:
            del self.parities[g]
        return parity

    def send(self, actor_index: int, x: np.ndarray, delay: float, factor: float, key: tuple) -> None:
        t = time.perf_counter()
        ref = self.actors[actor_index].infer.remote(x, delay, factor)
        self.pending[ref] = (key, actor_index, self.clock(), delay, factor)
        self.cost["dispatch"] += time.perf_counter() - t

    # -- answering ---------------------------------------------------------------------------------
    def answer(self, q: int, output: torch.Tensor, now: float, reconstructed: bool) -> None:
        """Answer query ``q``; callers answer only unanswered queries (a later output is dropped)."""
        self.answers[q] += 1
        self.done[q] = now
        self.reconstructed[q] = reconstructed
        self.predicted[q] = int(output.argmax())
        self.served[q] = output.numpy()

    def try_decode(self, g: int, now: float) -> None:
        members = self.plan.members[g]
        waiting = [s for s in range(self.k) if members[s] >= 0 and self.answers[members[s]] == 0]
        if not waiting or int(self.have[g].sum()) < self.k:
            return
        t = time.perf_counter()
        with torch.no_grad():
            recon = self.code.decode(self.outputs[g:g + 1], self.have[g:g + 1])[0]
        self.cost["decode"] += time.perf_counter() - t
        for s in waiting:
            self.answer(int(members[s]), recon[s], now, reconstructed=True)

    def on_result(self, key: tuple, output: np.ndarray, now: float) -> None:
        kind, n = key
        p = self.plan
        out = torch.from_numpy(np.array(output))
        if kind == "retry":
            self.retrying.discard(n)
            if self.answers[n] == 0:
                self.answer(n, out, now, reconstructed=False)
            return
        q = int(p.query[n])
        if p.strategy != "coded":
            if self.answers[q] == 0:  # replicate, backup: the first copy wins, the other is dropped
                self.answer(q, out, now, reconstructed=bool(p.strategy == "backup" and p.slot[n] == 1))
            return
        g, slot = int(p.group[n]), int(p.slot[n])
        self.outputs[g, slot] = out
        self.have[g, slot] = True
        if q >= 0 and self.answers[q] == 0:
            self.answer(q, out, now, reconstructed=False)
        self.try_decode(g, now)

    def on_failure(self, key: tuple, actor_index: int) -> None:
        """A request whose actor died: recover its query by decoding or by sending it again."""
        kind, n = key
        if actor_index >= 0:
            self.dead.add(actor_index)
        p = self.plan
        if kind == "retry":
            self.retrying.discard(n)
            self.retry(n, actor_index)
            return
        if p.strategy == "coded":
            g = int(p.group[n])
            self.lost[g, int(p.slot[n])] = True
            # Outputs still to come for this group: sent or planned, to an instance not yet dead.
            if int(self.have[g].sum()) + self.in_flight(g) >= self.k:
                return  # the decoder will still get k outputs
            for s, q in enumerate(p.members[g]):  # the others' own outputs are still coming
                if q >= 0 and self.answers[q] == 0 and self.lost[g, s]:
                    self.retry(int(q), max(actor_index, 0))
            return
        q = int(p.query[n])
        if self.answers[q] == 0 and not (p.strategy in ("replicate", "backup") and self.copy_in_flight(q, n)):
            self.retry(q, max(actor_index, 0))

    def in_flight(self, g: int) -> int:
        count = sum(1 for (kind, n), a, *_ in self.pending.values()
                    if kind == "plan" and self.plan.group[n] == g and a not in self.dead)
        future = np.nonzero(self.plan.group[self.next:] == g)[0] + self.next
        return count + sum(1 for n in future if self.plan.instance[n] >= 0 and self.plan.instance[n] not in self.dead)

    def copy_in_flight(self, q: int, n: int) -> bool:
        return any(kind == "plan" and m != n and self.plan.query[m] == q and a not in self.dead
                   for (kind, m), a, *_ in self.pending.values()) or \
            bool(np.any(self.plan.query[self.next:] == q))

    def retry(self, q: int, failed: int) -> None:
        """Send query ``q`` again, to the next live F instance after ``failed`` (no injected delay);
        once only while that retry is in flight."""
        if q in self.retrying:
            return
        roles = self.plan.roles
        for step in range(1, len(roles) + 1):
            i = (failed + step) % len(roles)
            if roles[i] == ROLE_F and i not in self.dead:
                self.retried[q] = True
                self.retrying.add(q)
                self.send(i, self.inputs[self.plan.queries.index[q]].numpy(), 0.0, 1.0, ("retry", q))
                return
        raise UserError("Every instance holding F has failed, so some queries cannot be answered. Fix: fail "
                        "fewer instances in 'failures'.")

    # -- the loop ----------------------------------------------------------------------------------
    def clock(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, interference: Optional[dict] = None) -> Outcome:
        ray, p = self.ray, self.plan
        self.pending: dict = {}
        kills = sorted((t, i) for i, t in p.failures.items())
        busy = []
        if interference:
            busy = [self.actors[i] for i in interference["instances"] if i < len(self.actors)]
            ray.get([a.start_interference.remote(interference["processes"]) for a in busy])
        self.t0 = time.perf_counter()
        self.next = 0
        n_req = len(p)
        unanswered = len(self.done)
        while unanswered:
            now = self.clock()
            while self.next < n_req and p.time[self.next] <= now:
                n = self.next
                self.next += 1
                inst = int(p.instance[n])
                if inst < 0 or inst in self.dead:  # never sent: no live instance of its role
                    self.on_failure(("plan", n), inst)
                    continue
                self.send(inst, self.payload(n), float(p.delay[n]), float(p.factor[n]), ("plan", n))
            while kills and kills[0][0] <= now:
                _, i = kills.pop(0)
                ray.kill(self.actors[i], no_restart=True)
                self.dead.add(i)  # fail-stop is detected at once: nothing more is sent there
            upcoming = min(p.time[self.next] if self.next < n_req else np.inf, kills[0][0] if kills else np.inf)
            wait = max(0.0, min(upcoming - self.clock(), 1.0))
            if not self.pending:
                if upcoming == np.inf:
                    break
                time.sleep(wait)
                continue
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=wait)
            if not ready:
                continue
            ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            now = self.clock()
            for ref in ready:
                key, actor_index, sent, delay, factor = self.pending.pop(ref)
                try:
                    output, compute = ray.get(ref)
                    ok = True
                except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError):
                    output, compute, ok = None, float("nan"), False
                self.log_request(actor_index, sent, now, compute, delay, factor, ok)
                if ok:
                    self.on_result(key, output, now)
                else:
                    self.on_failure(key, actor_index)
            unanswered = int(np.sum(self.answers == 0))
        if np.any(self.answers == 0):  # every path above answers or re-sends; this would be a bug
            raise RuntimeError(f"{int(np.sum(self.answers == 0))} queries of strategy {p.strategy} were never "
                               f"answered and nothing is left to wait for")
        # Late outputs are dropped, but the next strategy must find the instances idle.
        if self.pending:
            ray.wait(list(self.pending), num_returns=len(self.pending), timeout=60)
        if busy:
            ray.get([a.stop_interference.remote() for a in busy if self.actors.index(a) not in self.dead])
        q = p.queries
        return Outcome(q.arrival, self.done, self.reconstructed, self.retried, self.predicted, q.label, q.index,
                       dict(self.cost), {k: np.asarray(v) for k, v in self.req.items()}, self.answers, self.served)

    def log_request(self, actor_index, sent, now, compute, delay, factor, ok) -> None:
        for name, v in (("instance", actor_index), ("role", self.plan.roles[actor_index]), ("sent", sent),
                        ("done", now), ("compute", compute), ("delay", delay), ("factor", factor), ("ok", ok)):
            self.req[name].append(v)
