"""The service's frontend: queries from clients, answered by the benchmark's dispatch core.

:class:`Service` runs on the web server's asyncio event loop and owns every
piece of dispatch state there, so nothing needs a lock: a client's input
becomes a query the moment it is admitted; it is routed by the plan's rules
(:func:`serve.plan.route`, the next live instance of the same role after a
failure), given the config's injected delay and slow-down, and sent to its
Ray actor. Coded queries are grouped k at a time by :class:`GroupFormer`
(closing at the k-th arrival or ``group_timeout_ms`` after the first, by a
timer on the loop); a closed group's parities are encoded and sent at once.
Each actor's reply comes back through a Ray future's callback onto the loop
and goes to :class:`serve.dispatch.Dispatcher`, which answers from F's output
or the decoder, whichever is first, and recovers requests of dead instances,
exactly as in ``python -m serve``. The answer resolves the client's future.

Admission is bounded: at most ``app.max_queue`` queries are admitted and
unanswered at once; beyond that :meth:`Service.predict` raises
:class:`Overloaded` (the HTTP layer answers 503 with ``Retry-After``).
"""
from __future__ import annotations

import asyncio
import time
from array import array
from typing import Optional

import numpy as np
import torch

from serve.config import STRATEGIES, AppConfig, ServeConfig
from serve.dispatch import Dispatcher, GroupFormer, Request, next_live
from serve.plan import ROLE_BACKUP, ROLE_F, pool_roles, route, sample_delays, streams

QUANTILES = (0.5, 0.9, 0.99, 0.999)


class Overloaded(Exception):
    """More queries than ``app.max_queue`` would be waiting."""


class Unanswerable(Exception):
    """No live instance holds F, so a query that lost its request cannot be re-sent."""


