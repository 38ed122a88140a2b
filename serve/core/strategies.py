"""Serving strategies as objects: one class per strategy, registered by name, the one place names live.

A *strategy* is the fixed layout a query is served with. Every part of serving asks its object rather than
comparing names: the plans (:mod:`serve.core.plan`: instance roles, each request's instance, the requests a
query makes), the limits checked before any work (:mod:`serve.core.limits`: instances, requests per query,
memory, load), the config's checks (:mod:`serve.core.config`: which names exist, which may be a ``policies``
row, which need a backup model), the policy machine (:mod:`serve.core.policy`: copies, groups, who answers),
the simulator (its array fast path, its answers and predictions), the Ray and HTTP frontends, and the map.

A new strategy is one subclass of :class:`Strategy` (or of :class:`Grouped` for a code) plus
``register(MyStrategy())``; docs/extending.md shows one served by the simulator. The built-in ones, in
registration order (which is also each one's seed index, so the draws of every plan stay as they were):

* ``none``: m instances hold F; query q goes to q mod m; its own output answers it.
* ``equal-resources``: the coded strategy's m + r ceil(m/k) instances, all F, balanced round robin.
* ``replicate``: 2m F instances; query q goes to 2q and 2q + 1 (mod 2m), the first copy answers.
* ``coded``: m F instances for data, r ceil(m/k) for parities; a query is answered by its own output or by
  decoding its group once k of its k + r outputs are in.
* ``backup``: m F instances and r ceil(m/k) backup-model ones; copy 0 to F, copy 1 to the backup model,
  the first answers (the backup's approximately).
* ``nworker``: an N-worker code (docs/nworker.md): every instance holds F, a group's N = k + r coded inputs go
  out at its close, and all k answers are decoded once N - S outputs are in (no query has an output of its own).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from coders.form import form_of
from util.errors import ConfigError

ROLE_F = -1  # role of an instance holding F; parity instances hold role j >= 0
ROLE_BACKUP = -2  # role of an instance holding the backup model (strategy "backup")


def is_nworker(code) -> bool:
    """Whether a loaded code is an N-worker code (answers decoded from N - S coded outputs, none F's own): its
    form (:mod:`coders.form`) codes every slot of a group."""
    return form_of(code).all_coded


class Strategy:
    """A strategy that sends ``copies`` requests per query (no groups), each answered by its own output.

    Subclasses set the class attributes and override the methods whose answer differs."""

    name = ""                 # what configs write in 'strategies' (and 'app.strategy', 'policies[].strategy')
    label = ""                # a short name for the map's heatmap cells (default: the name)
    answers = "its own output"  # how a query is answered, in words (docs, messages)
    default = False           # one of the strategies a config without 'strategies' compares
    grouped = False           # requests form groups of k queries, decoded from ``need`` of their k + r outputs
                              # (the code's: k for a systematic code, N - S for an N-worker one; Plan.need)
    copies = 1                # requests per query when not grouped (the first answer wins)
    own_outputs = True        # a request carries one query, whose output answers it (False: only decoding does)
    approximate_copy = False  # the last copy is a cheaper model's approximate answer (its answer is "rebuilt")
    needs_backup = False      # loads the config's 'backup_model' beside the code
    hedges = None             # what a policy's 'defer' delays: "parities", "copy", or None (nothing redundant)
    shared_pool = False       # a policy's pool "shared" applies (parities that go through F)
    policy_rows = True        # may be a 'policies' row (routing, cancellation, deferral)
    fixed_only = ""           # why it may not be a 'policies' row, when it is a reason of its own
    array_path = True         # the simulator's array fast path runs its fixed layout (else the event loop)
    equal_cost = False        # a row of the map's equal-cost comparison
    map_coded = False         # the map's coded side (the others are what coding is compared against)

    # -- instances -----------------------------------------------------------------------------------
    def counts(self, m: int, k: int, r: int) -> tuple[int, int, int, int]:
        """``(all, F, parity, backup)`` instances for m data instances and a code of k data, r parities."""
        return m * self.copies, m * self.copies, 0, 0

    def roles(self, m: int, k: int, r: int, pool: str = "split") -> list[int]:
        """The role of each instance: ROLE_F, j for parity j, or ROLE_BACKUP (``pool`` "shared": all F)."""
        total, num_f, parity, backup = self.counts(m, k, r)
        if pool == "shared" and self.shared_pool:
            return [ROLE_F] * total
        per = math.ceil(m / k)
        return [ROLE_F] * num_f + [j for j in range(r) for _ in range(per)][:parity] + [ROLE_BACKUP] * backup

    def map_instances(self, m: int, budget: int) -> int:
        """The m it is given in a cell of the map, whose strategies share a budget of B instances."""
        return m

    # -- requests ------------------------------------------------------------------------------------
    def requests(self, arrival: np.ndarray, k: int, r: int, groups=None):
        """Every request of the queries arriving at ``arrival``: ``(time, query, group, slot, members, closed)``,
        not yet ordered; ``groups``: ``(members (G, k), close times (G,))`` of a grouped strategy
        (:func:`serve.core.plan.form_groups`), else None (and members, closed are None)."""
        n, c = len(arrival), self.copies
        return (np.repeat(arrival, c), np.repeat(np.arange(n), c), np.full(c * n, -1), np.tile(np.arange(c), n),
                None, None)

    def route(self, m: int, k: int, r: int, query, slot, group):
        """The instance each request goes to before any failure (arrays or scalars): ``query`` -1 for a parity,
        ``slot`` the coded position or the copy, ``group`` the coded group."""
        query, slot = np.asarray(query), np.asarray(slot)
        return (self.copies * query + slot) % self.counts(m, k, r)[0]

    def request_role(self, query: int, slot: int, k: int) -> int:
        """The role of the instances a (non-retry) request may go to."""
        return ROLE_F if query >= 0 else slot - k

    # -- load and memory -----------------------------------------------------------------------------
    def requests_per_query(self, k: int, r: int) -> float:
        return float(self.copies)

    def request_bound(self, n: int, k: int, r: int) -> tuple[float, float]:
        """Upper bounds of ``(requests, parity requests)`` that ``n`` queries make, for the memory estimate."""
        return n * self.requests_per_query(k, r), 0.0

    def load(self, rate: float, work_s: float, k: int, r: int, num_instances: int, num_f: int) -> float:
        """The busiest kind of instance's load: arrival rate x work per request x requests per query /
        instances."""
        return rate * work_s * self.requests_per_query(k, r) / num_instances

    # -- what it serves ------------------------------------------------------------------------------
    def check_code(self, code, run: str, engine: str, key: str) -> None:
        """Stop with a ConfigError naming ``key`` if it cannot serve ``code`` (a loaded code of run ``run``)."""

    def __repr__(self) -> str:
        return f"<strategy {self.name!r}>"


class Grouped(Strategy):
    """A coded strategy: groups of k queries (closed by the k-th or after ``group_timeout_ms``), k data slots
    and r parities each, on m data instances and r ceil(m/k) parity instances (group g's parity j to the
    (g mod ceil(m/k))-th instance of role j); a group decodes once ``need`` of its k + r outputs are in."""

    grouped = True
    answers = "its own output, or decoding its group once k of its k + r outputs are in"

    def counts(self, m, k, r):
        p = r * math.ceil(m / k)
        return m + p, m, p, 0

    def coded_inputs(self, members: np.ndarray, closed: np.ndarray, arrival: np.ndarray, k: int):
        """``(group, slot, query, time)`` of the data slots' requests: each query goes out on arrival."""
        data_g, data_slot = np.nonzero(members >= 0)
        data_q = members[data_g, data_slot]
        return data_g, data_slot, data_q, arrival[data_q]

    def requests(self, arrival, k, r, groups=None):
        members, closed = groups
        g = len(closed)
        data_g, data_slot, data_q, arrive = self.coded_inputs(members, closed, arrival, k)
        # Parities go out when the group closes (the encoder needs all k inputs).
        par_g, par_j = np.repeat(np.arange(g), r), np.tile(np.arange(r), g)
        return (np.concatenate([arrive, closed[par_g]]), np.concatenate([data_q, np.full(len(par_g), -1)]),
                np.concatenate([data_g, par_g]), np.concatenate([data_slot, k + par_j]), members, closed)

    def route(self, m, k, r, query, slot, group):
        query, slot, group = np.asarray(query), np.asarray(slot), np.asarray(group)
        per = math.ceil(m / k)
        return np.where(query >= 0, query % m, m + (slot - k) * per + group % per)

    def requests_per_query(self, k, r):
        return 1.0 + r / k


def _registry_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


class _Names(Sequence):
    """The registered strategies' names, in registration order, read live (a strategy registered later is
    in it): ``serve.core.config.STRATEGIES``."""

    def __getitem__(self, i):
        return _registry_names()[i]

    def __len__(self) -> int:
        return len(REGISTRY)

    def __eq__(self, other) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, _Names)) else other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(tuple(self))


