"""The simulator's batching (serve/simulator/simulate.py EventRun with serve.batching.Batchers): batch size 1 is the unbatched
simulator to the nanosecond; the maximum wait is honoured; a straggler delays exactly the call it lands in; no
query is lost or answered twice; the profile's a + b x batch fit recovers planted costs. No Ray."""
import csv

import numpy as np
import pytest

from serve.config import PolicyConfig, validate
from serve.plan import build_plan, make_queries
from serve.sim import EventRun, fit_batch_cost, read_profile, simulate, write_profile

FAILURES = [{"instance": 2, "at_ms": 300}, {"instance": 0, "at_ms": 500}]


def sim_config(**overrides):
    raw = {"instances": 2, "num_queries": 400, "engine": "sim", "plot": False, "group_timeout_ms": 5.0,
           "service": {"dist": "constant", "ms": 1.0},
           "delays": [{"dist": "exponential", "mean_ms": 10.0, "probability": 0.1}], **overrides}
    return validate(raw, need_runs=False)


def plan_of(cfg, strategy, rate=800.0):
    queries = make_queries(cfg, rate, np.zeros(10, dtype=int))
    return build_plan(cfg, strategy, 2, 1, queries, cfg.delays[0])


@pytest.mark.parametrize("strategy", ["equal-resources", "replicate", "coded"])
def test_batch_size_one_is_the_unbatched_simulator_whatever_the_wait_and_inflight(strategy):
    # Bug: the batcher holding single requests (a wait, a call limit) or the call model changing one-request calls.
    cfg = sim_config(batch_size=1, batch_wait_ms=5.0, batch_inflight=1, failures=FAILURES,
                     service={"dist": "exponential", "mean_ms": 1.0})  # no ties: both paths break them their own way
    plan = plan_of(cfg, strategy)
    array, events = simulate(plan, cfg), EventRun(plan, cfg).outcome()
    assert np.allclose(array.done, events.done, rtol=0, atol=1e-12)
    assert np.array_equal(array.reconstructed, events.reconstructed)
    assert np.array_equal(array.retried, events.retried)
    assert (~events.requests["ok"]).any()  # the failures cost requests: the recovery rules ran
    assert set(events.requests["batch"][events.requests["started"]].tolist()) == {1}


def test_the_maximum_wait_is_honoured_and_used():
    # Bug: a batch's first request waiting past batch_wait_ms while its instance may take a call (or never waiting).
    cfg = sim_config(batch_size=8, batch_wait_ms=3.0, batch_inflight=1024, instances=4)
    run = EventRun(plan_of(cfg, "equal-resources", rate=1500.0), cfg)
    run.outcome()
    sent = np.asarray(run.rec["sent"])
    waited = np.array([out - sent[reqs].min() for _, reqs, out, _ in run.calls])
    sizes = np.array([len(reqs) for _, reqs, _, _ in run.calls])
    assert waited.max() <= 0.003 + 1e-12
    assert np.isclose(waited, 0.003, atol=1e-12).any() and (sizes > 1).any() and sizes.max() <= 8
    assert sizes.sum() == len(run.plan)  # every request went out in exactly one call


def test_a_straggler_delays_exactly_the_call_it_lands_in():
    # Bug: the delay charged per request (the call's others unaffected) or to the wrong call.
    cfg = sim_config(batch_size=4, batch_wait_ms=2.0, batch_inflight=1, delays=[{"dist": "none"}])
    plan = plan_of(cfg, "equal-resources", rate=2000.0)
    plan.delay[:] = 0.0
    plan.factor[:] = 1.0
    hit = 101
    plan.delay[hit] = 0.05
    run = EventRun(plan, cfg)
    run.outcome()
    start, finish = np.asarray(run.rec["start"]), np.asarray(run.rec["finish"])
    held = {}
    for c, (_, reqs, _, _) in enumerate(run.calls):
        held[c] = finish[reqs] - start[reqs]
        assert np.ptp(held[c]) == 0  # one call: its requests start and finish together
    slow = run.call_of[hit]
    assert len(run.calls[slow][1]) > 1
    assert held[slow][0] == pytest.approx(0.051, abs=1e-12)
    assert all(h[0] == pytest.approx(0.001, abs=1e-12) for c, h in held.items() if c != slow)


@pytest.mark.parametrize("strategy", ["equal-resources", "replicate", "coded",
                                      PolicyConfig("coded", routing="jsq", cancel=True),
                                      PolicyConfig("replicate", cancel=True, defer={"ms": 2})])
