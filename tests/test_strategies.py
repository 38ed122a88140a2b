"""Strategies are objects (serve/core/strategies.py): the registry, each strategy's answers agreeing with the plans
it makes, the one failover rule, and the old names that still work."""
from __future__ import annotations

import numpy as np
import pytest

from serve.core import strategies
from serve.core.plan import ROLE_BACKUP, ROLE_F, Queries, build_plan, next_live
from util.errors import ConfigError

SHAPES = [(2, 2, 1), (3, 2, 2), (5, 3, 1), (4, 1, 3)]  # (m, k, r)


def sim_config(**keys):
    from serve.core.config import validate

    raw = {"engine": "sim", "instances": 3, "num_queries": 120, "plot": False, "batch_size": 1,
           "service": {"dist": "exponential", "mean_ms": 1.0},
           "delays": [{"dist": "exponential", "mean_ms": 4.0, "probability": 0.2}], **keys}
    return validate(raw, need_runs=False)


def queries(n: int, rate: float = 500.0) -> Queries:
    arrival = np.cumsum(np.random.default_rng(3).exponential(1.0 / rate, n))
    return Queries(arrival, np.zeros(n, dtype=int), np.zeros(n, dtype=int))


def test_the_old_names_keep_working():
    import serve.config
    import serve.plan
    import serve.policy
    import serve.runtime
    import serve.sim
    from serve.core.config import STRATEGIES

    assert serve.config.STRATEGIES is STRATEGIES and tuple(STRATEGIES) == tuple(strategies.REGISTRY)
    assert list(STRATEGIES[:4]) == list(serve.config.DEFAULT_STRATEGIES)
    assert STRATEGIES.index("coded") == strategies.seed_index("coded") == 3
    assert serve.plan.pool_roles("coded", 2, 2, 1) == [ROLE_F, ROLE_F, 0]
    assert serve.plan.pool_roles("coded", 2, 2, 1, "shared") == [ROLE_F] * 3
    assert serve.plan.pool_roles("backup", 4, 2, 1) == [ROLE_F] * 4 + [ROLE_BACKUP] * 2
    q, s = np.array([0, 1, 2, 3]), np.array([0, 1, 0, 1])
    assert serve.plan.route("replicate", 2, 2, 1, q, s, -1).tolist() == [0, 3, 0, 3]  # copies 2q, 2q + 1 mod 2m
    assert serve.plan.route("none", 3, 2, 1, q, 0, -1).tolist() == [0, 1, 2, 0]
    assert serve.plan.route("coded", 2, 2, 1, -1, 2, np.arange(3)).tolist() == [2, 2, 2]  # parity 0's one instance
    assert serve.runtime.PolicyFrontend is serve.runtime.Frontend
    assert serve.policy.PolicyMachine.__module__ == "serve.core.policy" and serve.policy.PLANNED == 0
    assert serve.sim.next_live_f(np.array([ROLE_F, 0, ROLE_F]), np.array([np.inf, np.inf, 0.5]), np.array([0]),
                                 np.array([1.0])).tolist() == [0]  # instance 2 is down at 1.0: back to 0


@pytest.mark.parametrize("name", list(strategies.REGISTRY))
def test_each_strategy_counts_the_instances_its_plans_use(name):
    """counts() (what limits and the pool read) agrees with roles() (what plans run on), and every request of a
    plan goes to an instance of the role the strategy says it needs."""
    way = strategies.get(name)
    for m, k, r in SHAPES:
        roles = way.roles(m, k, r)
        total, num_f, parity, backup = way.counts(m, k, r)
        assert (total, num_f, parity, backup) == (len(roles), roles.count(ROLE_F), sum(x >= 0 for x in roles),
                                                  roles.count(ROLE_BACKUP))
        cfg = sim_config(instances=m)
        plan = build_plan(cfg, name, k, r, queries(60), cfg.delays[0])
        assert plan.num_instances == total and ((plan.instance >= 0) & (plan.instance < total)).all()
        for n in range(len(plan)):
            want = way.request_role(int(plan.query[n]), int(plan.slot[n]), k)
            assert roles[plan.instance[n]] == (ROLE_F if num_f == total else want), (name, m, k, r, n)
        per_query = len(plan) / len(plan.queries.arrival)
        assert per_query <= way.request_bound(60, k, r)[0] / 60 + way.request_bound(60, k, r)[1] / 60 + 1e-9


