"""Failure recovery, a part of the policy machine (:class:`serve.core.policy.PolicyMachine`), as the fixed plans
recover.

A lost request's query is rebuilt when its group can still reach ``need`` outputs (in hand, in flight or still
to be sent), and is otherwise sent again (with no injected delay) to a live F instance: the next after the failed
one (static routing, the one failover rule :func:`serve.core.plan.next_live`), or the routed one. A query with
copies is sent again when all its copies are lost. A group whose queries have no output of their own (an N-worker
code) sends every unanswered member again once it can no longer reach ``need``. Deferred requests of a group (or
a hedged copy) hit by a loss go out at once.
"""
from __future__ import annotations

import numpy as np

from serve.core.plan import ROLE_F
from serve.core.routing import LOST, OUTSTANDING, PLANNED
from util.errors import UserError


class Recovery:
    """The failure part of :class:`serve.core.policy.PolicyMachine`."""

    def lost(self, n: int, now: float) -> None:
        if self.state[n] == OUTSTANDING:
            self.leave(self.inst[n])
        elif self.state[n] != PLANNED:
            return
        self.state[n] = LOST
        failed = max(self.inst[n], 0)
        q = self.query_of(n)
        if self.is_retry(n):
            self.retry_of[q] = -1
            if not self.answers_of[q]:
                self.retry(q, failed, now)
            return
        if self.grouped:
            g = self.p_group[n]
            self.slot_lost[g][self.p_slot[n]] = True
            self.urgent[g] = True
            for row in self.parity_rows[g]:  # deferred parities go out now: the group needs them
                if self.state[row] == PLANNED and row in self.woken:
                    self.route_and_send(row, now)
            coming = sum(1 for row in self.rows[g] if self.state[row] in (PLANNED, OUTSTANDING)) + self.unmade[g]
            if self.count[g] + coming >= self.need_of(g):
                return  # the decoder will still get the outputs it needs
            for s, x in enumerate(self.members[g]):  # nworker: no member has an output of its own to wait for
                if x >= 0 and not self.answers_of[x] and (self.slot_lost[g][s] or self.nworker):
                    self.retry(x, failed, now)
            return
        if self.answers_of[q]:
            return
        if self.copied:
            others = [row for s, row in enumerate(self.copies[q]) if s != self.p_slot[n]]
            if any(self.state[row] == OUTSTANDING for row in others):
                return
            waiting = [row for row in others if self.state[row] == PLANNED]
            if waiting:
                for row in waiting:
                    if row in self.woken:  # a hedged copy waiting for its delay: it goes now
                        self.route_and_send(row, now)
                return
        self.retry(q, failed, now)

    def retry(self, q: int, failed: int, now: float) -> None:
        """Send query ``q`` again (no injected delay), once while that retry is in flight."""
        if self.retry_of[q] >= 0:
            return
        n = len(self.state)
        for name, value in (("p_query", q), ("p_group", -1), ("p_slot", 0), ("p_inst", -1), ("p_time", now),
                            ("p_delay", 0.0), ("p_factor", 1.0), ("retry_row", True), ("state", PLANNED),
                            ("inst", -1), ("sent", np.nan)):
            getattr(self, name).append(value)
        self.retry_query.append(q)
        self.retry_from.append(failed)
        if self.routing == "static":
            inst = self.next_live(ROLE_F, failed)
        else:
            inst = self.route(n)
        if inst < 0:
            self.state[n] = LOST
            give_up = getattr(self.driver, "unanswerable", None)
            if give_up is None:
                raise UserError("Every instance holding F has failed, so some queries cannot be answered. Fix: "
                                "fail fewer instances in 'failures'.")
            self.answer(q, np.inf, False)  # no answer will come: counted off, so nothing more waits for it
            give_up(q)
            return
        self.was_retried[q] = True
        self.retry_of[q] = n
        self.send(n, inst, now)
