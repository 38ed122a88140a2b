"""The dispatch core: answer each query from F's output or the decoder, whichever comes first.

Shared by the two frontends that put a trained code in front of Ray actors:
the benchmark (:class:`serve.runtime.Frontend`, which executes a plan made in
advance) and the HTTP service (:class:`serve.online.Service`, which sends
requests as clients make them). A driver decides only *when* a request goes
and *to which instance*; everything between "send this" and "this query's
answer is X" happens here, once:

* a coded group's parities are encoded once, from its k inputs
  (:meth:`Dispatcher.parity`); a group closed early holds blank inputs whose
  output (``pad_output``) counts as available at once;
* every output that lands answers its own query if that query is still
  unanswered, and the decoder rebuilds the group's missing outputs the moment
  k of the k + r are in hand; whatever comes later is dropped;
* a request whose instance died is recovered: by decoding, when enough of its
  group's outputs are still in flight or to come; else by sending the query
  again to the next live instance holding F (once while that retry is in flight).

Groups are formed k at a time in arrival order, closing at the k-th arrival or
``group_timeout_ms`` after the first: :func:`serve.plan.form_groups` applies
the rule to a whole stream at once (for plans and the simulator),
:class:`GroupFormer` to one arrival at a time (for the service); a test holds
them equal.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from serve.plan import ROLE_F
from util.errors import UserError


@dataclass(frozen=True)
class Request:
    """What one request to an instance carries, as the dispatcher sees it."""

    kind: str    # "plan": the strategy's own request; "retry": a query sent again after a failure
    query: int   # the query it answers, or -1 for a parity
    group: int   # coded: the query's or parity's group; else -1
    slot: int    # coded: position 0..k+r-1 in the group; replicate, backup: copy 0 or 1; else 0


class Group:
    """A coded group: its members' inputs, and the k + r outputs as they land."""

    def __init__(self, k: int, r: int, input_shape, n_out: int):
        self.members = [-1] * k
        self.x = torch.zeros(k, *input_shape)
        self.outputs = torch.zeros(k + r, n_out)
        self.have = torch.zeros(k + r, dtype=torch.bool)
        self.lost = np.zeros(k + r, dtype=bool)
        self.waiting: set = set()      # members not yet answered
        self.sealed = False            # membership final (pads filled)
        self.parities: Optional[torch.Tensor] = None
        self.parities_left = r         # parity payloads still to be handed out


class GroupFormer:
    """Groups of up to k queries, one arrival at a time, by :func:`serve.plan.form_groups`'s rule."""

    def __init__(self, k: int, timeout_s: float):
        self.k, self.timeout = k, timeout_s
        self.group = -1
        self.members: list[int] = []
        self.start = 0.0

    def add(self, query: int, t: float) -> tuple[int, int, list]:
        """Query ``query`` arrives at ``t``: ``(its group, its slot, [(group, members, close time)] closed)``."""
        closed = self.expire(t, strict=True)
        if not self.members:
            self.group += 1
            self.start = t
        self.members.append(query)
        group, slot = self.group, len(self.members) - 1
        if len(self.members) == self.k:
            closed.append((self.group, self.members, t))
            self.members = []
        return group, slot, closed

    def expire(self, t: float, strict: bool = False) -> list:
        """Close the open group if its timeout has passed by ``t`` (``strict``: an arrival exactly at
        the timeout still joins, as in form_groups)."""
        late = t > self.start + self.timeout if strict else t >= self.start + self.timeout
        if self.members and late:
            return [self.flush()]
        return []

    def flush(self) -> Optional[tuple[int, list, float]]:
        """Close the open group now, whatever its size (the end of a stream); None if none is open."""
        if not self.members:
            return None
        out = (self.group, self.members + [-1] * (self.k - len(self.members)), self.start + self.timeout)
        self.members = []
        return out


def next_live(instance: int, roles: list[int], dead: set) -> int:
    """``instance`` if live, else the next live instance of the same role cyclically after it; -1 if none."""
    if instance not in dead:
        return instance
    n = len(roles)
    for step in range(1, n):
        i = (instance + step) % n
        if roles[i] == roles[instance] and i not in dead:
            return i
    return -1


