"""Serving policies (serve/core/policy.py): routing, cancellation, deferred parities, hedged copies.

The policies run event by event in the simulator (serve.sim.EventRun) and on Ray (serve.runtime.Frontend, and
the HTTP service's serve.runtime.ServiceFrontend) through one PolicyMachine. What is checked: every query
answered exactly once, with and without failures; a
dispatcher that decides nothing new reproduces the fixed plans' simulator to the nanosecond; cancellation and
deferral never answer later where that holds by construction; shortest-queue routing at negligible load gives
the closed forms; the extra work on cases small enough to count by hand; seeds; config errors; Ray.
"""
import csv
import json
import math

import numpy as np
import pytest

from serve.config import PolicyConfig, validate
from serve.plan import build_plan, make_queries
from serve.results import extra_work, summarize
from serve.sim import EventRun, simulate
from test_sim import bursts, coded_survival, exp_quantile  # the simulator tests' stream and closed forms
from util.errors import ConfigError

PERCENTILES = (50, 90, 99, 99.9)


def sim_config(**overrides):
    raw = {"instances": 4, "num_queries": 2000, "service": {"dist": "exponential", "mean_ms": 1.0},
           "engine": "sim", "batch_size": 1, "plot": False, "group_timeout_ms": 2.0,
           "delays": [{"dist": "exponential", "mean_ms": 5, "probability": 0.1}], **overrides}
    return validate(raw, need_runs=False)


POLICIES = [PolicyConfig("equal-resources", routing="jsq"), PolicyConfig("equal-resources", routing="p2c"),
            PolicyConfig("replicate", routing="jsq", cancel=True),
            PolicyConfig("replicate", cancel=True, defer={"ms": 3}),
            PolicyConfig("replicate", routing="p2c", cancel=True, defer={"percentile": 90, "window": 200}),
            PolicyConfig("coded", cancel=True), PolicyConfig("coded", defer={"ms": 2}),
            PolicyConfig("coded", routing="jsq", cancel=True),
            PolicyConfig("coded", routing="jsq", pool="shared", cancel=True),
            PolicyConfig("coded", routing="p2c", pool="shared", cancel=True, defer={"percentile": 90, "window": 200}),
            PolicyConfig("coded", routing="jsq", pool="shared", defer={"ms": 1})]
NAMES = ["eq+jsq", "eq+p2c", "rep+jsq+cancel", "rep+cancel+hedge", "rep+p2c+cancel+hedge-p90", "coded+cancel",
         "coded+defer", "coded+jsq+cancel", "coded+pooled+cancel", "coded+p2c+pooled+cancel+defer-p90",
         "coded+pooled+defer"]
FAILURES = [{"instance": 1, "at_ms": 300}, {"instance": 0, "at_ms": 600}, {"instance": 4, "at_ms": 650}]


# -- every query answered once ---------------------------------------------------------------------------

@pytest.mark.parametrize("failures", [[], FAILURES], ids=["no failure", "three fail-stops"])
@pytest.mark.parametrize("policy", POLICIES, ids=NAMES)
def test_every_policy_answers_every_query_exactly_once(policy, failures):
    cfg = sim_config(failures=failures, slowdown={"fraction": 0.1, "factor": 3, "period_ms": 50})
    queries = make_queries(cfg, 1500.0, np.zeros(10, dtype=int))   # load about 0.4 of 6 instances
    out = simulate(build_plan(cfg, policy, 2, 1, queries, cfg.delays[0]), cfg)
    assert (out.answers == 1).all() and np.all(out.done >= out.arrival) and np.all(np.isfinite(out.done))
    req = out.requests
    assert not (req["cancelled"] & req["started"]).any()      # a started request is never counted cancelled
    assert not (req["ok"] & ~req["started"]).any()
    dead = {f["instance"]: f["at_ms"] / 1000 for f in failures}
    for i, t in dead.items():  # nothing is sent to an instance after it failed
        assert not np.any((req["instance"] == i) & (req["sent"] > t))
    if failures and policy.routing == "static":  # (shortest-queue routing may find a failing instance idle)
        assert (~req["ok"] & ~req["cancelled"]).any()          # the failures did cost requests


# -- a dispatcher that decides nothing new is the fixed plan ------------------------------------------------

