"""Routing, the policy machine's first part (:class:`serve.core.policy.PolicyMachine`): which instance each request
goes to, and the outstanding counts it decides by.

* ``static``: the plan's fixed instance (the strategy's layout), or, when that one has failed, the next live
  instance of its role (the one failover rule, :func:`serve.core.plan.next_live`).
* ``jsq``: the live instance with the fewest outstanding requests (sent, not yet answered, as the frontend
  counts them), ties broken round robin;
* ``p2c``: the one with fewer of two live instances drawn at random.

Either dynamic routing avoids an instance that already holds a request of the same group (coded) or query
(copies) when another is free of one, so redundant requests never queue behind each other. The candidates are the
instances of the request's role (:meth:`serve.core.strategies.Strategy.request_role`): with ``pool`` "shared" (a
code whose parities go through F) every instance serves data and parities; with "split" the data instances
balance among themselves and parity j's among themselves.
"""
from __future__ import annotations

from serve.core.plan import ROLE_F, next_live, slow_table

PLANNED, OUTSTANDING, DONE, LOST, CANCELLED, SKIPPED = range(6)  # a request's states


class Routing:
    """The routing part of :class:`serve.core.policy.PolicyMachine` (its state is made there)."""

    def role_of(self, n: int) -> int:
        if self.all_f or self.is_retry(n):
            return ROLE_F  # a retry, or any request when every instance holds F
        return self.kind.request_role(self.p_query[n], self.p_slot[n], self.k)

    def route_and_send(self, n: int, now: float) -> None:
        inst = self.route(n)
        if inst < 0:  # no live instance of its role: lost at dispatch, recovered like any loss
            self.lost(n, now)
            return
        self.send(n, inst, now)

    def route(self, n: int) -> int:
        role = self.role_of(n)
        if self.routing == "static":
            planned = self.p_inst[n]
            if planned >= 0 and not self.dead[planned]:
                return planned
            return self.next_live(role, planned if planned >= 0 else 0)
        busy = self.holders(n)
        if self.routing == "p2c":
            live = self.live.get(role, [])
            free = [i for i in live if i not in busy] if busy else live
            free = free or live
            if len(free) <= 2:
                return min(free, key=self.outstanding.__getitem__) if free else -1
            if not self.coins:
                self.coins = self.rng.random(8192).tolist()
            a = int(self.coins.pop() * len(free))
            b = int(self.coins.pop() * (len(free) - 1))
            b += b >= a
            a, b = free[a], free[b]
            return a if self.outstanding[a] <= self.outstanding[b] else b
        fallback = -1
        for level in self.levels.get(role, []):  # jsq: the first live instance of the lowest count
            for i in level:
                if i not in busy:
                    return i
                if fallback < 0:
                    fallback = i
            if fallback >= 0 and not busy:
                break
        return fallback

    def holders(self, n: int) -> list:
        """Instances holding an outstanding request of n's group (coded) or query (copies)."""
        if self.is_retry(n):
            return []
        if self.grouped:
            rows = self.rows[self.p_group[n]]
        elif self.copied:
            rows = self.copies[self.p_query[n]]
        else:
            return []
        return [self.inst[row] for row in rows if row >= 0 and self.state[row] == OUTSTANDING]

    def join(self, i: int) -> None:
        c = self.outstanding[i]
        self.outstanding[i] = c + 1
        if not self.dead[i]:
            levels = self.levels[self.roles[i]]
            levels[c].discard(i)
            if len(levels) <= c + 1:
                levels.append(set())
            levels[c + 1].add(i)

    def leave(self, i: int) -> None:
        c = self.outstanding[i]
        self.outstanding[i] = c - 1
        if not self.dead[i]:
            levels = self.levels[self.roles[i]]
            levels[c].discard(i)
            levels[c - 1].add(i)

    def next_live(self, role: int, after: int) -> int:
        """The next live instance of ``role`` after ``after`` (:func:`serve.core.plan.next_live`; ``fail_at`` holds
        -inf for an instance down, inf for one live), or -1."""
        return int(next_live(self.roles, self.fail_at, role, after, 0.0)[0])

    def send(self, n: int, inst: int, now: float) -> None:
        if self.is_retry(n):
            delay, factor = 0.0, 1.0
        else:
            delay = self.p_delay[n]
            if self.delay_set is not None and inst not in self.delay_set:
                delay = 0.0
            factor = self.p_factor[n]  # the plan's, where the plan sends it; else the slow periods' at ``now``
            if inst != self.p_inst[n] or n in self.woken or factor != factor:  # NaN: a row added while serving
                factor = self.factor_at(inst, now)
        self.state[n] = OUTSTANDING
        self.inst[n] = inst
        self.sent[n] = now
        self.join(inst)
        self.driver.send(n, inst, delay, factor)

    def factor_at(self, inst: int, now: float) -> float:
        s = self.plan.slowdown
        if s is None:
            return 1.0
        period = int(now // (s["period_ms"] / 1000.0))
        if self.slow is None or period >= len(self.slow):
            self.slow = slow_table(self.plan.seed, s, max(2 * period + 1, 16), self.num)
        return float(s["factor"]) if self.slow[period, inst] else 1.0

