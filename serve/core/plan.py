"""What a strategy does with a seeded stream of queries, decided before anything runs.

A :class:`Plan` lists every request a strategy sends: when (dispatch time),
to which instance, for which query or parity, with which injected delay and
slow-down factor. Arrivals, groups, routing, delays and slow periods all
follow from the config's seed and the queries' arrival times alone, never
from wall-clock timing, so the Ray runtime (``serve/cluster/runtime.py``) and the
simulator execute the very same plan and a seed reproduces it exactly.

Instances of a strategy, numbered as the config's ``instances`` lists refer
to them (m = ``instances``, p = r * ceil(m / k) parity instances), as each
strategy's class in :mod:`serve.core.strategies` lays them out and routes:

* ``none``: 0..m-1 hold F; query q goes to instance q mod m (round robin).
* ``equal-resources``: 0..m+p-1 hold F, the coded strategy's instance count
  spent on load balancing; query q goes to q mod (m + p).
* ``replicate``: 0..2m-1 hold F; query q goes to 2q mod 2m and 2q+1 mod 2m,
  the first answer wins.
* ``backup``: 0..m-1 hold F, m..m+p-1 a cheaper backup model (config key
  ``backup_model``); query q goes to F instance q mod m and to backup
  instance m + (q mod p), the first answer wins (the backup's is approximate).
* ``coded``: 0..m-1 hold F for the data queries (q mod m); instances
  m + j*ceil(m/k) .. m + (j+1)*ceil(m/k) - 1 serve parity j (F itself, or
  parity model j), group g's parity j going to the (g mod ceil(m/k))-th.
* ``nworker``: the literature's N-worker form (docs/nworker.md): every instance
  holds F, laid out as ``coded``'s (coded input s < k of group g to instance
  (g k + s) mod m, coded input k + j as parity j); all N = k + r coded inputs
  of a group go out when it closes (each mixes all k queries), and all k
  answers are decoded once ``need`` = N - S outputs are in. For an N-worker run
  (:func:`code_layout`) k = K, r = N - K and need = N - S; for a systematic
  run (simulator only, latency alone) N = k + r and S = r, so need = k.

Queries form groups of k in arrival order: a group closes when its k-th
query arrives or ``group_timeout_ms`` after its first, whichever is first;
a group closed early is padded with blank (all-zero) inputs whose outputs
the frontend knows in advance, so they count as available at once.
An instance that has failed gets no more requests: a request that would go
to it goes to the next live instance of the same role (:func:`next_live`, the
one failover rule).

A plan made for a policy (``policies`` in the config, :mod:`serve.core.policy`)
keeps the same requests, but its times and instances are the earliest moment
and the fixed-layout choice only: a dynamic policy picks each instance when it
sends, defers or drops requests, so the plan also carries what those choices
need (the delay a request gets on any instance, the slow periods).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from coders.form import form_of
from serve.core.config import PolicyConfig, ServeConfig, read_latency_file  # noqa: F401
from serve.core.strategies import ROLE_BACKUP, ROLE_F, is_nworker  # noqa: F401  (plan's names since they began)
from serve.core.strategies import get as strategy_of
from util.errors import ConfigError
from util.latency import sample_ms

def code_layout(code) -> tuple[int, int, int]:
    """``(k, r, need)`` of a loaded code as plans lay it out, as its form (:mod:`coders.form`) says: a systematic
    code has k data and r parity slots per group and decodes from any k outputs; an N-worker code has K queries,
    N = K + r coded slots, and decodes from N - S."""
    return form_of(code).layout(code)


def parity_per_model(m: int, k: int) -> int:
    return math.ceil(m / k)


def pool_roles(strategy, m: int, k: int, r: int, pool: str = "split") -> list[int]:
    """The role of each instance of ``strategy`` (a name or a :class:`serve.core.strategies.Strategy`): ROLE_F,
    j for parity j, or ROLE_BACKUP (``pool`` "shared": all F where it applies)."""
    return strategy_of(strategy).roles(m, k, r, pool)


def route(strategy, m: int, k: int, r: int, query, slot, group):
    """The instance each request goes to before any failure (arrays or scalars), as the strategy lays it out:
    ``query`` is -1 for a parity, ``slot`` the coded position or the copy, ``group`` the coded group."""
    return strategy_of(strategy).route(m, k, r, query, slot, group)


@dataclass
class Queries:
    """The seeded query stream of one setting, shared by every strategy."""

    arrival: np.ndarray     # (N,) seconds from the start, ascending
    index: np.ndarray       # (N,) which image of the split each query sends
    label: np.ndarray       # (N,) that image's label


@dataclass
class Plan:
    """Every request of one strategy; request arrays are ordered by dispatch time."""

    strategy: str
    k: int
    r: int
    roles: list[int]                # per instance
    queries: Queries
    # per request
    time: np.ndarray                # dispatch time (s)
    instance: np.ndarray            # target instance
    query: np.ndarray               # query number, or -1 for a parity
    group: np.ndarray               # group number (coded), else -1
    slot: np.ndarray                # coded: position 0..k+r-1 in the group; replicate, backup: copy 0/1; else 0
    delay: np.ndarray               # injected delay (s)
    factor: np.ndarray              # slow-down factor (>= 1)
    # per group (coded only): members (G, k), -1 where padded; close time (G,)
    members: Optional[np.ndarray] = None
    closed: Optional[np.ndarray] = None
    failures: dict = field(default_factory=dict)  # instance -> failure time (s)
    policy: Optional[PolicyConfig] = None  # how requests are routed, cancelled, deferred (None: the fixed layout)
    delay_any: Optional[np.ndarray] = None  # per request: its injected delay on an instance the model covers (s)
    delay_instances: Optional[list] = None  # the delay model's "instances" (None: every instance)
    slowdown: Optional[dict] = None         # the config's slow periods, drawn per period by slow_table()
    seed: int = 0
    need: Optional[int] = None              # outputs a group needs before it decodes (None: k); N - S for nworker
    deadline_s: Optional[float] = None      # nworker: decode from what arrived by close + this (serve/core/workers.py)
    fewest: Optional[int] = None            # nworker with a deadline: the decoder's minimum answering count

    def __post_init__(self):
        if self.need is None:
            self.need = self.k

    @property
    def dynamic(self) -> bool:
        """Whether the policy decides anything while it runs (else the plan is executed as it stands)."""
        p = self.policy
        return p is not None and (p.routing != "static" or p.cancel or p.defer is not None or p.pool != "split")

    @property
    def num_instances(self) -> int:
        return len(self.roles)

    def __len__(self) -> int:
        return len(self.time)


def streams(seed: int):
    """Independent generators for the parts of a plan, so adding one part never shifts another."""
    names = ("arrivals", "images", "delays", "slowdown", "retries")
    return {name: np.random.default_rng([seed, i]) for i, name in enumerate(names)}


def make_queries(cfg: ServeConfig, rate: float, labels: np.ndarray) -> Queries:
    """Poisson arrivals at ``rate`` and a seeded draw of images (each image once before any repeats)."""
    rng = streams(cfg.seed)
    n = cfg.num_queries
    arrival = np.cumsum(rng["arrivals"].exponential(1.0 / rate, n))
    order = np.concatenate([rng["images"].permutation(len(labels)) for _ in range(math.ceil(n / len(labels)))])[:n]
    return Queries(arrival, order, labels[order])


def form_groups(arrival: np.ndarray, k: int, timeout_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Groups of up to k consecutive queries: ``(members (G, k) padded with -1, close times (G,))``."""
    n = len(arrival)
    limit = np.searchsorted(arrival, arrival + timeout_s, side="right")  # first query too late for i's group
    # The group starting at query i ends before nxt[i] = min(i + k, limit[i]); groups start at
    # 0, nxt[0], nxt[nxt[0]], ... That orbit is found by doubling: jump holds nxt applied 2**j
    # times, and each round appends the next len(starts) starts at once (n is a sink).
    jump = np.append(np.minimum(np.arange(n) + k, limit), n)
    starts = np.zeros(1, dtype=np.int64)
    while starts[-1] < n:
        starts = np.concatenate([starts, jump[starts]])
        jump = jump[jump]
    starts = starts[starts < n]
    ends = np.append(starts[1:], n)[:len(starts)]
    members = starts[:, None] + np.arange(k)[None, :]
    members = np.where(members < ends[:, None], members, -1)
    full = ends - starts == k
    closed = np.where(full, arrival[np.maximum(ends - 1, 0)], arrival[starts] + timeout_s)
    return members, closed