class SlowPeriods:
    """The config's ``slowdown`` periods: the very table :func:`serve.plan.slow_factors` draws, grown as time goes."""

    def __init__(self, cfg: ServeConfig, num_instances: int):
        self.cfg, self.n = cfg, max(num_instances, 1)
        self.slow = np.zeros((0, self.n), dtype=bool)

    def factor(self, instance: int, t: float) -> float:
        s = self.cfg.slowdown
        period = int(t // (s["period_ms"] / 1000.0))
        if period >= len(self.slow):  # same generator, more rows: the earlier rows stay as they were
            rows = max(2 * len(self.slow), period + 1, 1024)
            self.slow = streams(self.cfg.seed)["slowdown"].random((rows, self.n)) < s["fraction"]
        return float(s["factor"]) if self.slow[period, instance] else 1.0


def instances_needed(strategy: str, m: int, k: int, r: int) -> tuple[int, list[int], int]:
    """``(F instances, parity instances per parity model, backup instances)`` of one strategy."""
    roles = pool_roles(strategy, m, k, r)
    return (roles.count(ROLE_F), [roles.count(j) for j in range(r)], roles.count(ROLE_BACKUP))


class Service:
    """One strategy of a trained code served to clients; see the module docstring."""

    def __init__(self, cfg: ServeConfig, app: AppConfig, code, actors: list, pad_output: torch.Tensor,
                 input_shape, classifier: bool):
        self.cfg, self.app, self.code = cfg, app, code
        self.strategy = app.strategy
        self.k, self.r, self.m = code.k, code.r, cfg.instances
        self.roles = pool_roles(self.strategy, self.m, self.k, self.r)
        self.input_shape, self.classifier = tuple(input_shape), classifier
        self.delay_model = cfg.delays[app.delay]
        self.rng = np.random.default_rng([cfg.seed, 2, STRATEGIES.index(self.strategy)])
        self.slow = SlowPeriods(cfg, len(self.roles)) if cfg.slowdown is not None else None
        self.core = Dispatcher(self.strategy, self.roles, actors, code, pad_output, input_shape, self.clock,
                               self._answered, to_come=self._to_come, watch=self._watch, log_requests=False,
                               unanswerable=self._unanswerable)
        self.former = GroupFormer(self.k, cfg.group_timeout_ms / 1000.0)
        self.futures: dict = {}  # admitted, unanswered query -> (asyncio future, admitted at)
        self.next_query = 0
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.t0 = time.perf_counter()
        self.timers: list = []  # the fail-stop kills still to come
        self.latency = array("d")  # seconds, every answered query since start
        self.counts = {"answered": 0, "rebuilt": 0, "retried": 0, "rejected": 0, "unanswerable": 0}

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin serving on ``loop``: the clock starts, and the config's fail-stop kills are scheduled."""
        self.loop = loop
        self.t0 = time.perf_counter()
        for f in self.cfg.failures:
            if f["instance"] < len(self.roles):
                self.timers.append(loop.call_later(f["at_ms"] / 1000.0, self.core.kill, f["instance"]))

    def stop(self) -> None:
        for timer in self.timers:
            timer.cancel()
        for fut, _ in self.futures.values():
            if not fut.done():
                fut.set_exception(Unanswerable("the service is shutting down"))

    def clock(self) -> float:
        return time.perf_counter() - self.t0

    # -- queries in ------------------------------------------------------------------------------------
    async def predict(self, inputs: list[np.ndarray]) -> list[dict]:
        """Answer each input (float32, F's input shape); raises Overloaded when the queue is full."""
        if len(self.futures) + len(inputs) > self.app.max_queue:
            self.counts["rejected"] += len(inputs)
            raise Overloaded(f"{len(self.futures)} queries are waiting, the bound (app.max_queue) is "
                             f"{self.app.max_queue}")
        return list(await asyncio.gather(*[self.submit(x) for x in inputs]))

    def submit(self, x: np.ndarray) -> asyncio.Future:
        q = self.next_query
        self.next_query += 1
        fut = self.loop.create_future()
        self.futures[q] = (fut, self.clock())
        core = self.core
        core.add_query(q, x)
        if self.strategy == "coded":
            g, slot, closed = self.former.add(q, self.clock())
            if slot == 0:
                core.open_group(g)
                self.loop.call_later(self.former.timeout, self._expire, g)
            core.join(g, slot, q, x)
            self._send(Request("plan", q, g, slot), x)
            for done_group, _, _ in closed:
                self._close(done_group)
        else:
            for copy in range(2 if self.strategy in ("replicate", "backup") else 1):
                self._send(Request("plan", q, -1, copy), x)
        return fut

    def _send(self, req: Request, x: np.ndarray) -> None:
        target = int(route(self.strategy, self.m, self.k, self.r, req.query, req.slot, req.group))
        inst = next_live(target, self.roles, self.core.dead)
        if inst < 0:  # no live instance of its role
            self.core.on_failure(req, -1)
            return
        delay = float(sample_delays(self.delay_model, np.array([inst]), self.rng)[0])
        factor = self.slow.factor(inst, self.clock()) if self.slow is not None else 1.0
        self.core.send(inst, x, delay, factor, req)

    def _close(self, g: int) -> None:
        """Group ``g`` has its members: seal it, encode its parities and send them."""
        self.core.seal(g)
        for j in range(self.r):
            self._send(Request("plan", -1, g, self.k + j), self.core.parity(g, j))

    def _expire(self, g: int) -> None:
        if self.former.members and self.former.group == g:
            self._close(self.former.flush()[0])

    def _to_come(self, g: int) -> int:
        """Outputs of group ``g`` not yet sent: while it is open, its missing members and its parities."""
        if not (self.former.members and self.former.group == g):
            return 0  # a closed group's requests have all gone out
        live_parity = sum(1 for j in range(self.r)
                          if any(role == j and i not in self.core.dead for i, role in enumerate(self.roles)))
        return self.k - len(self.former.members) + live_parity

    # -- answers out -----------------------------------------------------------------------------------
    def _watch(self, ref) -> None:
        loop = self.loop

        def done(_):
            try:
                loop.call_soon_threadsafe(self._settle, ref)
            except RuntimeError:  # the loop has closed: the service is shutting down
                pass

        ref.future().add_done_callback(done)

    def _settle(self, ref) -> None:
        self.core.settle(ref, self.clock())

    def _answered(self, q: int, output: torch.Tensor, now: float, reconstructed: bool, retried: bool) -> None:
        fut, admitted = self.futures.pop(q)
        latency = now - admitted
        self.latency.append(latency)
        self.counts["answered"] += 1
        self.counts["rebuilt"] += int(reconstructed)
        self.counts["retried"] += int(retried)
        if fut.done():  # the client went away
            return
        answer = {"query": q}
        if self.classifier:
            answer["class"] = int(output.argmax())
        answer.update({"output": output.tolist(), "rebuilt": bool(reconstructed), "retried": bool(retried),
                       "latency_ms": 1000.0 * latency})
        fut.set_result(answer)

    def _unanswerable(self, q: int) -> None:
        self.core.open.pop(q, None)
        self.core.group_of.pop(q, None)
        fut, _ = self.futures.pop(q)
        self.counts["unanswerable"] += 1
        if not fut.done():
            fut.set_exception(Unanswerable("every instance holding F has failed"))

    # -- what /health and /metrics show ----------------------------------------------------------------
    def alive(self) -> int:
        return len(self.roles) - len(self.core.dead)

    def f_alive(self) -> bool:
        return any(role == ROLE_F and i not in self.core.dead for i, role in enumerate(self.roles))

    def metrics(self) -> dict:
        lat = np.frombuffer(self.latency, dtype=float) if len(self.latency) else np.zeros(0)
        c = self.counts
        out = {
            "queries_answered_total": c["answered"], "queries_rebuilt_total": c["rebuilt"],
            "queries_retried_total": c["retried"], "queries_rejected_total": c["rejected"],
            "queries_unanswerable_total": c["unanswerable"], "queries_in_flight": len(self.futures),
            "instance_requests_total": self.core.sent, "instances": len(self.roles), "instances_alive": self.alive(),
            "rebuilt_fraction": c["rebuilt"] / c["answered"] if c["answered"] else 0.0,
            "latency_seconds_count": len(lat), "latency_seconds_sum": float(lat.sum()),
        }
        out["latency_quantiles"] = {q: float(np.quantile(lat, q)) if len(lat) else float("nan") for q in QUANTILES}
        out["frontend_seconds"] = dict(self.core.cost)
        return out


def classifier_output(n_out: int, num_classes: Optional[int]) -> bool:
    """Whether F's output is a class-score vector (else it is served as a plain output vector)."""
    return bool(num_classes) and n_out == num_classes
