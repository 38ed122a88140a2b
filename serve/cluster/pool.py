"""The model instances on Ray: :class:`Instance` (one F or parity model, served by one actor) and :class:`Pool`
(the actors of one setting, shared by its strategies, or by front ends on one cluster under a name).

Formerly part of :mod:`serve.cluster.runtime`, which still exports these names.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import torch

from serve.core.plan import ROLE_BACKUP, ROLE_F
from util.errors import UserError


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
        """F on one input: :meth:`infer_batch` on a batch of one."""
        out, compute = self.infer_batch(np.asarray(x)[None], delay_s, factor)
        return out[0], compute

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