@pytest.mark.parametrize("strategy,failures", [  # test_sim's failure cases, each of which needs retries
    ("equal-resources", [{"instance": 1, "at_ms": 1000}, {"instance": 2, "at_ms": 1010}]),
    ("replicate", [{"instance": 0, "at_ms": 900}, {"instance": 1, "at_ms": 1200}]),
    ("coded", [{"instance": 2, "at_ms": 800}, {"instance": 0, "at_ms": 1000}]),
])
def test_the_event_loop_on_a_fixed_plan_equals_the_vectorised_simulator(strategy, failures):
    cfg = sim_config(instances=2, num_queries=300, failures=failures, group_timeout_ms=30.0,
                     service={"dist": "constant", "ms": 20.0},
                     delays=[{"dist": "exponential", "mean_ms": 60.0, "probability": 0.5}])
    queries = make_queries(cfg, 25.0, np.zeros(10, dtype=int))
    plan = build_plan(cfg, strategy, 2, 1, queries, cfg.delays[0])
    fixed, events = simulate(plan, cfg), EventRun(plan, cfg).outcome()
    assert np.allclose(fixed.done, events.done, rtol=0, atol=1e-9)
    assert np.array_equal(fixed.reconstructed, events.reconstructed)
    assert np.array_equal(fixed.retried, events.retried) and events.retried.any()
    assert extra_work(fixed.requests, 300) == pytest.approx(extra_work(events.requests, 300))


# -- cancellation and deferral never answer later (fixed routing: by construction) --------------------------

def own_output_times(plan, outcome) -> np.ndarray:
    """Each query's own data output in a fixed plan without failures (every plan request is sent, in order)."""
    own = np.full(len(plan.queries.arrival), np.inf)
    data = plan.query >= 0
    np.minimum.at(own, plan.query[data], outcome.requests["done"][data])
    return own


@pytest.mark.parametrize("strategy,change", [
    ("coded", {"cancel": True}), ("replicate", {"cancel": True}),
    ("coded", {"defer": {"ms": 2}}), ("coded", {"cancel": True, "defer": {"percentile": 80, "window": 100}}),
    ("replicate", {"cancel": True, "defer": {"ms": 2}}),
])
def test_cancellation_and_deferral_never_answer_later_than_the_plan_without_them(strategy, change):
    # Fixed routing: a cancelled request only leaves its queue, so everything behind it starts no later, and
    # deferred parities never join a data instance's queue. Hence cancellation alone never answers a query
    # later than the plain plan; deferral, which may rebuild later, never answers later than the plain
    # plan's own output of the query (replicate: its first copy).
    cfg = sim_config(num_queries=4000, delays=[{"dist": "exponential", "mean_ms": 8, "probability": 0.1}])
    queries = make_queries(cfg, 2000.0, np.zeros(10, dtype=int))   # load about 0.6: queues form
    plain_plan = build_plan(cfg, strategy, 2, 1, queries, cfg.delays[0])
    plain = simulate(plain_plan, cfg)
    policy = PolicyConfig(strategy, **change)
    out = simulate(build_plan(cfg, policy, 2, 1, queries, cfg.delays[0]), cfg)
    tol = 1e-9
    if "defer" not in change:
        assert np.all(out.done <= plain.done + tol)
        assert (out.done < plain.done - 1e-6).mean() > 0.01     # and it does answer some queries earlier
    first = own_output_times(plain_plan, plain) if strategy == "coded" else \
        plain.requests["done"][plain_plan.slot == 0][np.argsort(plain_plan.query[plain_plan.slot == 0])]
    assert np.all(out.done <= first + tol)
    before, after = extra_work(plain.requests, 4000), extra_work(out.requests, 4000)
    assert after["requests_per_query"] < before["requests_per_query"]
    assert after["busy_ms_per_query"] < before["busy_ms_per_query"]


# -- closed forms at negligible load ---------------------------------------------------------------------

