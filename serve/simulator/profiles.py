"""The simulator's service times: profiles that a Ray run measures (``profile.csv``), the fit of a call's
compute to a + b x batch, and the draws of compute and response overhead per request (:class:`ServiceModel`).
See serve/simulator/simulate.py's docstring and docs/simulator.md."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from serve.core.config import ServeConfig
from serve.core.plan import sample_delays
from util.errors import ConfigError
from util.files import atomic_write_text

PROFILE_COLUMNS = ["role", "actor", "compute_ms", "overhead_ms"]
BATCH_COLUMN = "batch"  # requests in the call a row's request went in (a profile without it: every call held one)


# -- service times ------------------------------------------------------------------------------------
def role_positions(roles: list[int]) -> np.ndarray:
    """Each instance's position among the instances of its role: the actor it is in the Ray pool."""
    roles_arr = np.asarray(roles)
    pos = np.zeros(len(roles), dtype=int)
    for role in np.unique(roles_arr):
        idx = np.nonzero(roles_arr == role)[0]
        pos[idx] = np.arange(len(idx))
    return pos


def read_profile(path: str) -> dict:
    """A profile CSV as arrays: role, actor, compute_ms, overhead_ms (NaN where not measured)."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or any(c not in rows[0] for c in PROFILE_COLUMNS):
            raise ValueError(f"needs the columns {', '.join(PROFILE_COLUMNS)} and at least one row")
        out = {c: np.array([float(row[c]) if row[c] != "" else np.nan for row in rows]) for c in PROFILE_COLUMNS}
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"Config key 'profile': '{path}' could not be read as a service profile ({exc}). Fix: "
                          f"name the profile.csv that a run with \"engine\": \"ray\" wrote under out_dir/<setting>/.") \
            from None
    compute = out["compute_ms"]
    if np.all(np.isnan(compute)) or np.any(compute[~np.isnan(compute)] < 0):
        raise ConfigError(f"Config key 'profile': '{path}' holds no non-negative compute_ms values.")
    batch = np.array([float(row.get(BATCH_COLUMN) or 1) for row in rows])
    if np.any(~np.isfinite(batch) | (batch < 1)):
        raise ConfigError(f"Config key 'profile': '{path}' has a batch value below 1; rewrite it with a ray run.")
    out[BATCH_COLUMN] = batch
    ok = ~np.isnan(compute)
    out["a_ms"], out["b_ms"] = fit_batch_cost(batch[ok], compute[ok])
    # Each row's compute as the call of one request it stands for: its call's time, scaled back to batch 1.
    out["compute_ms"] = compute * batch * batch_scale(out["a_ms"], out["b_ms"], 1) / \
        batch_scale(out["a_ms"], out["b_ms"], batch)
    return out


def fit_batch_cost(batch: np.ndarray, compute_ms: np.ndarray) -> tuple[float, float]:
    """``(a, b)`` in milliseconds with a call of n requests taking a + b x n, fitted by least squares to a
    profile's rows (``compute_ms``: each request's share of its call, ``batch``: the call's n). A call of n
    appears as n rows, so each row weighs 1/n: every call counts once. With fewer than two batch sizes there is
    nothing to fit: a = the mean call time, b = 0 (a call costs the same whatever it carries)."""
    batch, call = np.asarray(batch, float), np.asarray(compute_ms, float) * np.asarray(batch, float)
    if len(np.unique(batch)) < 2:
        return (float(call.mean()) if len(call) else 0.0), 0.0
    w = 1.0 / batch
    x_mean, y_mean = np.average(batch, weights=w), np.average(call, weights=w)
    b = float(np.average((batch - x_mean) * (call - y_mean), weights=w) / np.average((batch - x_mean) ** 2, weights=w))
    a = y_mean - b * x_mean
    if a <= 0 or b < 0:  # noise past the physics: keep the straight line's mean through a non-negative cost
        a, b = max(a, 1e-9), max(b, 0.0)
    return float(a), float(b)


def batch_scale(a: float, b: float, n):
    """A call of ``n`` requests' time relative to a call of one: (a + b n) / (a + b); 1 without a cost."""
    return (a + b * np.asarray(n, float)) / (a + b) if a + b > 0 else np.ones_like(np.asarray(n, float))


class SortedPool:
    """Measured values grouped by an integer pool key (NaN values left out), sorted once so that each draw is two
    binary searches: the simulator draws per request sent, and a profile holds thousands of rows."""

    def __init__(self, pool_keys: np.ndarray, values: np.ndarray):
        ok = ~np.isnan(values)
        pool_keys, values = pool_keys[ok], values[ok]
        order = np.argsort(pool_keys, kind="stable")
        self.keys, self.values = pool_keys[order], values[order]
        keys, first, count = np.unique(self.keys, return_index=True, return_counts=True)
        self.ranges = {int(k): (int(f), int(c)) for k, f, c in zip(keys, first, count)}
        self.value_list = self.values.tolist()

    def draw_one(self, key: int, u: float, fallback: list) -> float:
        """:meth:`draw` for one key, given its uniform draw ``u``: the same value, without arrays."""
        own = self.ranges.get(key)
        if own is not None:
            return self.value_list[min(own[0] + int(u * own[1]), len(self.value_list) - 1)]
        return fallback[int(u * len(fallback))] if fallback else 0.0

    def draw(self, keys: np.ndarray, rng: np.random.Generator, fallback: np.ndarray) -> np.ndarray:
        """For each entry of ``keys``, a random value of its pool; keys with no pool draw from ``fallback``."""
        pool_keys, values = self.keys, self.values
        lo = np.searchsorted(pool_keys, keys, side="left")
        hi = np.searchsorted(pool_keys, keys, side="right")
        u = rng.random(len(keys))
        own = values[np.minimum(lo + (u * (hi - lo)).astype(np.int64), max(len(values) - 1, 0))] if len(values) \
            else np.zeros(len(keys))
        other = fallback[(u * len(fallback)).astype(np.int64)] if len(fallback) else np.zeros(len(keys))
        return np.where(hi > lo, own, other)


