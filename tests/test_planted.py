"""Bugs planted by hand that the suite once let through (issue 32), each caught here, cheaply.

Every test names the one-line bug that turns it red; ``tests/mutants.py`` plants each of them again
(mutants ``p2c_to_the_busier`` ... ``file_domain_unshuffled``) and runs these tests against it.
"""
import asyncio
import time
import types

import numpy as np
import pytest
import torch

from serve.config import PolicyConfig, validate
from serve.plan import build_plan, make_queries
from serve.results import extra_work
from serve.sim import simulate
from test_sim import bursts


def sim_config(**overrides):
    raw = {"instances": 4, "num_queries": 2000, "service": {"dist": "exponential", "mean_ms": 1.0},
           "engine": "sim", "batch_size": 1, "plot": False, "group_timeout_ms": 2.0, "delays": [{"dist": "none"}], **overrides}
    return validate(raw, need_runs=False)


# -- serving policies ---------------------------------------------------------------------------------------

def test_power_of_two_choices_sends_to_the_less_busy_of_its_two_draws():
    # Bug: p2c picking the busier draw. Eight instances at load 0.9: p2c's queues stay near jsq's, while
    # sending each request to the busier of two draws lets queues grow far beyond the fixed round robin's.
    cfg = sim_config(instances=8, num_queries=6000)
    queries = make_queries(cfg, 7200.0, np.zeros(10, dtype=int))  # 7.2 queries/ms on 8 instances of 1 ms
    lat = {}
    for name, policy in (("static", "equal-resources"), ("jsq", PolicyConfig("equal-resources", routing="jsq")),
                         ("p2c", PolicyConfig("equal-resources", routing="p2c"))):
        out = simulate(build_plan(cfg, policy, 2, 1, queries, cfg.delays[0]), cfg)
        lat[name] = np.percentile((out.done - out.arrival) * 1000.0, [50, 99])
    assert np.all(lat["jsq"] <= lat["p2c"] + 1e-9)  # jsq sees every queue, p2c two of them
    assert np.all(lat["p2c"] < lat["static"]), lat
    assert lat["p2c"][0] < 2 * lat["jsq"][0] + 0.5, lat


def test_a_hedged_copy_is_not_sent_once_its_query_is_answered_even_without_cancellation():
    # Bug: with deferral but no cancellation the second copy still went out after the first answered.
    # Constant 1 ms service, queries a second apart, copies deferred 5 ms: no copy is ever needed.
    cfg = sim_config(instances=2, service={"dist": "constant", "ms": 1.0})
    out = simulate(build_plan(cfg, PolicyConfig("replicate", defer={"ms": 5}), 2, 1, bursts(50, 1), cfg.delays[0]),
                   cfg)
    assert np.allclose(out.done - out.arrival, 0.001)
    assert extra_work(out.requests, 50)["requests_sent_per_query"] == pytest.approx(1.0)


def test_a_percentile_deferral_is_taken_over_the_latencies_seen_not_the_empty_window():
    # Bug: the percentile over the whole window, its unfilled zeros included: a delay of 0 until 90% of the
    # window is filled, so every hedged copy goes out at once. Exponential 1 ms service, p90 over a
    # 1,000-long window: the delay is about 2.3 ms from the 50th first request on, so about 10% of later
    # queries need their copy (the first 50, with no delay yet, send both).
    cfg = sim_config(instances=2, num_queries=600)
    policy = PolicyConfig("replicate", defer={"percentile": 90, "window": 1000})
    out = simulate(build_plan(cfg, policy, 2, 1, bursts(600, 1, gap_s=0.05), cfg.delays[0]), cfg)
    per_query = extra_work(out.requests, 600)["requests_sent_per_query"]
    assert 1.1 < per_query < 1.35, per_query  # 1 + 50/600 + 10% of 550/600 = 1.17 expected; 2 with the bug


# -- serving on Ray: the instance's own arithmetic, in-process ------------------------------------------------

class SleepyF(torch.nn.Module):
    """A model whose compute takes 20 ms."""

    def forward(self, x):
        time.sleep(0.02)
        return x.flatten(1)


def test_a_slow_period_on_ray_stretches_the_compute_as_well_as_the_delay():
    # Bug: (compute + delay x factor) instead of (compute + delay) x factor. The instance sleeps what is
    # left of its service time, so it takes at least factor x (compute + delay).
    from serve.runtime import Instance

    inst = Instance(SleepyF(), 1, False, "cpu")
    start = time.perf_counter()
    _, compute = inst.infer(np.zeros((1, 2), dtype=np.float32), 0.0, 4.0)
    took = time.perf_counter() - start
    assert compute >= 0.02 and took >= 4 * compute, (took, compute)


