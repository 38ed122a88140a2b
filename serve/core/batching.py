"""Batching in the instances: one batcher per instance, forming the batches its calls carry.

A request the policy machine sends to instance i does not go to Ray alone: it
joins i's queue in the answering core (:class:`serve.cluster.dispatch.Dispatcher`),
and the queue goes out as one call (:meth:`serve.cluster.runtime.Instance.infer_batch`,
F run once over the stacked inputs) when

* it holds ``batch_size`` requests (a full batch goes at once), or
* the instance has fewer than ``batch_inflight`` calls outstanding and the
  queue's first request has waited ``batch_wait_ms`` (0: at once).

So at light load every request goes alone, the moment it is made (no added
latency), and under load the requests that arrive while an instance computes
travel together in its next call: batches grow with the load, as in Triton's
dynamic batcher. ``batch_wait_ms`` trades a little latency at light load for
fuller batches. With ``batch_adaptive_ms`` the largest batch adapts per
instance in the style of Clipper's AIMD: it grows by one while a call comes
back within that many milliseconds and shrinks by 10% when one does not, between 1 and
``batch_size``.

A request keeps its own injected delay; a call takes the largest delay and slow-down factor among its requests,
so a straggler delays the whole call it lands in, as a slow server delays every request it holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Batching:
    """How an instance's requests are batched (the serving config's ``batch_*`` keys)."""

    size: int = 32               # most requests in one call
    wait_ms: float = 0.0         # longest the first request of a batch waits for more while its instance is free
    inflight: int = 2            # calls an instance may have outstanding before its queue waits for one to return
    adaptive_ms: Optional[float] = None  # AIMD: the call latency the largest batch adapts to (None: fixed size)

    @property
    def wait_s(self) -> float:
        return self.wait_ms / 1000.0


UNBATCHED = Batching(size=1, wait_ms=0.0, inflight=1 << 30)  # one request a call, sent at once (the old runtime)


def batching_of(cfg) -> Batching:
    """The :class:`Batching` of a checked :class:`serve.core.config.ServeConfig`."""
    return Batching(cfg.batch_size, float(cfg.batch_wait_ms), cfg.batch_inflight, cfg.batch_adaptive_ms)


class Batchers:
    """The queues of every instance, and when each goes out; the dispatcher sends and collects the calls.

    ``flush(i, tickets)`` (the dispatcher's) sends one call; ``schedule(t, fn)`` (the driver's) calls ``fn()`` at
    clock time ``t``, for the wait of a batch that is not full; ``clock()`` is the driver's clock. ``soon(fn)``
    (optional; an event loop's ``call_soon``): a request that may go at once goes at the end of the driver's
    current turn instead, with every other request made in that turn (a web server hands its requests over one
    at a time, and each call costs the front end more than a request does); without it, at once.
    """

    def __init__(self, num: int, batching: Batching, flush, schedule, clock, soon=None):
        self.b = batching
        self.queue: list[list[int]] = [[] for _ in range(num)]
        self.first: list[float] = [0.0] * num      # when the queue's first request joined
        self.inflight: list[int] = [0] * num
        self.limit: list[float] = [float(batching.size if batching.adaptive_ms is None else 1)] * num
        self.timed: list[bool] = [False] * num     # a wake-up for this queue's wait is pending
        self.flush_call, self.schedule, self.now = flush, schedule, clock
        self.soon = soon
        self.due: set = set()                      # instances whose queue goes at the end of this turn (soon)

    def size(self, i: int) -> int:
        return max(1, int(self.limit[i]))

    def add(self, i: int, ticket: int, now: float) -> None:
        q = self.queue[i]
        if not q:
            self.first[i] = now
        q.append(ticket)
        if self.soon is None or len(q) >= self.size(i):
            self.consider(i, now)
        elif not self.due:
            self.due.add(i)
            self.soon(self.turn_ended)
        else:
            self.due.add(i)

    def turn_ended(self) -> None:
        """The driver's turn is over: the queues that had new requests go by the rules."""
        due, self.due = self.due, set()
        now = self.now()
        for i in due:
            self.consider(i, now)

    def consider(self, i: int, now: float) -> None:
        """Send what the rules say should go now from instance ``i``'s queue; ask for a wake-up otherwise."""
        b = self.b
        while self.queue[i]:
            q, size = self.queue[i], self.size(i)
            if len(q) >= size:
                self.send(i, size, now)
                continue
            if self.inflight[i] >= b.inflight:
                return  # a returning call sends it
            due = self.first[i] + b.wait_s
            if now >= due or b.wait_s <= 0:
                self.send(i, len(q), now)
                continue
            if not self.timed[i] and self.schedule is not None:
                self.timed[i] = True
                self.schedule(due, lambda: self.woken(i))
            return

    def woken(self, i: int) -> None:
        self.timed[i] = False
        self.consider(i, self.now())

    def send(self, i: int, n: int, now: float) -> None:
        q = self.queue[i]
        batch, self.queue[i] = q[:n], q[n:]
        if self.queue[i]:
            self.first[i] = now
        self.inflight[i] += 1
        self.flush_call(i, batch)

    def drain(self, i: int, now: float) -> None:
        """Send all of ``i``'s queue now, whatever the rules (its instance was killed: the calls fail)."""
        while self.queue[i]:
            self.send(i, min(len(self.queue[i]), self.size(i)), now)

    def clear(self, i: int) -> list[int]:
        """Instance ``i`` failed: forget its queue and its calls in flight (what they held is lost with it).
        Returns the tickets that were queued, which never go out."""
        queued, self.queue[i] = self.queue[i], []
        self.inflight[i] = 0
        return queued

    def returned(self, i: int, latency: float) -> None:
        """A call of instance ``i`` came back after ``latency`` seconds: one fewer in flight, and (AIMD) the
        largest batch adapts. Sending what now may go is the caller's, once the round's returns are counted
        (:meth:`consider`)."""
        self.inflight[i] -= 1
        a = self.b.adaptive_ms
        if a is not None:
            if 1000.0 * latency <= a:
                self.limit[i] = min(float(self.b.size), self.limit[i] + 1.0)
            else:
                self.limit[i] = max(1.0, self.limit[i] * 0.9)

    def withdraw(self, i: int, ticket: int) -> bool:
        """Take ``ticket`` out of ``i``'s queue if it is still there (it never goes out)."""
        q = self.queue[i]
        try:
            q.remove(ticket)
        except ValueError:
            return False
        return True

    def waiting(self) -> int:
        return sum(len(q) for q in self.queue)


def check_batching(cfg, source: str) -> None:
    """The ``batch_*`` keys of a serving config; a ConfigError names the key and the range."""
    from util.errors import ConfigError

    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{source}: config key '{key}' {msg}")

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not 1 <= cfg.batch_size <= 65536:
        raise bad("batch_size", f"must be from 1 (no batching) to 65536 requests a call; got {cfg.batch_size}.")
    if not number(cfg.batch_wait_ms) or not 0 <= cfg.batch_wait_ms <= 60_000:
        raise bad("batch_wait_ms", f"must be from 0 to 60000 milliseconds (0: a batch goes as soon as its instance "
                  f"is free); got {cfg.batch_wait_ms!r}.")
    if not 1 <= cfg.batch_inflight <= 1024:
        raise bad("batch_inflight", f"must be from 1 to 1024 calls per instance; got {cfg.batch_inflight}.")
    a = cfg.batch_adaptive_ms
    if a is not None and (not number(a) or a <= 0):
        raise bad("batch_adaptive_ms", f"must be null (a fixed batch_size) or the call latency in milliseconds the "
                  f"batch size adapts to (> 0); got {a!r}.")