def draw_from_pools(keys: np.ndarray, pool_keys: np.ndarray, values: np.ndarray, rng: np.random.Generator,
                    fallback: np.ndarray) -> np.ndarray:
    """For each entry of ``keys``, a random value among ``values`` whose pool key matches; keys with no
    measured value draw from ``fallback``."""
    return SortedPool(pool_keys, values).draw(keys, rng, fallback)


class ServiceModel:
    """Compute time and response overhead (seconds) of requests to given instances."""

    def __init__(self, cfg: ServeConfig, roles: list[int]):
        self.cfg = cfg
        self.roles = np.asarray(roles)
        self.profile = read_profile(cfg.profile) if cfg.profile else None
        if self.profile is not None:
            pos = role_positions(roles)
            width = int(max(pos.max(), self.profile["actor"].max())) + 1
            self.width = width
            self.inst_key = (self.roles + 1) * width + pos        # (role, actor) as one integer
            self.prof_key = (self.profile["role"].astype(int) + 1) * width + self.profile["actor"].astype(int)

    def scale(self, n: int) -> float:
        """A call of ``n`` requests' compute over a call of one's: the profile's fitted (a + b n) / (a + b); 1
        without a profile (the ``service`` distribution gives a call's time whatever it carries)."""
        if self.profile is None or n == 1:
            return 1.0
        return float(batch_scale(self.profile["a_ms"], self.profile["b_ms"], n))

    def draw(self, instance: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.profile is None:
            return sample_delays(self.cfg.service, instance, rng), np.zeros(len(instance))
        if not hasattr(self, "pools"):
            self.pools = {column: self.column_pools(column) for column in ("compute_ms", "overhead_ms")}
        keys = self.inst_key[instance]
        out = []
        for column in ("compute_ms", "overhead_ms"):
            by_role, by_actor, fallback, measured, _ = self.pools[column]
            # An actor missing from the profile draws from its role, a role missing from every row.
            role_draw = by_role.draw(self.roles[instance], rng, fallback)
            drawn = by_actor.draw(keys, rng, fallback)
            out.append(np.where(np.isin(keys, measured), drawn, role_draw) / 1000.0)
        return out[0], out[1]

    def draw_one(self, instance: int, rng: np.random.Generator) -> tuple[float, float]:
        """:meth:`draw` for one instance with a profile (the same draws from ``rng``), at Python speed: the
        simulator's event loop draws at every request it sends."""
        if not hasattr(self, "pools"):
            self.pools = {column: self.column_pools(column) for column in ("compute_ms", "overhead_ms")}
        key, role = int(self.inst_key[instance]), int(self.roles[instance])
        out = []
        for column in ("compute_ms", "overhead_ms"):
            by_role, by_actor, _, _, fallback = self.pools[column]
            role_draw = by_role.draw_one(role, rng.random(), fallback)
            actor_draw = by_actor.draw_one(key, rng.random(), fallback)
            out.append((actor_draw if key in by_actor.ranges else role_draw) / 1000.0)
        return out[0], out[1]

    def column_pools(self, column: str) -> tuple:
        """A profile column's values pooled by role and by (role, actor), the measured values, the actors with
        any, and the measured values as a list: sorted once, drawn from at every request."""
        p = self.profile
        values = p[column]
        measured = values[~np.isnan(values)]
        return (SortedPool(p["role"].astype(int), values), SortedPool(self.prof_key, values), measured,
                np.unique(self.prof_key[~np.isnan(values)]), measured.tolist())


# -- profiles measured by the ray runtime ------------------------------------------------------------
def profile_rows(roles: list[int], requests: dict) -> list[list]:
    """Rows (role, actor, compute_ms, overhead_ms, batch) of one strategy's served requests on Ray.

    ``overhead_ms`` is what the runtime added beyond the instance's service, measured only on requests that
    found their instance idle (its previous answer was back before they were sent), so no queueing is in it.
    """
    if not len(requests.get("instance", [])):
        return []
    pos = role_positions(roles)
    inst = np.asarray(requests["instance"])
    sent, done = np.asarray(requests["sent"]), np.asarray(requests["done"])
    compute, delay, factor = (np.asarray(requests[c], dtype=float) for c in ("compute", "delay", "factor"))
    ok = np.asarray(requests["ok"], dtype=bool)
    batch = np.asarray(requests.get(BATCH_COLUMN, np.ones(len(inst))), dtype=int)
    rows = []
    for i in np.unique(inst):
        idx = np.nonzero((inst == i) & ok)[0]
        idx = idx[np.argsort(sent[idx], kind="stable")]
        prev_done = np.concatenate([[-np.inf], done[idx][:-1]])
        idle = sent[idx] >= prev_done
        overhead = (done[idx] - sent[idx]) - (compute[idx] + delay[idx]) * factor[idx]
        for j, n in enumerate(idx):
            rows.append([int(roles[i]), int(pos[i]), f"{1000 * compute[n]:.4f}",
                         f"{1000 * max(overhead[j], 0.0):.4f}" if idle[j] else "", int(batch[n])])
    return rows


def write_profile(path: Path, strategies: list[tuple[list[int], dict]]) -> None:
    """``profile.csv`` of one setting from every strategy's requests on Ray (``[(roles, requests), ...]``)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(PROFILE_COLUMNS + [BATCH_COLUMN])
    for roles, requests in strategies:
        w.writerows(profile_rows(roles, requests))
    atomic_write_text(buf.getvalue(), path)