# -- the HTTP service's figures -------------------------------------------------------------------------------

def test_metrics_count_refused_queries_not_requests():
    # Bug: a refused /predict/batch of 3 inputs counted as 1 rejected query.
    from serve.online import Overloaded, Service

    service = Service.__new__(Service)  # admission needs only the bound, the waiting queries and the counts
    service.app = types.SimpleNamespace(max_queue=4)
    service.futures = {0: None, 1: None}
    service.counts = {"rejected": 0}
    with pytest.raises(Overloaded):
        asyncio.run(service.predict([np.zeros(2)] * 3))
    assert service.counts["rejected"] == 3


def test_the_load_generators_server_and_http_percentiles_are_the_50th_and_99th():
    # Bug: np.percentile(x, 0.99), the 0.99th percentile, for p99.
    from serve.loadgen import layer_percentiles

    server = np.arange(1.0, 101.0)
    rec = {"server_ms": server, "sent": np.zeros(100), "done": (server + 2.0) / 1000.0}
    out = layer_percentiles(rec, np.ones(100, dtype=bool))
    assert out["server_p50_ms"] == pytest.approx(50.5) and out["server_p99_ms"] == pytest.approx(99.01)
    assert out["http_p50_ms"] == pytest.approx(2.0) and out["http_p99_ms"] == pytest.approx(2.0)


# -- domains --------------------------------------------------------------------------------------------------

def test_a_uniform_domain_fills_its_whole_box():
    # Bug: the box's width taken as 'high' instead of high - low: [-3, 3] drawn as [-3, 0].
    from datasets.domains import DomainSpec, sample_domain

    s = sample_domain("d", DomainSpec(sampler="uniform", shape=[1], low=-3.0, high=3.0, n_train=2000, n_val=10,
                                      n_test=10), seed=0)
    x = s.train_x
    assert float(x.min()) >= -3 and float(x.max()) <= 3
    assert float(x.min()) < -2.9 and float(x.max()) > 2.9 and abs(float(x.mean())) < 0.2


def test_a_normal_domain_draws_normal_numbers():
    # Bug: torch.rand (uniform on [0, 1)) in place of torch.randn: all draws in [mean, mean + std).
    from datasets.domains import DomainSpec, sample_domain

    s = sample_domain("d", DomainSpec(sampler="normal", shape=[1], mean=1.0, std=2.0, n_train=4000, n_val=10,
                                      n_test=10), seed=0)
    x = s.train_x.flatten()
    assert abs(float(x.mean()) - 1.0) < 0.15 and abs(float(x.std()) - 2.0) < 0.15
    outside = float(((x < -1.0) | (x > 3.0)).float().mean())  # beyond one std: 31.7% of a normal
    assert 0.28 < outside < 0.36, outside


def test_a_file_domain_is_shuffled_with_the_seed_before_it_is_cut(tmp_path):
    # Bug: the file's rows cut in file order: the test split is the file's first rows, whatever the seed.
    from datasets.domains import DomainSpec, sample_domain

    np.save(tmp_path / "x.npy", np.arange(100, dtype=np.float32).reshape(100, 1))
    spec = DomainSpec(sampler="file", path=str(tmp_path / "x.npy"), n_val=10, n_test=20)
    one, again, two = (sample_domain("f", spec, seed=seed) for seed in (1, 1, 2))
    assert torch.equal(one.test_x, again.test_x) and torch.equal(one.train_x, again.train_x)
    assert not torch.equal(one.test_x, two.test_x)
    first_rows = set(range(20))
    assert {int(v) for v in one.test_x.flatten()} != first_rows and {int(v) for v in two.test_x.flatten()} != first_rows


def test_every_mutant_still_finds_its_text_once_and_names_tests_that_exist():
    # a refactor that moves a mutant's text leaves it "not applied": it would then prove nothing, silently
    import tests.mutants as mutants
    stale = [f"{m.name}: {why}" for m in mutants.MUTANTS for where, why in [mutants.locate(mutants.ROOT, m)]
             if where is None]
    missing = [f"{m.name}: {t}" for m in mutants.MUTANTS for t in m.tests
               if not (mutants.ROOT / t.split("::")[0]).is_file()]
    assert not stale and not missing, "\n".join(stale + missing)