def test_under_batching_no_query_is_lost_or_answered_twice(strategy):
    # Bug: a failure losing what waits in a batcher, or a cancelled call's requests answered anyway.
    cfg = sim_config(batch_size=6, batch_wait_ms=1.0, batch_inflight=2, failures=FAILURES, instances=3)
    plan = plan_of(cfg, strategy, rate=1500.0)
    run = EventRun(plan, cfg)
    out = run.outcome()
    assert np.isfinite(out.done).all() and (out.done >= out.arrival).all()
    assert np.array_equal(out.answers, np.ones(len(out.arrival), dtype=int))
    went = [n for _, reqs, _, _ in run.calls for n in reqs]
    assert len(went) == len(set(went))  # no request in two calls
    assert max(len(reqs) for _, reqs, _, _ in run.calls) <= 6 and max(out.requests["batch"]) > 1


def test_batched_simulate_goes_to_the_event_loop_and_batches_answer_later_than_their_first_request():
    # Bug: a batched config silently served one request a call by the array path.
    cfg = sim_config(batch_size=8, batch_wait_ms=2.0)
    plan = plan_of(cfg, "equal-resources", rate=500.0)
    batched, single = simulate(plan, cfg), simulate(plan, sim_config(batch_size=1))
    assert max(batched.requests["batch"]) > 1
    assert np.median(batched.done - batched.arrival) > np.median(single.done - single.arrival)


def test_the_fit_recovers_planted_call_costs(tmp_path):
    # Bug: fitting per-request shares instead of call times, or weighting a call by its size.
    rng = np.random.default_rng(0)
    a, b = 2.0, 0.15
    rows, requests = [], {name: [] for name in ("instance", "sent", "done", "compute", "delay", "factor", "ok",
                                                   "batch")}
    t = 0.0
    for _ in range(400):
        n = int(rng.integers(1, 33))
        call_ms = (a + b * n) * (1 + 0.02 * rng.standard_normal())
        for j in range(n):
            for name, v in (("instance", 0), ("sent", t), ("done", t + call_ms / 1000 + 0.001),
                            ("compute", call_ms / n / 1000), ("delay", 0.0), ("factor", 1.0), ("ok", True),
                            ("batch", n)):
                requests[name].append(v)
        t += 1.0
    path = tmp_path / "profile.csv"
    write_profile(path, [([0], requests)])
    with open(path, newline="") as fh:
        assert next(csv.reader(fh))[-1] == "batch"
    profile = read_profile(str(path))
    assert profile["a_ms"] == pytest.approx(a, rel=0.05) and profile["b_ms"] == pytest.approx(b, rel=0.05)
    fa, fb = fit_batch_cost(np.array([1, 1, 4, 4]), np.array([3.0, 3.0, 6.0 / 4, 6.0 / 4]))  # exact: 2 + 1 x n
    assert (fa, fb) == pytest.approx((2.0, 1.0))


def test_a_profile_without_batch_sizes_reads_as_calls_of_one(tmp_path):
    # Bug: an old profile's compute rescaled, changing the unbatched simulator's figures.
    path = tmp_path / "old.csv"
    path.write_text("role,actor,compute_ms,overhead_ms\n0,0,1.5,0.2\n0,1,2.5,\n")
    profile = read_profile(str(path))
    assert profile["compute_ms"].tolist() == [1.5, 2.5] and profile["batch"].tolist() == [1.0, 1.0]
    assert profile["b_ms"] == 0.0


def test_one_draw_at_a_time_equals_the_array_draw_for_measured_missing_and_unmeasured_instances(tmp_path):
    # The event loop draws each request's compute and overhead alone (ServiceModel.draw_one); bug: a draw that
    # differs from the array path's (another pool, another fallback, another use of the generator).
    from serve.simulator.profiles import ServiceModel

    path = tmp_path / "profile.csv"
    rows = ["role,actor,compute_ms,overhead_ms,batch"] + [f"-1,0,{1 + i % 3}.0,,{1 + i % 4}" for i in range(9)] \
        + [f"-1,1,{10 + i}.0,{i}.5,1" for i in range(5)] + ["0,0,7.0,1.0,2", "0,0,8.0,,1"]
    path.write_text("\n".join(rows) + "\n")
    cfg = validate({"instances": 3, "num_queries": 10, "engine": "sim", "profile": str(path)}, need_runs=False)
    roles = [-1, -1, -1, 0, 0, 1]  # F actor 2 and parity actor 1 are not in the profile; role 1 is in no row
    model = ServiceModel(cfg, roles)
    arrays, ones = np.random.default_rng(3), np.random.default_rng(3)
    seen = set()
    for inst in np.random.default_rng(4).integers(0, len(roles), 400):
        (c, o), (c1, o1) = model.draw(np.array([inst]), arrays), model.draw_one(int(inst), ones)
        assert (c[0], o[0]) == (c1, o1)
        seen.add(round(c1 * 1000, 6))
    assert {10.0, 14.0} <= seen and len(seen) >= 6  # actor 1's calls of one as measured, and the other pools'
