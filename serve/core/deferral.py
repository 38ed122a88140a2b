"""Deferral and cancellation, parts of the policy machine (:class:`serve.core.policy.PolicyMachine`): which
redundant requests wait, and which are dropped.

* **Deferral.** A group's parities (a strategy that ``hedges`` "parities") wait ``d`` after the group closes
  and go out only if a member is still unanswered then; a second copy (``hedges`` "copy") waits ``d`` after
  arrival (a hedged request). ``d`` is fixed, or the percentile of the last ``window`` latencies of first
  requests (data requests, first copies), no delay until 50 are in. A failure in the group (or of the first
  copy) sends the deferred requests at once (:mod:`serve.core.recovery`).
* **Cancellation.** Once every member of a group is answered, its requests still queued (parities, and data
  requests of rebuilt queries) are dropped; once a query with copies is answered its other copies still queued
  are dropped; a deferred request whose reason is gone is never sent. A request already started runs on (an
  instance cannot be interrupted).
"""
from __future__ import annotations

import numpy as np

from serve.core.routing import OUTSTANDING, PLANNED, SKIPPED

WARM_SAMPLES = 50  # latencies needed before a percentile deferral delays anything


class Deferral:
    """The deferral and cancellation part of :class:`serve.core.policy.PolicyMachine`."""

    def held(self, n: int) -> bool:
        """Whether due request ``n`` is dropped (its reason gone) or waits (deferred) instead of going now."""
        hedges = self.kind.hedges
        if hedges == "parities" and self.p_query[n] < 0:
            g = self.p_group[n]
            if self.unanswered[g] == 0 and (self.cancel_on or self.defer is not None):
                self.skip(n)
                return True
            if self.defer is not None and n not in self.woken and not self.urgent[g]:
                self.woken.add(n)
                d = self.defer_s()
                if d > 0:
                    self.driver.wake(n, self.closed[g] + d)
                    return True
        elif hedges == "copy" and self.p_slot[n] == 1:
            q = self.p_query[n]
            if self.answers_of[q] and (self.cancel_on or self.defer is not None):
                self.skip(n)
                return True
            if self.defer is not None and n not in self.woken:
                self.woken.add(n)
                first = self.copies[q][0]
                d = self.defer_s()
                if d > 0 and self.state[first] in (PLANNED, OUTSTANDING):
                    self.driver.wake(n, self.p_time[n] + d)
                    return True
        return False

    def defer_s(self) -> float:
        d = self.defer
        if "ms" in d:
            return d["ms"] / 1000.0
        return self.delay_now

    def record_latency(self, seconds: float) -> None:
        if self.defer is None or "ms" in self.defer:
            return
        w = len(self.window)
        self.window[self.samples % w] = seconds
        self.samples += 1
        if self.samples >= min(WARM_SAMPLES, w) and self.samples % max(1, w // 20) == 0:
            self.delay_now = float(np.percentile(self.window[:min(self.samples, w)], self.defer["percentile"]))

    def after_answer(self, q: int) -> None:
        """With cancellation: drop what the answer made useless, if it has not started."""
        if not self.cancel_on:
            return
        if self.retry_of[q] >= 0:
            self.driver.cancel(self.retry_of[q])
        if self.copied:
            for row in self.copies[q]:
                if row >= 0 and self.state[row] == OUTSTANDING:
                    self.driver.cancel(row)
        elif self.grouped:
            g = self.group_list[q]
            if self.unanswered[g] == 0:
                for row in self.rows[g]:
                    if self.state[row] == OUTSTANDING:
                        self.driver.cancel(row)

    def skip(self, n: int) -> None:
        self.state[n] = SKIPPED
