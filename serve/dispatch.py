"""The answering core: payloads, encoding, decoding and answers of the requests sent to Ray actors.

Shared by the two frontends that put a trained code in front of Ray actors:
the benchmark (:class:`serve.runtime.Frontend`, which executes a plan made in
advance) and the HTTP service (:class:`serve.runtime.ServiceFrontend`, which
sends requests as clients make them). Every *decision* (which request goes
where and when, which are dropped, what answers a query, how a lost request
is recovered) is :class:`serve.policy.PolicyMachine`'s, the same state
machine the simulator runs; what is left here is the work those decisions
need, done once:

* a coded group's parities are encoded once, from its k inputs
  (:meth:`Dispatcher.coded_input`); a group closed early holds blank inputs whose
  output (``pad_output``) counts as available at once;
* an N-worker code's group (strategy ``nworker``, :class:`coders.nworker.NWorkerCode`)
  is encoded once into its N coded inputs, every one of which goes to an
  instance (blank padding included: it is mixed into them), and all k
  answers are decoded from the N - S outputs the policy says are in hand;
* a request goes to its actor (:meth:`Dispatcher.send`) and is logged when it
  comes back (:meth:`Dispatcher.collect`); a coded output is kept for the
  decoder (:meth:`Dispatcher.keep`);
* a query is answered from its own output or from the decoder's
  reconstruction (:meth:`Dispatcher.answer`, :meth:`Dispatcher.decode`), once.

Groups are formed k at a time in arrival order, closing at the k-th arrival or
``group_timeout_ms`` after the first: :func:`serve.plan.form_groups` applies
the rule to a whole stream at once (for plans and the simulator),
:class:`GroupFormer` to one arrival at a time (for the service); a test holds
them equal.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from serve.plan import code_layout, is_nworker


@contextlib.contextmanager
def one_thread():
    """Run the frontend's encoding or decoding of one group in one torch thread, then hand the count back: a group
    is a few small matrices, and an intra-op thread pool that waits for a busy core costs tens of milliseconds a
    call on a loaded machine (measured: 32 ms for a (9, 8) x (8, 784) product on two threads, 0.01 ms on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Request:
    """What one request to an instance carries, as the dispatcher sees it."""

    kind: str    # "plan": the strategy's own request; "retry": a query sent again after a failure
    query: int   # the query it answers, or -1 for a parity
    group: int   # coded: the query's or parity's group; else -1
    slot: int    # coded, nworker: position 0..k+r-1 in the group; replicate, backup: copy 0 or 1; else 0


class Group:
    """A coded group: its members' inputs, and the k + r outputs as they land (N = k + r for an N-worker code)."""

    def __init__(self, k: int, r: int, input_shape, n_out: int, coded_slots: int):
        self.members = [-1] * k
        self.x = torch.zeros(k, *input_shape)
        self.outputs = torch.zeros(k + r, n_out)
        self.have = torch.zeros(k + r, dtype=torch.bool)
        self.lost = np.zeros(k + r, dtype=bool)
        self.waiting: set = set()      # members not yet answered
        self.sealed = False            # membership final (pads filled)
        self.parities: Optional[torch.Tensor] = None  # the encoder's output: r parities, or N coded inputs
        self.parities_left = coded_slots  # coded payloads still to be handed out


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


class Dispatcher:
    """The payloads, requests in flight and answers of one strategy's queries; see the module docstring.

    ``on_answer(query, output, now, reconstructed, retried)`` is called exactly once per query; ``watch(ref)``
    (optional) is told of every request sent, for drivers that wait by callback rather than ray.wait.
    """

    def __init__(self, strategy: str, roles: list[int], actors: list, code, pad_output: torch.Tensor,
                 input_shape, clock: Callable[[], float], on_answer: Callable,
                 watch: Optional[Callable] = None, log_requests: bool = True):
        import ray

        self.ray = ray
        self.strategy, self.roles, self.actors, self.code = strategy, roles, actors, code
        self.k, self.r, _ = code_layout(code)
        # An N-worker code encodes every slot of a group (0..N-1); a systematic code its r parities (k..k+r-1).
        self.nworker = is_nworker(code)
        self.first_coded = 0 if self.nworker else self.k
        self.pad = pad_output
        self.input_shape = tuple(input_shape)
        self.clock, self.on_answer = clock, on_answer
        self.watch = watch
        self.open: dict = {}          # unanswered query -> its input (numpy), for its requests and retries
        self.group_of: dict = {}      # unanswered coded query -> its group
        self.groups: dict = {}        # group -> Group, until its members are answered and parities sent
        self.pending: dict = {}       # ObjectRef -> (Request, instance, sent, delay, factor)
        self.dead: set = set()
        self.sent = 0
        self.cost = {"encode": 0.0, "dispatch": 0.0, "decode": 0.0}
        names = ("instance", "role", "sent", "done", "compute", "delay", "factor", "ok", "cancelled")
        self.req = {name: [] for name in names} if log_requests else None

    # -- queries and groups --------------------------------------------------------------------------
    def add_query(self, q: int, x: np.ndarray) -> None:
        self.open[q] = x

    def open_group(self, g: int) -> Group:
        grp = self.groups[g] = Group(self.k, self.r, self.input_shape, self.pad.shape[-1],
                                     self.k + self.r - self.first_coded)
        return grp

    def join(self, g: int, slot: int, q: int, x) -> None:
        """Query ``q`` takes ``slot`` of group ``g`` (its input goes into the group's encoding)."""
        grp = self.groups[g]
        grp.members[slot] = q
        grp.x[slot] = torch.as_tensor(x)
        grp.waiting.add(q)
        self.group_of[q] = g

    def seal(self, g: int) -> None:
        """Group ``g`` has its members: the empty slots are blank inputs, whose outputs are known (a systematic
        code's; an N-worker code mixes them into its coded inputs)."""
        grp = self.groups[g]
        grp.sealed = True
        for s, q in enumerate(grp.members):
            if q < 0 and not self.nworker:
                grp.have[s] = True
                grp.outputs[s] = self.pad
        self._maybe_drop(g)

    def coded_input(self, g: int, slot: int) -> np.ndarray:
        """The payload of coded ``slot`` of group ``g``: parity ``slot - k`` of a systematic code, coded input
        ``slot`` of an N-worker code. The group's k inputs are encoded once (the code's own ``encode``), at the
        first call."""
        grp = self.groups[g]
        if grp.parities is None:
            t = time.perf_counter()
            with torch.no_grad(), one_thread():
                grp.parities = self.code.encode(grp.x.unsqueeze(0))[0]
            self.cost["encode"] += time.perf_counter() - t
        out = grp.parities[slot - self.first_coded].numpy()
        grp.parities_left -= 1
        if grp.parities_left == 0:
            grp.parities = None
            self._maybe_drop(g)
        return out

    def forget(self, g: int) -> None:
        """Group ``g`` will send no more parities (a policy dropped them): free it once its members are answered."""
        grp = self.groups.get(g)
        if grp is not None:
            grp.parities_left, grp.parities = 0, None
            self._maybe_drop(g)

    def _maybe_drop(self, g: int) -> None:
        grp = self.groups.get(g)
        if grp is not None and grp.sealed and not grp.waiting and grp.parities_left == 0:
            del self.groups[g]  # later outputs of this group answer nothing

    # -- sending and collecting ----------------------------------------------------------------------
    def send(self, instance: int, x: np.ndarray, delay: float, factor: float, req: Request):
        t = time.perf_counter()
        ref = self.actors[instance].infer.remote(x, delay, factor)
        self.pending[ref] = (req, instance, self.clock(), delay, factor)
        self.sent += 1
        self.cost["dispatch"] += time.perf_counter() - t
        if self.watch is not None:
            self.watch(ref)
        return ref

    def collect(self, ref, now: float) -> Optional[tuple]:
        """Take a finished request off the books and log it: ``(request, instance, output, ok, cancelled)``,
        or None if it was not pending. ``ok`` False: its actor died; ``cancelled``: a ``ray.cancel`` dropped it
        before it started."""
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
        if not ok and not cancelled:
            self.dead.add(instance)
        if self.req is not None:
            for name, v in (("instance", instance), ("role", self.roles[instance]), ("sent", sent), ("done", now),
                            ("compute", compute), ("delay", delay), ("factor", factor), ("ok", ok),
                            ("cancelled", cancelled)):
                self.req[name].append(v)
        return req, instance, output, ok, cancelled

    def keep(self, req: Request, output) -> torch.Tensor:
        """A landed output as a tensor; a coded group's is kept for its decoder."""
        out = torch.from_numpy(np.array(output))
        grp = self.groups.get(req.group) if req.kind == "plan" and req.group >= 0 else None
        if grp is not None:
            grp.outputs[req.slot] = out
            grp.have[req.slot] = True
        return out

    def kill(self, instance: int) -> None:
        """Fail-stop ``instance`` now; detected at once, so nothing more is sent there."""
        self.ray.kill(self.actors[instance], no_restart=True)
        self.dead.add(instance)

    # -- answering -------------------------------------------------------------------------------------
    def answer(self, q: int, output: torch.Tensor, now: float, reconstructed: bool, retried: bool = False) -> None:
        """Answer query ``q``; callers answer only open queries (a later output is dropped)."""
        del self.open[q]
        g = self.group_of.pop(q, None)
        if g is not None and g in self.groups:
            self.groups[g].waiting.discard(q)
            self._maybe_drop(g)
        self.on_answer(q, output, now, reconstructed, retried)

    def decode(self, g: int, queries: list, available, now: float, retried=lambda q: False) -> None:
        """Answer ``queries`` of group ``g`` by the decoder, from the outputs ``available`` ((k + r,) bool): the
        code's own ``decode``, which zeroes the outputs not available whatever they hold."""
        grp = self.groups[g]
        grp.have = torch.as_tensor(np.asarray(available, dtype=bool))
        waiting = {int(q) for q in queries}
        if {q for q in grp.members if q >= 0 and q in self.open} != waiting:
            raise RuntimeError(f"group {g}: the policy and the answering core disagree on which queries wait")
        t = time.perf_counter()
        with torch.no_grad(), one_thread():
            recon = self.code.decode(grp.outputs.unsqueeze(0), grp.have.unsqueeze(0))[0]
        self.cost["decode"] += time.perf_counter() - t
        for s, q in enumerate(list(grp.members)):
            if q in waiting:
                self.answer(q, recon[s], now, reconstructed=True, retried=retried(q))