@pytest.mark.parametrize("policy,k,r,survival", [
    (PolicyConfig("equal-resources", routing="jsq"), 2, 1, lambda t: math.exp(-t)),
    (PolicyConfig("replicate", routing="jsq", cancel=True), 2, 1, lambda t: math.exp(-2 * t)),
    (PolicyConfig("coded", routing="jsq", pool="shared", cancel=True), 2, 1, coded_survival(2, 1)),
    (PolicyConfig("coded", routing="p2c", pool="shared", cancel=True), 3, 2, coded_survival(3, 2)),
], ids=["equal-resources+jsq", "replicate+jsq+cancel", "coded+jsq+pooled", "coded+p2c+pooled k3 r2"])
def test_routing_at_negligible_load_gives_the_closed_form(policy, k, r, survival):
    # Groups of k queries a second apart: every instance is idle, and routing never puts two requests of a
    # group (or two copies) on one instance, so latency is the fixed layout's order statistic.
    cfg = sim_config(instances=6, service={"dist": "exponential", "mean_ms": 1.0}, delays=[{"dist": "none"}],
                     group_timeout_ms=1.0)
    queries = bursts(24_000 // k, k)
    out = simulate(build_plan(cfg, policy, k, r, queries, cfg.delays[0]), cfg)
    lat = (out.done - out.arrival) * 1000.0
    for p in PERCENTILES:  # p99.9 of 24,000 queries rests on 24 of them: a wider band
        assert np.percentile(lat, p) == pytest.approx(exp_quantile(p / 100, survival), rel=0.1 if p > 99 else 0.05), p


# -- the extra work, counted by hand ---------------------------------------------------------------------

def test_extra_work_on_cases_counted_by_hand():
    # Constant 10 ms service; instance 1 adds 30 ms to every request. Four queries at t = 0, k = 2, r = 1,
    # m = 2: q0, q2 -> instance 0 (done 10, 20 ms), q1, q3 -> instance 1 (done 40, 80 ms), parities -> 2
    # (done 10, 20 ms). Group (q0, q1) decodes at 10 ms, (q2, q3) at 20 ms: q3 is answered while its own
    # request still waits behind q1's, so cancellation drops it: 5 requests started instead of 6, 80
    # instance-ms instead of 120, and no answer moves.
    cfg = sim_config(instances=2, service={"dist": "constant", "ms": 10.0},
                     delays=[{"dist": "constant", "ms": 30.0, "instances": [1]}])
    queries = bursts(1, 4)
    plain = simulate(build_plan(cfg, "coded", 2, 1, queries, cfg.delays[0]), cfg)
    cancel = simulate(build_plan(cfg, PolicyConfig("coded", cancel=True), 2, 1, queries, cfg.delays[0]), cfg)
    assert np.allclose(plain.done, [0.010, 0.010, 0.020, 0.020]) and np.allclose(cancel.done, plain.done)
    assert extra_work(plain.requests, 4) == pytest.approx(
        {"requests_sent_per_query": 1.5, "requests_per_query": 1.5, "cancelled_per_query": 0.0,
         "busy_ms_per_query": 30.0})
    assert extra_work(cancel.requests, 4) == pytest.approx(
        {"requests_sent_per_query": 1.5, "requests_per_query": 1.25, "cancelled_per_query": 0.25,
         "busy_ms_per_query": 20.0})
    # Replicate, one pair: q0 on both (10 ms on 0, 40 ms on 1), then q1 on both; q1 is answered by instance 0
    # at 20 ms while its copy on instance 1 still waits, so it is cancelled: 3 started, 60 instance-ms.
    one_pair = validate({**vars(cfg), "instances": 1}, need_runs=False)
    rep = simulate(build_plan(one_pair, PolicyConfig("replicate", cancel=True), 2, 1, bursts(1, 2),
                              cfg.delays[0]), one_pair)
    assert np.allclose(rep.done, [0.010, 0.020])
    assert extra_work(rep.requests, 2) == pytest.approx(
        {"requests_sent_per_query": 2.0, "requests_per_query": 1.5, "cancelled_per_query": 0.5,
         "busy_ms_per_query": 30.0})
    # Deferred parities: two queries both done at 10 ms; a parity deferred 15 ms is never sent, one deferred
    # 5 ms is (at 5 ms, done at 15 ms).
    quiet = sim_config(instances=2, service={"dist": "constant", "ms": 10.0}, delays=[{"dist": "none"}])
    for ms, requests in ((15.0, 1.0), (5.0, 1.5)):
        out = simulate(build_plan(quiet, PolicyConfig("coded", defer={"ms": ms}), 2, 1, bursts(1, 2),
                                  quiet.delays[0]), quiet)
        assert np.allclose(out.done, 0.010)
        assert summarize(out, "coded", 3)["requests_per_query"] == pytest.approx(requests)
        assert summarize(out, "coded", 3)["busy_ms_per_query"] == pytest.approx(10.0 * requests)


# -- seeds, config ---------------------------------------------------------------------------------------

def test_a_seed_reproduces_a_policy_run_and_another_seed_changes_it():
    policy = PolicyConfig("coded", routing="p2c", pool="shared", cancel=True, defer={"percentile": 90,
                                                                                     "window": 100})

    def run(seed):
        cfg = sim_config(seed=seed)
        queries = make_queries(cfg, 2000.0, np.zeros(10, dtype=int))
        out = simulate(build_plan(cfg, policy, 2, 1, queries, cfg.delays[0]), cfg)
        return out.done, out.requests["instance"]

    (a, ia), (b, ib), (c, _) = run(0), run(0), run(1)
    assert np.array_equal(a, b) and np.array_equal(ia, ib)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("entry,key", [
    ({"strategy": "coded", "routing": "fastest"}, "'routing'"),
    ({"strategy": "coded", "rooting": "jsq"}, "'rooting'.*Did you mean 'routing'"),
    ({"strategy": "replicate", "pool": "shared"}, "'pool'"),
    ({"strategy": "equal-resources", "defer": {"ms": 5}}, "'defer'"),
    ({"strategy": "coded", "defer": {"percentile": 100, "window": 10}}, "'defer'"),
    ({"strategy": "backup"}, "'strategy'"),
    ({"strategy": "coded", "name": "a/b"}, "'name'"),
    ({"strategy": "coded", "name": "coded"}, "'policies'"),
])
def test_bad_policies_name_the_key(entry, key):
    with pytest.raises(ConfigError, match=key):
        sim_config(strategies=["coded"], policies=[entry])


def test_a_bad_policy_in_a_map_config_exits_2_before_any_cell(tmp_path, capsys):
    from serve.map import main as map_main

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"delays": [{"dist": "constant", "ms": 20}], "out_dir": str(tmp_path / "out"),
                                "policies": [{"strategy": "coded", "cancel": "yes"}]}))
    assert map_main([str(path)]) == 2
    assert "'cancel'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_map_ranks_policies_as_rows_and_draws_the_second_heatmap(tmp_path):
    from serve.map import main as map_main

    path = tmp_path / "map.json"
    path.write_text(json.dumps({
        "instances": 20, "num_queries": 4000, "service": {"dist": "exponential", "mean_ms": 1.0},
        "delays": [{"dist": "constant", "ms": 20}], "group_timeout_ms": 5.0, "out_dir": str(tmp_path / "map"),
        "strategies": ["equal-resources", "coded"],
        "policies": [{"strategy": "replicate", "routing": "jsq", "cancel": True, "defer": {"ms": 3}},
                     {"strategy": "coded", "routing": "jsq", "pool": "shared", "cancel": True, "defer": {"ms": 3}}],
        "map": {"loads": [0.7], "straggler_rates": [0.01], "k_vals": [2], "r_vals": [1]}}))
    assert map_main([str(path)]) == 0
    with open(tmp_path / "map" / "map.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    names = ["equal-resources", "coded", "replicate+jsq+cancel+defer3ms", "coded+jsq+pooled+cancel+defer3ms"]
    p999 = {s: float(row[f"{s}_p99.9_ms"]) for s in names}
    assert row["best_coded"] == min(names[1::2], key=p999.get)
    assert row["best_other"] == min(names[0::2], key=p999.get)
    assert float(row["policy_gain"]) == pytest.approx(p999[row["best_other"]] / p999[row["best_coded"]])
    # At 0.7 of the budget the fixed layout's data instances run past capacity; pooling and deferral do not.
    assert p999["coded+jsq+pooled+cancel+defer3ms"] < p999["coded"] / 3
    assert 1.0 < float(row["coded+jsq+pooled+cancel+defer3ms_requests"]) < 1.2
    assert (tmp_path / "map" / "map_policies.png").is_file() and (tmp_path / "map" / "map.png").is_file()


# -- on Ray ----------------------------------------------------------------------------------------------

def test_policies_on_ray_answer_every_query_once_and_defer_and_cancel_there_too(tmp_path, digits_run_folder,
                                                                              local_ray):
    """The same dispatcher on actors: every query answered once, a hedged copy and a group's parities sent only
    when the first requests are late, queued redundant requests cancelled, and the simulator runs the same
    config from the ray run's profile. Latencies are not compared query by query: a dynamic policy's routes
    and deferrals depend on the order in which outputs and arrivals meet, which Ray's millisecond jitter on
    this shared machine changes (fixed plans are compared so in test_sim)."""
    from serve.cli import serve_all

    base = {"runs": [digits_run_folder], "rates": [8], "num_queries": 24, "instances": 2,
            "strategies": ["coded"], "group_timeout_ms": 50, "plot": False,
            "delays": [{"dist": "exponential", "mean_ms": 150, "probability": 0.5}],
            "policies": [{"strategy": "coded", "name": "pooled", "routing": "jsq", "pool": "shared",
                          "cancel": True, "defer": {"ms": 60}},
                         {"strategy": "replicate", "name": "hedged", "routing": "jsq", "cancel": True,
                          "defer": {"ms": 60}}]}
    serve_all(validate({**base, "engine": "ray", "out_dir": str(tmp_path / "ray")}), out=open("/dev/null", "w"))
    profile = tmp_path / "ray" / "setting00" / "profile.csv"
    serve_all(validate({**base, "engine": "sim", "profile": str(profile), "out_dir": str(tmp_path / "sim")}),
              out=open("/dev/null", "w"))
    for engine in ("ray", "sim"):
        for name, most in (("pooled", 1.5), ("hedged", 2.0)):
            folder = tmp_path / engine / "setting00" / name
            with open(folder / "queries.csv", newline="") as fh:
                rows = list(csv.DictReader(fh))
            assert [int(r["query"]) for r in rows] == list(range(24))
            assert all(0 <= float(r["latency_ms"]) < 10_000 for r in rows)
            summary = json.loads((folder / "summary.json").read_text())
            assert 1.0 <= summary["requests_sent_per_query"] < most, (engine, name, summary)
            if name == "pooled":
                assert any(r["reconstructed"] == "1" for r in rows)


def test_the_http_service_serves_a_policies_row_through_the_same_machine(tmp_path, digits_run_folder, digits_pool):
    """``app.policy`` names a ``policies`` row; the service's frontend is the policy machine's driver, so a pooled
    code defers its parities and a hedged replica its second copy there too, answering each query once."""
    import asyncio

    import torch

    from coders.code import load_code
    from serve.app import build_service
    from serve.config import app_config
    from serve.plan import ROLE_F

    # Instance 0 is 600 ms slow, and query 0 goes there first (shortest queue, ties to the lowest number); the
    # redundant requests wait 300 ms: far above Ray's latency even on the loaded test machine.
    raw = {"runs": [digits_run_folder], "instances": 2, "plot": False, "group_timeout_ms": 50,
           "delays": [{"dist": "constant", "ms": 600, "instances": [0]}],
           "policies": [{"strategy": "coded", "name": "pooled", "routing": "jsq", "pool": "shared",
                         "cancel": True, "defer": {"ms": 300}},
                        {"strategy": "replicate", "name": "hedged", "routing": "jsq", "cancel": True,
                         "defer": {"ms": 300}}]}
    with pytest.raises(ConfigError, match="'app.policy'.*'pooled', 'hedged'"):
        validate({**raw, "app": {"policy": "pooledd"}})
    loaded = load_code(digits_run_folder)
    x, _ = loaded.splits.split("test")
    n = 16

    async def serve_all_inputs(service):
        service.start(asyncio.get_running_loop())

        async def one(i):
            await asyncio.sleep(0.02 * i)
            return (await service.predict([x[i].numpy()]))[0]

        try:
            return await asyncio.gather(*[one(i) for i in range(n)])
        finally:
            service.stop()

    pool = digits_pool  # the session's shared pool: four F instances, and every row here runs on F
    for name, roles, most in (("pooled", [ROLE_F] * 3, 1.5), ("hedged", [ROLE_F] * 4, 2.0)):
        cfg = validate({**raw, "app": {"policy": name}})
        app = app_config(cfg)
        service = build_service(cfg, app, loaded, pool)
        assert service.roles == roles and service.policy.routing == "jsq" and service.policy.defer == {"ms": 300}
        answers = asyncio.run(serve_all_inputs(service))
        assert sorted(a["query"] for a in answers) == list(range(n)) and not service.futures
        assert service.policy.answers.tolist() == [1] * n
        assert n <= service.core.sent < most * n  # deferral: redundant requests only for late first ones
        with torch.no_grad():
            f_out = loaded.code.base(x[:n])
        for i, a in enumerate(answers):
            if not a["rebuilt"]:
                assert np.allclose(a["output"], f_out[i].numpy(), atol=1e-5)
        if name == "pooled":
            assert answers[0]["rebuilt"] and answers[0]["latency_ms"] < 600
