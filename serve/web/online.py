"""The service's bookkeeping: admission, the clients' futures and what /health and /metrics show.

:class:`Service` is the part of the HTTP service that is not dispatch: it runs
on the web server's asyncio event loop, admits a client's input as a query
(at most ``app.max_queue`` admitted and unanswered at once; beyond that
:meth:`Service.predict` raises :class:`Overloaded`, which the HTTP layer
answers with 503 and ``Retry-After``), resolves the query's future when the
answer comes, and counts. Every dispatch decision (grouping, routing,
deferral, recovery after a failure) is made by the one policy machine the
benchmark and the simulator use too: :class:`serve.cluster.runtime.ServiceFrontend`
is the subclass that drives it, and the only one to build.
"""
from __future__ import annotations

import asyncio
import threading
import time
from array import array
from typing import Optional

import numpy as np
import torch

from serve.core.config import AppConfig, ServeConfig
from serve.core.plan import ROLE_BACKUP, ROLE_F, code_layout, pool_roles
from serve.core.strategies import seed_index

QUANTILES = (0.5, 0.9, 0.99, 0.999)


class Overloaded(Exception):
    """More queries than ``app.max_queue`` would be waiting."""


class Unanswerable(Exception):
    """No live instance holds F, so a query that lost its request cannot be re-sent."""


def instances_needed(strategy: str, m: int, k: int, r: int) -> tuple[int, list[int], int]:
    """``(F instances, parity instances per parity model, backup instances)`` of one strategy."""
    roles = pool_roles(strategy, m, k, r)
    return (roles.count(ROLE_F), [roles.count(j) for j in range(r)], roles.count(ROLE_BACKUP))


class Service:
    """Admission, futures and metrics of one served code; see the module docstring.

    A subclass sets ``roles`` (one per instance) and ``core`` (the :class:`serve.cluster.dispatch.Dispatcher`
    holding payloads and answers) and implements :meth:`start` and :meth:`submit`.
    """

    def __init__(self, cfg: ServeConfig, app: AppConfig, code, input_shape, classifier: bool):
        self.cfg, self.app, self.code = cfg, app, code
        self.strategy = app.strategy
        self.k, self.r, _ = code_layout(code)  # an N-worker code: K queries a group, N = k + r coded inputs
        self.m = cfg.instances
        self.input_shape, self.classifier = tuple(input_shape), classifier
        self.delay_model = cfg.delays[app.delay]
        self.rng = np.random.default_rng([cfg.seed, 2, seed_index(self.strategy)])
        self.futures: dict = {}  # admitted, unanswered query -> (asyncio future, admitted at)
        self.next_query = 0
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.t0 = time.perf_counter()
        self.timers: list = []  # the fail-stop kills still to come
        self.landed: list = []  # (ref, its done future) landed on Ray's thread, not yet settled on the loop
        self.landed_lock = threading.Lock()
        self.drain_scheduled = False
        self.latency = array("d")  # seconds, every answered query since start
        self.counts = {"answered": 0, "rebuilt": 0, "retried": 0, "rejected": 0, "unanswerable": 0}

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin serving on ``loop``: the clock starts, and the config's fail-stop kills are scheduled."""
        raise NotImplementedError

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
        self.admit(len(inputs))
        if len(inputs) == 1:  # one query a request, the common case: no gather
            return [await self.submit(inputs[0])]
        return list(await asyncio.gather(*[self.submit(x) for x in inputs]))

    def admit(self, n: int = 1) -> None:
        """Raise Overloaded (counting ``n`` queries refused) if ``n`` more would pass ``app.max_queue``. The HTTP
        layer asks before it reads a body (n = 1), so a full service refuses without parsing anything."""
        if len(self.futures) + n > self.app.max_queue:
            self.counts["rejected"] += n
            raise Overloaded(f"{len(self.futures)} queries are waiting, the bound (app.max_queue) is "
                             f"{self.app.max_queue}")

    def submit(self, x: np.ndarray) -> asyncio.Future:
        """Admit ``x`` as the next query and set its requests going; the future resolves to its answer."""
        raise NotImplementedError

    # -- answers out -----------------------------------------------------------------------------------
    def _watch(self, ref) -> None:
        """Have ``ref``'s reply settled on the event loop. Replies that land while the loop is busy are settled
        together, in one round (:meth:`_settle_ready`), so their groups are decoded in one call."""
        loop = self.loop

        def done(reply):  # on Ray's thread: the reply is already fetched, so the loop need not ray.get it
            with self.landed_lock:
                self.landed.append((ref, reply))
                if self.drain_scheduled:
                    return
                self.drain_scheduled = True
            try:
                loop.call_soon_threadsafe(self._settle_ready)
            except RuntimeError:  # the loop has closed: the service is shutting down
                pass

        ref.future().add_done_callback(done)

    def _settle_ready(self) -> None:
        with self.landed_lock:
            refs, self.landed = self.landed, []
            self.drain_scheduled = False
        self._settle(refs)

    def _answered(self, q: int, output: np.ndarray, now: float, reconstructed: bool, retried: bool) -> None:
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