def sample_delays(delay: dict, instance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Injected delay (s) per request to ``instance``, from the config's delay model (util/latency.py)."""
    return sample_ms(delay, instance, rng) / 1000.0


def slow_table(seed: int, slowdown: dict, n_periods: int, num_instances: int) -> np.ndarray:
    """(n_periods, instances): whether each instance is slow in each period. Drawn row by row from one
    stream, so a longer table starts with the rows of a shorter one."""
    return streams(seed)["slowdown"].random((n_periods, max(num_instances, 1))) < slowdown["fraction"]


def slow_factors(cfg: ServeConfig, instance: np.ndarray, time: np.ndarray, num_instances: int) -> np.ndarray:
    """The slow-down factor of each request: ``factor`` when its instance is in a slow period."""
    if cfg.slowdown is None:
        return np.ones(len(instance))
    s = cfg.slowdown
    period = s["period_ms"] / 1000.0
    n_periods = int(time.max() // period) + 1 if len(time) else 1
    slow = slow_table(cfg.seed, s, n_periods, num_instances)
    return np.where(slow[(time // period).astype(int), instance], float(s["factor"]), 1.0)


def next_live(roles, fail_at, role, after, t) -> np.ndarray:
    """The failover rule, the one every part of serving follows (the plans' :func:`reroute`, the policy
    machine's static routing and retries, the simulator's retries): for each (instance ``after``, time ``t``),
    the first instance of ``role`` cyclically after ``after`` (``after`` itself last) still live at ``t``, i.e.
    whose failure time in ``fail_at`` (inf: never; -inf: already down) is later than ``t``; -1 where none is.
    ``role``, ``after`` and ``t`` are arrays of one length, or scalars."""
    roles, fail_at = np.asarray(roles), np.asarray(fail_at, dtype=float)
    after, t = np.atleast_1d(after).astype(int), np.atleast_1d(np.asarray(t, dtype=float))
    role = np.broadcast_to(np.asarray(role), after.shape)
    t = np.broadcast_to(t, after.shape)
    out = np.full(len(after), -1)
    for a, ro in set(zip(after.tolist(), role.tolist())):
        # Candidates: the instances of the role, cyclically after a. A request at time t goes to the first one
        # still live at t, i.e. the first whose running maximum of failure times exceeds t.
        same = np.nonzero(roles == ro)[0]
        if len(same) == 0:
            continue
        start = int(np.searchsorted(same, a, side="right"))
        cand = same[(start + np.arange(len(same))) % len(same)]
        reach = np.maximum.accumulate(fail_at[cand])
        rows = np.nonzero((after == a) & (role == ro))[0]
        pick = np.searchsorted(reach, t[rows], side="right")
        out[rows] = np.where(pick < len(cand), cand[np.minimum(pick, len(cand) - 1)], -1)
    return out


def reroute(instance: np.ndarray, time: np.ndarray, roles: list[int], failures: dict) -> np.ndarray:
    """Send each request whose instance has failed by its dispatch time to the next live one of the same role
    (:func:`next_live`; -1: no live instance of its role, the request is never sent)."""
    if not failures:
        return instance
    instance = instance.copy()
    fail_at = np.full(len(roles), np.inf)
    for i, t in failures.items():
        fail_at[i] = t
    moved = np.nonzero(time >= fail_at[instance])[0]
    if len(moved):
        instance[moved] = next_live(roles, fail_at, np.asarray(roles)[instance[moved]], instance[moved], time[moved])
    return instance


def check_failed_instances(cfg: ServeConfig, k: int, r: int, strategies: Sequence[str], run: str = "") -> None:
    """Stop with a ConfigError naming the key if a failure names an instance that one of
    ``strategies`` lacks at this k and r (``run``: the run folder, for the message)."""
    m = cfg.instances
    for strategy in strategies:
        size = len(pool_roles(strategy, m, k, r))
        for f in cfg.failures:
            if f["instance"] >= size:
                where = f" for run '{run}'" if run else ""
                smallest = min(len(pool_roles(s, m, k, r)) for s in cfg.strategies)
                raise ConfigError(f"Config key 'failures': instance {f['instance']} does not exist under strategy "
                                  f"'{strategy}'{where} (k={k}, r={r}), which has {size} instances (0..{size - 1}). "
                                  f"Fix: name an instance below {smallest}, or drop that strategy.")


def check_code_fits(code, strategies: Sequence[str], run: str, engine: str, key: str = "strategies") -> None:
    """Stop with a ConfigError naming ``key`` if one of ``strategies`` cannot serve the run's code (each asks its
    :meth:`serve.core.strategies.Strategy.check_code`: ``coded`` needs a systematic code, ``nworker`` on Ray an
    N-worker run; the rest serve either form), or if an N-worker run has N < K, which cannot be laid out."""
    form_of(code).check_servable(code, run)
    for strategy in strategies:
        strategy_of(strategy).check_code(code, run, engine, key)


def build_plan(cfg: ServeConfig, strategy, k: int, r: int, queries: Queries, delay: dict,
               strategy_index: int = 0, need: Optional[int] = None) -> Plan:
    """The requests of ``strategy`` (a name, or a :class:`serve.core.config.PolicyConfig`) for ``queries``; see the
    module docstring for the routing. ``need``: the outputs a group decodes from (default k; the third value of
    :func:`code_layout`)."""
    policy = strategy if isinstance(strategy, PolicyConfig) else None
    strategy = policy.strategy if policy else strategy
    way = strategy_of(strategy)
    m = cfg.instances
    roles = way.roles(m, k, r, policy.pool if policy else "split")
    check_failed_instances(cfg, k, r, [strategy])
    failures = {f["instance"]: f["at_ms"] / 1000.0 for f in cfg.failures}
    groups = form_groups(queries.arrival, k, cfg.group_timeout_ms / 1000.0) if way.grouped else None
    time, query, group, slot, members, closed = way.requests(queries.arrival, k, r, groups)
    order = np.argsort(time, kind="stable")
    time, query, group, slot = time[order], query[order], group[order], slot[order]
    inst = way.route(m, k, r, query, slot, group)
    inst = reroute(inst, time, roles, failures)
    rng = np.random.default_rng([cfg.seed, 2, strategy_index])
    # The instance filter draws nothing, so the delay on any instance comes from the same draws.
    delay_any = sample_delays({**delay, "instances": None}, inst, rng)
    delays = delay_any if delay.get("instances") is None else np.where(np.isin(inst, delay["instances"]),
                                                                       delay_any, 0.0)
    factor = slow_factors(cfg, inst, time, len(roles))
    return Plan(strategy, k, r, roles, queries, time, inst, query, group, slot, delays, factor,
                members, closed, failures, policy, delay_any, delay.get("instances"), cfg.slowdown, cfg.seed, need)