class Dispatcher:
    """The requests in flight and the answers of one strategy's queries; see the module docstring.

    ``on_answer(query, output, now, reconstructed, retried)`` is called exactly once per query;
    ``to_come(group)`` counts the requests of a group the driver will still send to live instances,
    ``copy_to_come(query)`` says whether another copy of a query will still be sent; ``watch(ref)``
    (optional) is told of every request sent, for drivers that wait by callback rather than ray.wait;
    ``unanswerable(query)`` is called when no live instance holds F to re-send a query to (default: stop
    with a UserError, as the benchmark does).
    """

    def __init__(self, strategy: str, roles: list[int], actors: list, code, pad_output: torch.Tensor,
                 input_shape, clock: Callable[[], float], on_answer: Callable,
                 to_come: Callable[[int], int] = lambda g: 0, copy_to_come: Callable[[int], bool] = lambda q: False,
                 watch: Optional[Callable] = None, log_requests: bool = True,
                 unanswerable: Optional[Callable[[int], None]] = None):
        import ray

        self.ray = ray
        self.strategy, self.roles, self.actors, self.code = strategy, roles, actors, code
        self.k, self.r = code.k, code.r
        self.pad = pad_output
        self.input_shape = tuple(input_shape)
        self.clock, self.on_answer, self.to_come, self.copy_to_come = clock, on_answer, to_come, copy_to_come
        self.watch = watch
        if unanswerable is not None:
            self.unanswerable = unanswerable
        self.open: dict = {}          # unanswered query -> its input (numpy), for retries
        self.group_of: dict = {}      # unanswered coded query -> its group
        self.groups: dict = {}        # group -> Group, until its members are answered and parities sent
        self.retried: set = set()     # unanswered queries sent again
        self.retrying: set = set()    # queries with a retry in flight
        self.pending: dict = {}       # ObjectRef -> (Request, instance, sent, delay, factor)
        self.dead: set = set()
        self.sent = 0
        self.cost = {"encode": 0.0, "dispatch": 0.0, "decode": 0.0}
        names = ("instance", "role", "sent", "done", "compute", "delay", "factor", "ok")
        self.req = {name: [] for name in names} if log_requests else None

    # -- queries and groups --------------------------------------------------------------------------
    def add_query(self, q: int, x: np.ndarray) -> None:
        self.open[q] = x

    def open_group(self, g: int) -> Group:
        grp = self.groups[g] = Group(self.k, self.r, self.input_shape, self.pad.shape[-1])
        return grp

    def join(self, g: int, slot: int, q: int, x) -> None:
        """Query ``q`` takes ``slot`` of group ``g`` (its input goes into the group's encoding)."""
        grp = self.groups[g]
        grp.members[slot] = q
        grp.x[slot] = torch.as_tensor(x)
        grp.waiting.add(q)
        self.group_of[q] = g

    def seal(self, g: int) -> None:
        """Group ``g`` has its members: the empty slots are blank inputs, whose outputs are known."""
        grp = self.groups[g]
        grp.sealed = True
        for s, q in enumerate(grp.members):
            if q < 0:
                grp.have[s] = True
                grp.outputs[s] = self.pad
        self._maybe_drop(g)

    def parity(self, g: int, j: int) -> np.ndarray:
        """Parity ``j`` of group ``g``; the group's k inputs are encoded once, at the first call."""
        grp = self.groups[g]
        if grp.parities is None:
            t = time.perf_counter()
            with torch.no_grad():
                grp.parities = self.code.encode(grp.x.unsqueeze(0))[0]
            self.cost["encode"] += time.perf_counter() - t
        out = grp.parities[j].numpy()
        grp.parities_left -= 1
        if grp.parities_left == 0:
            grp.parities = None
            self._maybe_drop(g)
        return out

    def _maybe_drop(self, g: int) -> None:
        grp = self.groups.get(g)
        if grp is not None and grp.sealed and not grp.waiting and grp.parities_left == 0:
            del self.groups[g]  # later outputs of this group answer nothing

    # -- sending and settling ------------------------------------------------------------------------
    def send(self, instance: int, x: np.ndarray, delay: float, factor: float, req: Request):
        t = time.perf_counter()
        ref = self.actors[instance].infer.remote(x, delay, factor)
        self.pending[ref] = (req, instance, self.clock(), delay, factor)
        self.sent += 1
        self.cost["dispatch"] += time.perf_counter() - t
        if self.watch is not None:
            self.watch(ref)
        return ref

    def settle(self, ref, now: float) -> None:
        """A request has finished (its ref is ready): answer from its output, or recover from its failure."""
        got = self.collect(ref, now)
        if got is None:
            return
        req, instance, output, ok, _ = got
        if ok:
            self.on_result(req, output, now)
        else:
            self.on_failure(req, instance)

    def collect(self, ref, now: float) -> Optional[tuple]:
        """Take a finished request off the books and log it: ``(request, instance, output, ok, cancelled)``,
        or None if it was not pending. ``cancelled``: a ``ray.cancel`` dropped it before it started (only a
        driver that cancels, :class:`serve.runtime.PolicyFrontend`, sees one)."""
        entry = self.pending.pop(ref, None)
        if entry is None:
            return None
        req, instance, sent, delay, factor = entry
        ray = self.ray
        cancelled = False
        try:
            output, compute = ray.get(ref)
            ok = True
        except ray.exceptions.TaskCancelledError:
            output, compute, ok, cancelled = None, float("nan"), False, True
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError):
            output, compute, ok = None, float("nan"), False
        if self.req is not None:
            for name, v in (("instance", instance), ("role", self.roles[instance]), ("sent", sent), ("done", now),
                            ("compute", compute), ("delay", delay), ("factor", factor), ("ok", ok)):
                self.req[name].append(v)
        return req, instance, output, ok, cancelled

    def kill(self, instance: int) -> None:
        """Fail-stop ``instance`` now; detected at once, so nothing more is sent there."""
        self.ray.kill(self.actors[instance], no_restart=True)
        self.dead.add(instance)

    # -- answering -------------------------------------------------------------------------------------
    def answer(self, q: int, output: torch.Tensor, now: float, reconstructed: bool) -> None:
        """Answer query ``q``; callers answer only open queries (a later output is dropped)."""
        del self.open[q]
        retried = q in self.retried
        self.retried.discard(q)
        g = self.group_of.pop(q, None)
        if g is not None and g in self.groups:
            self.groups[g].waiting.discard(q)
            self._maybe_drop(g)
        self.on_answer(q, output, now, reconstructed, retried)

    def try_decode(self, g: int, now: float) -> None:
        grp = self.groups[g]
        waiting = [s for s, q in enumerate(grp.members) if q >= 0 and q in self.open]
        if not waiting or int(grp.have.sum()) < self.k:
            return
        t = time.perf_counter()
        with torch.no_grad():
            recon = self.code.decode(grp.outputs.unsqueeze(0), grp.have.unsqueeze(0))[0]
        self.cost["decode"] += time.perf_counter() - t
        for s in waiting:
            self.answer(grp.members[s], recon[s], now, reconstructed=True)

    def on_result(self, req: Request, output: np.ndarray, now: float) -> None:
        out = torch.from_numpy(np.array(output))
        q = req.query
        if req.kind == "retry":
            self.retrying.discard(q)
            if q in self.open:
                self.answer(q, out, now, reconstructed=False)
            return
        if self.strategy != "coded":
            if q in self.open:  # replicate, backup: the first copy wins, the other is dropped
                self.answer(q, out, now, reconstructed=self.strategy == "backup" and req.slot == 1)
            return
        grp = self.groups.get(req.group)
        if grp is not None:
            grp.outputs[req.slot] = out
            grp.have[req.slot] = True
        if q >= 0 and q in self.open:
            self.answer(q, out, now, reconstructed=False)
        if req.group in self.groups:
            self.try_decode(req.group, now)

    def on_failure(self, req: Request, instance: int) -> None:
        """A request whose instance died (or, ``instance`` -1, had no live instance to go to)."""
        if instance >= 0:
            self.dead.add(instance)
        q = req.query
        if req.kind == "retry":
            self.retrying.discard(q)
            if q in self.open:
                self.retry(q, instance)
            return
        if self.strategy == "coded":
            grp = self.groups.get(req.group)
            if grp is None:
                return  # every member is answered
            grp.lost[req.slot] = True
            if int(grp.have.sum()) + self.in_flight(req.group) >= self.k:
                return  # the decoder will still get k outputs
            for s, member in enumerate(grp.members):  # the others' own outputs are still coming
                if member >= 0 and member in self.open and grp.lost[s]:
                    self.retry(member, max(instance, 0))
            return
        if q in self.open and not (self.strategy in ("replicate", "backup") and self.copy_in_flight(req)):
            self.retry(q, max(instance, 0))

    def in_flight(self, g: int) -> int:
        """Outputs of group ``g`` still to come: sent or to be sent, to an instance not dead."""
        count = sum(1 for req, a, *_ in self.pending.values()
                    if req.kind == "plan" and req.group == g and a not in self.dead)
        return count + self.to_come(g)

    def copy_in_flight(self, req: Request) -> bool:
        return any(other.kind == "plan" and other.query == req.query and other.slot != req.slot
                   and a not in self.dead for other, a, *_ in self.pending.values()) or self.copy_to_come(req.query)

    def retry(self, q: int, failed: int) -> None:
        """Send query ``q`` again, to the next live F instance after ``failed`` (no injected delay);
        once only while that retry is in flight."""
        if q in self.retrying:
            return
        n = len(self.roles)
        for step in range(1, n + 1):
            i = (failed + step) % n
            if self.roles[i] == ROLE_F and i not in self.dead:
                self.retried.add(q)
                self.retrying.add(q)
                self.send(i, self.open[q], 0.0, 1.0, Request("retry", q, -1, 0))
                return
        self.unanswerable(q)

    def unanswerable(self, q: int) -> None:
        raise UserError("Every instance holding F has failed, so some queries cannot be answered. Fix: fail "
                        "fewer instances in 'failures'.")
