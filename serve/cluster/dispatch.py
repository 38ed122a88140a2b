"""The answering core: payloads, encoding, decoding and answers of the requests sent to Ray actors.

Shared by the two frontends that put a trained code in front of Ray actors:
the benchmark (:class:`serve.cluster.runtime.Frontend`, which executes a plan made in
advance) and the HTTP service (:class:`serve.cluster.runtime.ServiceFrontend`, which
sends requests as clients make them). Every *decision* (which request goes
where and when, which are dropped, what answers a query, how a lost request
is recovered) is :class:`serve.core.policy.PolicyMachine`'s, the same state
machine the simulator runs; what is left here is the work those decisions
need, done once:

* a coded group's parities are encoded once, from its k inputs
  (:meth:`Dispatcher.coded_input`); a group closed early holds blank inputs whose
  output (``pad_output``) counts as available at once;
* an N-worker code's group (strategy ``nworker``, :class:`coders.nworker.NWorkerCode`)
  is encoded once into its N coded inputs, every one of which goes to an
  instance (blank padding included: it is mixed into them), and all k
  answers are decoded from the N - S outputs the policy says are in hand;
* a request joins its instance's batcher (:meth:`Dispatcher.send`,
  :mod:`serve.core.batching`), goes out in one call with the others of its batch
  (their inputs stacked, the coded slots of every group in it encoded at
  once), and is logged when the call comes back (:meth:`Dispatcher.collect`);
  a coded output is kept for the decoder (:meth:`Dispatcher.keep`);
* a query is answered from its own output or from the decoder's
  reconstruction (:meth:`Dispatcher.answer`, :meth:`Dispatcher.decode`), once;
  the groups decided in one round of returned calls are decoded in one call.

Groups are formed k at a time in arrival order, closing at the k-th arrival or
``group_timeout_ms`` after the first: :func:`serve.core.plan.form_groups` applies
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

from serve.core.batching import Batchers, Batching
from serve.core.plan import code_layout, is_nworker


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
        # numpy, not torch: a row written per landed output costs a tenth of a tensor's indexed write
        self.x = np.zeros((k, *input_shape), dtype=np.float32)
        self.outputs = np.zeros((k + r, n_out), dtype=np.float32)
        self.have = np.zeros(k + r, dtype=bool)
        self.lost = np.zeros(k + r, dtype=bool)
        self.waiting: set = set()      # members not yet answered
        self.sealed = False            # membership final (pads filled)
        self.parities: Optional[np.ndarray] = None  # the encoder's output: r parities, or N coded inputs
        self.parities_left = coded_slots  # coded payloads still to be handed out


class GroupFormer:
    """Groups of up to k queries, one arrival at a time, by :func:`serve.core.plan.form_groups`'s rule."""

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

    ``on_answer(query, output, now, reconstructed, retried)`` is called exactly once per query (``output``: a
    numpy row); ``watch(ref)`` (optional) is told of every call sent, for drivers that wait by callback rather
    than ray.wait. Requests go out in batches (``batching``, :mod:`serve.core.batching`); ``schedule(t, fn)`` (the driver's) calls ``fn()`` at
    clock time ``t``, for a batch's wait; ``soon`` (optional) gathers the requests made in one turn of the
    driver (:class:`serve.core.batching.Batchers`). A driver calls :meth:`end_round` after reporting returned
    calls.
    """

    def __init__(self, strategy: str, roles: list[int], actors: list, code, pad_output: torch.Tensor,
                 input_shape, clock: Callable[[], float], on_answer: Callable,
                 watch: Optional[Callable] = None, log_requests: bool = True, batching: Batching = Batching(),
                 schedule: Optional[Callable] = None, soon: Optional[Callable] = None):
        import ray

        self.ray = ray
        self.strategy, self.roles, self.actors, self.code = strategy, roles, actors, code
        self.k, self.r, _ = code_layout(code)
        # An N-worker code encodes every slot of a group (0..N-1); a systematic code its r parities (k..k+r-1).
        self.nworker = is_nworker(code)
        self.first_coded = 0 if self.nworker else self.k
        self.pad = pad_output
        self.pad_row = np.asarray(pad_output, dtype=np.float32)
        self.input_shape = tuple(input_shape)
        self.clock, self.on_answer = clock, on_answer
        self.watch = watch
        self.open: dict = {}          # unanswered query -> its input (numpy), for its requests and retries
        self.group_of: dict = {}      # unanswered coded query -> its group
        self.groups: dict = {}        # group -> Group, until its members are answered and parities sent
        self.tickets: dict = {}       # request ticket -> [Request, instance, sent, delay, factor, input or None]
        self.pending: dict = {}       # ObjectRef of a call in flight -> (instance, its tickets, sent)
        self.call_of: dict = {}       # ticket in flight -> its call's ObjectRef
        self.withdrawn: dict = {}     # call -> the tickets it carries that were withdrawn
        self.decodes: list = []       # decodings decided and not yet run (flush_decodes)
        self.unencoded: set = set()   # groups with a coded slot in a batcher, not encoded yet
        self.batchers = Batchers(len(actors), batching, self._call, schedule, clock, soon)
        self.next_ticket = 0
        self.dead: set = set()
        self.sent = 0
        self.calls = 0
        self.cost = {"encode": 0.0, "dispatch": 0.0, "decode": 0.0}
        names = ("instance", "role", "sent", "done", "compute", "delay", "factor", "ok", "cancelled", "batch")
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
        grp.x[slot] = x.numpy() if isinstance(x, torch.Tensor) else x
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
                grp.outputs[s] = self.pad_row
        self._maybe_drop(g)

    def coded_input(self, g: int, slot: int) -> np.ndarray:
        """The payload of coded ``slot`` of group ``g``: parity ``slot - k`` of a systematic code, coded input
        ``slot`` of an N-worker code. The group's k inputs are encoded once (the code's own ``encode``), at the
        first call."""
        grp = self.groups.get(g)
        if grp is None:  # a policy forgot the group (all answered) while this slot waited in a batcher
            return np.zeros(self.input_shape, dtype=np.float32)
        if grp.parities is None:
            self.encode_groups([g])
        out = grp.parities[slot - self.first_coded]
        grp.parities_left -= 1
        if grp.parities_left == 0:
            grp.parities = None
            self._maybe_drop(g)
        return out

    def encode_groups(self, groups) -> None:
        """Encode every group of ``groups`` that still has coded slots to hand out, in one call of the code's own
        ``encode`` over the stacked groups."""
        todo = [g for g in groups if g in self.groups and self.groups[g].parities is None
                and self.groups[g].parities_left > 0]
        if not todo:
            return
        t = time.perf_counter()
        with torch.no_grad(), one_thread():
            coded = self.code.encode(torch.from_numpy(np.stack([self.groups[g].x for g in todo]))).numpy()
        for g, p in zip(todo, coded):
            self.groups[g].parities = p
        self.cost["encode"] += time.perf_counter() - t

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
    def send(self, instance: int, x: Optional[np.ndarray], delay: float, factor: float, req: Request) -> int:
        """Queue a request for ``instance`` (``x`` None: a coded slot, encoded when its call goes out); its
        batcher sends it (:mod:`serve.core.batching`). Returns the request's ticket."""
        cost = self.cost
        t, encoded, dispatched = time.perf_counter(), cost["encode"], cost["dispatch"]
        now = self.clock()  # one read: the request's sent time is its batcher's arrival time
        ticket = self.next_ticket
        self.next_ticket += 1
        self.tickets[ticket] = [req, instance, now, delay, factor, x]
        if x is None:
            self.unencoded.add(req.group)
        self.sent += 1
        self.batchers.add(instance, ticket, now)  # the calls it sends time themselves; counted once here
        cost["dispatch"] = dispatched + time.perf_counter() - t - (cost["encode"] - encoded)
        return ticket

    def _call(self, instance: int, tickets: list) -> None:
        """One call to ``instance`` carrying ``tickets``: their inputs stacked, coded slots encoded (every group
        of the batch at once), the largest delay and factor among them."""
        start, encoded = time.perf_counter(), self.cost["encode"]
        entries = [self.tickets[t] for t in tickets]
        if self.unencoded and any(e[5] is None for e in entries):
            # every group with a coded slot waiting in any batcher, in one call: under load the encoder runs over
            # hundreds of groups at once rather than a batch's few (each has its members, so encoding is final)
            todo, self.unencoded = self.unencoded, set()
            self.encode_groups(todo)
        xs = [e[5] if e[5] is not None else self.coded_input(e[0].group, e[0].slot) for e in entries]
        delay, factor = max(e[3] for e in entries), max(e[4] for e in entries)
        for e in entries:
            e[5] = None  # the payload has gone; the output will come back
        ref = self.actors[instance].infer_batch.remote(np.stack(xs), delay, factor)
        self.pending[ref] = (instance, tickets, self.clock())
        for t in tickets:
            self.call_of[t] = ref
        self.calls += 1
        if self.watch is not None:
            self.watch(ref)
        self.cost["dispatch"] += time.perf_counter() - start - (self.cost["encode"] - encoded)

    def withdraw(self, ticket: int) -> bool:
        """Cancel a request: True when it was still in its batcher's queue (it never goes out, logged as
        cancelled); else False, and its call is cancelled with ``ray.cancel`` once every request it carries is
        withdrawn (Ray drops a call the actor has not started; one started runs on and its outputs come back)."""
        entry = self.tickets.get(ticket)
        if entry is None:
            return False
        if self.batchers.withdraw(entry[1], ticket):
            del self.tickets[ticket]
            self._log([entry], self.clock(), float("nan"), False, True)
            return True
        ref = self.call_of.get(ticket)
        if ref is not None and ref in self.pending:
            marked = self.withdrawn.setdefault(ref, set())
            marked.add(ticket)
            if len(marked) == len(self.pending[ref][1]):
                self.ray.cancel(ref)
        return False

    def collect(self, ref, now: float, reply=None) -> list:
        """Take a finished call off the books and log its requests: ``[(ticket, request, instance, output, ok,
        cancelled)]``, empty if it was not pending. ``ok`` False: its actor died; ``cancelled``: a ``ray.cancel``
        dropped it before it started. ``reply``: the ref's done future (``ObjectRef.future()``), whose value Ray's
        thread has already fetched; None: ``ray.get``."""
        call = self.pending.pop(ref, None)
        if call is None:
            return []
        instance, tickets, sent = call
        self.withdrawn.pop(ref, None)
        ray = self.ray
        outputs, cancelled = None, False
        try:
            outputs, compute = ray.get(ref) if reply is None else reply.result()
            ok = True
        except ray.exceptions.TaskCancelledError:
            compute, ok, cancelled = float("nan"), False, True
        except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError):
            compute, ok = float("nan"), False
        if not ok and not cancelled:
            self.dead.add(instance)
        self.batchers.returned(instance, now - sent)
        call_of, pop = self.call_of, self.tickets.pop
        entries = [pop(t) for t in tickets]
        for t in tickets:
            call_of.pop(t, None)
        self._log(entries, now, compute / len(tickets), ok, cancelled)
        if not ok:
            return [(t, e[0], instance, None, False, cancelled) for t, e in zip(tickets, entries)]
        rows = np.array(outputs, dtype=np.float32)  # one copy a call (Ray's arrays are read-only)
        return [(t, e[0], instance, row, True, False) for t, e, row in zip(tickets, entries, rows)]

    def _log(self, entries: list, now: float, compute: float, ok: bool, cancelled: bool) -> None:
        """The rows of the requests of one call (or one withdrawn request), appended column by column: the call's
        compute is shared evenly among the requests it carried."""
        if self.req is None:
            return
        n, req = len(entries), self.req
        instance = entries[0][1]
        for name, v in (("instance", instance), ("role", self.roles[instance]), ("done", now), ("compute", compute),
                        ("ok", ok), ("cancelled", cancelled), ("batch", n)):
            req[name].extend([v] * n)
        for name, j in (("sent", 2), ("delay", 3), ("factor", 4)):
            req[name].extend([e[j] for e in entries])

    def end_round(self, now: float) -> None:
        """After the driver has reported a round of returned calls: decode what was decided, in one call for
        every group, then send what the batchers now let go."""
        self.flush_decodes()
        for i, q in enumerate(self.batchers.queue):
            if q:
                self.batchers.consider(i, now)

    def keep(self, req: Request, output: np.ndarray) -> np.ndarray:
        """A landed output (a row of its call's outputs, :meth:`collect`); a coded group's is kept for its
        decoder."""
        out = output
        grp = self.groups.get(req.group) if req.kind == "plan" and req.group >= 0 else None
        if grp is not None:
            grp.outputs[req.slot] = out
            grp.have[req.slot] = True
        return out

    def kill(self, instance: int) -> None:
        """Fail-stop ``instance`` now; detected at once, so nothing more is sent there. What waits in its batcher
        goes to the dead actor, and is lost like everything it held."""
        self.ray.kill(self.actors[instance], no_restart=True)
        self.dead.add(instance)
        self.batchers.drain(instance, self.clock())

    # -- answering -------------------------------------------------------------------------------------
    def answer(self, q: int, output: np.ndarray, now: float, reconstructed: bool, retried: bool = False) -> None:
        """Answer query ``q``; callers answer only open queries (a later output is dropped)."""
        del self.open[q]
        g = self.group_of.pop(q, None)
        if g is not None and g in self.groups:
            self.groups[g].waiting.discard(q)
            self._maybe_drop(g)
        self.on_answer(q, output, now, reconstructed, retried)

    def decode(self, g: int, queries: list, available, now: float, retried=lambda q: False) -> None:
        """Answer ``queries`` of group ``g`` by the decoder, from the outputs ``available`` ((k + r,) bool): the
        code's own ``decode``, which zeroes the outputs not available whatever they hold. The decoding waits for
        the end of the round (:meth:`end_round`), to run in one call with every other group decided in it."""
        grp = self.groups[g]
        mask = np.array(available, dtype=bool)  # a copy of what was in hand at the decision
        grp.have = mask.copy()  # an output landing later in this round marks grp.have, never the decision's mask
        waiting = [int(q) for q in queries]
        if {q for q in grp.members if q >= 0 and q in self.open} != set(waiting):
            raise RuntimeError(f"group {g}: the policy and the answering core disagree on which queries wait")
        self.decodes.append((g, set(waiting), mask, now, {q: retried(q) for q in waiting}))

    def flush_decodes(self) -> None:
        """Run the decodings decided since the last flush as one call of the code's ``decode``, then answer."""
        if not self.decodes:
            return
        todo, self.decodes = self.decodes, []
        t = time.perf_counter()
        with torch.no_grad(), one_thread():
            outputs = torch.from_numpy(np.stack([self.groups[g].outputs for g, *_ in todo]))
            masks = torch.from_numpy(np.stack([mask for _, _, mask, _, _ in todo]))
            recon = (self.code.decode_groups(outputs, masks, [g for g, *_ in todo]) if self.nworker
                     else self.code.decode(outputs, masks)).numpy()
        self.cost["decode"] += time.perf_counter() - t
        for (g, waiting, _, now, retried), rows in zip(todo, recon):
            for s, q in enumerate(list(self.groups[g].members)):
                if q in waiting:
                    self.answer(q, rows[s], now, reconstructed=True, retried=retried[q])