REGISTRY: dict[str, Strategy] = {}
NAMES = _Names()


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` under its ``name`` (a name already taken is refused); returns it."""
    if not strategy.name or strategy.name in REGISTRY:
        raise ValueError(f"a strategy needs a name of its own; got {strategy.name!r} (registered: "
                         f"{', '.join(REGISTRY)})")
    strategy.label = strategy.label or strategy.name
    REGISTRY[strategy.name] = strategy
    return strategy


def get(name) -> Strategy:
    """The strategy registered as ``name`` (a Strategy is returned as it is)."""
    if isinstance(name, Strategy):
        return name
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; registered: {', '.join(REGISTRY)}") from None


def seed_index(name: str) -> int:
    """A strategy's position in the registry, which seeds its draws (one past the last for an unknown name)."""
    return list(REGISTRY).index(name) if name in REGISTRY else len(REGISTRY)


def default_names() -> tuple[str, ...]:
    """The strategies a config without 'strategies' compares."""
    return tuple(s.name for s in REGISTRY.values() if s.default)


def needs_backup(names) -> bool:
    """Whether one of the strategies ``names`` loads the config's 'backup_model'."""
    return any(get(name).needs_backup for name in names)


def policy_names() -> tuple[str, ...]:
    """The strategies a 'policies' row may name."""
    return tuple(s.name for s in REGISTRY.values() if s.policy_rows)


# -- the built-in strategies ---------------------------------------------------------------------------------
class NoRedundancy(Strategy):
    name, default = "none", True


class EqualResources(Strategy):
    name, label, default, equal_cost = "equal-resources", "eq", True, True

    def counts(self, m, k, r):
        total = m + r * math.ceil(m / k)
        return total, total, 0, 0


class Replicate(Strategy):
    name, label, default, equal_cost = "replicate", "rep", True, True
    copies, hedges = 2, "copy"
    answers = "the first of its two copies"

    def map_instances(self, m, budget):
        return max(budget // 2, 1)


class Coded(Grouped):
    name, label, default, equal_cost, map_coded = "coded", "cod", True, True, True
    hedges, shared_pool = "parities", True

    def request_bound(self, n, k, r):
        return float(n), float(n * r)  # up to r parities per query (groups of one)

    def check_code(self, code, run, engine, key):
        if is_nworker(code):
            raise ConfigError(f"Config key '{key}': strategy \"{self.name}\" serves a systematic code (k data + r "
                              f"parities, data outputs answered as they are), but run '{run}' is an N-worker code "
                              f"(K = {code.k}, N = {code.n_workers}, S = {code.stragglers}). Fix: serve it with "
                              f"\"{NWorker.name}\", or name a systematic run folder in 'runs'.")


class Backup(Strategy):
    name, copies, approximate_copy, needs_backup, policy_rows = "backup", 2, True, True, False
    answers = "the first of its copy on F and its copy on the backup model (that one approximately)"

    def counts(self, m, k, r):
        p = r * math.ceil(m / k)
        return m + p, m, 0, p

    def route(self, m, k, r, query, slot, group):  # copy 0 to F instance q mod m, copy 1 to backup q mod p
        query, slot = np.asarray(query), np.asarray(slot)
        return np.where(slot == 0, query % m, m + query % (self.counts(m, k, r)[0] - m))

    def request_role(self, query, slot, k):
        return ROLE_BACKUP if slot == 1 else ROLE_F

    def load(self, rate, work_s, k, r, num_instances, num_f):
        return rate * work_s / num_f  # F instances are the busiest: the backup model is cheaper


class NWorker(Grouped):
    name, own_outputs, policy_rows = "nworker", False, False
    answers = "decoding its group once N - S of its N coded outputs are in"
    fixed_only = ("runs with its fixed layout only: a group's N coded inputs all go out when it closes, so there "
                  "is nothing to route by queue, cancel or defer yet")

    def counts(self, m, k, r):
        total = m + r * math.ceil(m / k)
        return total, total, 0, 0

    def coded_inputs(self, members, closed, arrival, k):
        g = len(closed)  # k coded inputs in the data positions (padded groups too), sent at the close
        data_g = np.repeat(np.arange(g), k)
        return data_g, np.tile(np.arange(k), g), np.full(g * k, -1), closed[data_g]

    def route(self, m, k, r, query, slot, group):
        slot, group = np.asarray(slot), np.asarray(group)  # coded input s < k of group g as query g k + s would go
        per = math.ceil(m / k)
        return np.where(slot < k, (group * k + slot) % m, m + (slot - k) * per + group % per)

    def request_bound(self, n, k, r):
        return float(n * (k + r)), 0.0  # k + r requests per group, up to n groups (closed by their timeout)

    def check_code(self, code, run, engine, key):
        if not is_nworker(code) and engine != "sim":
            raise ConfigError(f"Config key '{key}': strategy \"{self.name}\" on Ray serves the answers of an "
                              f"N-worker code, but run '{run}' is a systematic code (k = {code.k}, r = {code.r}), "
                              f"which has no N-worker encoder and decoder. Fix: name a run trained with \"form\": "
                              f"\"nworker\" (docs/nworker.md) in 'runs'" +
                              (", or serve another strategy." if key.startswith("app.")
                               else f", or set \"engine\": \"sim\" to time the N-worker layout alone, or drop "
                                    f"\"{self.name}\"."))


for _cls in (NoRedundancy, EqualResources, Replicate, Coded, Backup, NWorker):
    register(_cls())