def test_a_registered_strategy_is_a_name_like_the_others():
    from serve.core.config import STRATEGIES, validate

    class Quad(strategies.Strategy):
        name, copies, policy_rows = "quad-test", 4, False

    before = dict(strategies.REGISTRY)
    try:
        strategies.register(Quad())
        assert "quad-test" in STRATEGIES and strategies.get("quad-test").label == "quad-test"
        assert strategies.seed_index("quad-test") == len(before)
        cfg = sim_config(strategies=["replicate", "quad-test"])
        assert build_plan(cfg, "quad-test", 2, 1, queries(10), cfg.delays[0]).num_instances == 12
        with pytest.raises(ValueError, match="quad-test"):
            strategies.register(Quad())  # a name is registered once
        with pytest.raises(ConfigError, match="policies"):
            validate({"engine": "sim", "strategies": ["none"], "policies": [{"strategy": "quad-test"}]},
                     need_runs=False)
    finally:
        strategies.REGISTRY.clear()
        strategies.REGISTRY.update(before)
    assert "quad-test" not in STRATEGIES
    with pytest.raises(ConfigError, match="strategies"):
        sim_config(strategies=["quad-test"])
    with pytest.raises(ValueError, match="registered: none, equal-resources"):
        strategies.get("quad-test")


def test_the_failover_rule_is_the_first_live_instance_of_the_role_after_the_failed_one():
    rng = np.random.default_rng(0)
    for _ in range(200):
        num = int(rng.integers(1, 9))
        roles = rng.integers(-2, 2, num)
        fail_at = np.where(rng.random(num) < 0.5, rng.random(num), np.inf)
        after, t = rng.integers(0, num, 6), rng.random(6)
        role = roles[rng.integers(0, num, 6)]
        got = next_live(roles, fail_at, role, after, t)
        for j in range(6):  # the rule by its definition: scan cyclically after `after`, itself last
            scan = [(after[j] + step) % num for step in range(1, num + 1)]
            live = [i for i in scan if roles[i] == role[j] and fail_at[i] > t[j]]
            assert got[j] == (live[0] if live else -1)


def test_the_policy_machine_fails_over_by_the_same_rule():
    """A static retry goes where next_live says: after the failed instance, to the next F instance still up."""
    from serve.core.policy import PolicyMachine

    cfg = sim_config(instances=4, failures=[{"instance": 1, "at_ms": 0.0}, {"instance": 2, "at_ms": 0.0}])
    plan = build_plan(cfg, "none", 2, 1, queries(8), cfg.delays[0])

    class Driver:
        sent: list = []

        def send(self, n, inst, delay, factor):
            self.sent.append((n, inst))

    machine = PolicyMachine(plan, Driver())
    machine.failed(1, 0.0)
    machine.failed(2, 0.0)
    assert machine.next_live(ROLE_F, 1) == 3 == next_live(plan.roles, machine.fail_at, ROLE_F, 1, 0.0)[0]
    machine.failed(3, 0.0)
    assert machine.next_live(ROLE_F, 1) == 0 and machine.next_live(ROLE_F, 0) == 0


def test_a_strategy_without_the_array_path_is_simulated_event_by_event(monkeypatch):
    from serve.simulator import events
    from serve.simulator.simulate import simulate

    cfg = sim_config(failures=[{"instance": 0, "at_ms": 60.0}])
    plan = build_plan(cfg, "coded", 2, 1, queries(120), cfg.delays[0], 3)
    array = simulate(plan, cfg)
    runs = []
    outcome = events.EventRun.outcome
    monkeypatch.setattr(events.EventRun, "outcome", lambda self, *a: runs.append(1) or outcome(self, *a))
    assert simulate(plan, cfg) is not None and not runs  # the coded layout runs on the array path
    monkeypatch.setattr(strategies.get("coded"), "array_path", False)
    loop = simulate(plan, cfg)
    assert runs == [1]
    np.testing.assert_allclose(loop.done, array.done)  # the same figures, event by event
    assert (loop.reconstructed == array.reconstructed).all() and (loop.retried == array.retried).all()
