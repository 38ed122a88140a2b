"""The serving simulator (serve/simulator/simulate.py): closed forms, an event-by-event reference, Ray, configs, the map.

Closed forms use exponential service at negligible load (groups of queries
arrive together, a second apart, so no request ever waits), where a
strategy's latency is an order statistic of independent exponentials. The
comparison with Ray runs the same plans on one local Ray (started once for
the module) with injected delays of hundreds of milliseconds.
"""
import csv
import heapq
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from serve.config import ServeConfig, validate
from serve.plan import ROLE_F, Queries, build_plan, make_queries
from serve.sim import fifo_completion, read_profile, simulate

ROOT = Path(__file__).resolve().parents[1]
PERCENTILES = (50, 90, 99, 99.9)


def sim_config(**overrides) -> ServeConfig:
    raw = {"instances": 4, "num_queries": 1000, "service": {"dist": "exponential", "mean_ms": 1.0},
           "engine": "sim", "batch_size": 1, "plot": False, **overrides}
    return validate(raw, need_runs=False)


def bursts(groups: int, size: int, gap_s: float = 1.0) -> Queries:
    """``size`` queries arriving together every ``gap_s`` seconds."""
    n = groups * size
    return Queries(np.repeat(np.arange(groups) * gap_s, size), np.arange(n), np.zeros(n, dtype=int))


def latencies_ms(outcome) -> np.ndarray:
    return (outcome.done - outcome.arrival) * 1000.0


def exp_quantile(p: float, survival) -> float:
    """x with survival(x) = 1 - p, by bisection (survival decreasing)."""
    lo, hi = 0.0, 1.0
    while survival(hi) > 1 - p:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if survival(mid) > 1 - p else (lo, mid)
    return (lo + hi) / 2


def coded_survival(k: int, r: int):
    """P(latency > t), unit-mean exponential service: the query's own output is late, and fewer than k of the
    k + r outputs of its group are in (at most k - 1 of the other k + r - 1)."""
    def s(t: float) -> float:
        f = 1.0 - math.exp(-t)
        n = k + r - 1
        return math.exp(-t) * sum(math.comb(n, i) * f ** i * (1 - f) ** (n - i) for i in range(k))
    return s


# -- queues ---------------------------------------------------------------------------------------------

def test_fifo_completion_equals_the_recursion_one_request_at_a_time():
    rng = np.random.default_rng(3)
    n, m = 3000, 7
    t = np.sort(np.round(rng.exponential(0.3, n).cumsum() * rng.integers(0, 2, n), 1))  # ties included
    t = np.sort(t)
    inst, service = rng.integers(0, m, n), rng.exponential(1.0, n) * rng.integers(0, 2, n)
    free = np.full(m, -np.inf)
    expect = np.empty(n)
    for i in range(n):
        free[inst[i]] = max(t[i], free[inst[i]]) + service[i]
        expect[i] = free[inst[i]]
    assert np.allclose(fifo_completion(inst, t, service), expect, rtol=0, atol=1e-9)


# -- closed forms ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy,survival", [
    ("none", lambda t: math.exp(-t)),
    ("replicate", lambda t: math.exp(-2 * t)),  # the first of two copies
])
def test_percentiles_of_none_and_replicate_are_exponential_order_statistics(strategy, survival):
    cfg = sim_config()
    queries = bursts(50_000, 4)
    out = simulate(build_plan(cfg, strategy, 2, 1, queries, cfg.delays[0]), cfg)
    lat = latencies_ms(out)
    for p in PERCENTILES:
        assert np.percentile(lat, p) == pytest.approx(exp_quantile(p / 100, survival), rel=0.05), p
    assert not out.reconstructed.any() and not out.retried.any()


@pytest.mark.parametrize("k,r", [(2, 1), (3, 2), (4, 1), (2, 2)])
def test_coded_percentiles_are_the_order_statistic_of_own_output_and_kth_of_k_plus_r(k, r):
    cfg = sim_config(group_timeout_ms=1.0)
    queries = bursts(200_000 // k, k)
    plan = build_plan(cfg, "coded", k, r, queries, cfg.delays[0])
    assert (plan.members >= 0).all()  # every group is full: its k queries arrive together
    out = simulate(plan, cfg)
    lat = latencies_ms(out)
    for p in PERCENTILES:
        assert np.percentile(lat, p) == pytest.approx(exp_quantile(p / 100, coded_survival(k, r)), rel=0.05), p
    # A query is reconstructed when its own output ranks after the k-th of k + r: probability r / (k + r).
    assert out.reconstructed.mean() == pytest.approx(r / (k + r), abs=0.01)


def test_one_queue_at_half_load_gives_the_exponential_sojourn_time_of_mm1():
    # M/M/1, arrival rate 500/s, mean service 1 ms: time in system ~ Exponential(mean 1 / (1000 - 500) s).
    cfg = sim_config(instances=1, num_queries=200_000, rates=[500.0])
    queries = make_queries(cfg, 500.0, np.zeros(10, dtype=int))
    lat = latencies_ms(simulate(build_plan(cfg, "none", 2, 1, queries, cfg.delays[0]), cfg))[2000:]
    assert lat.mean() == pytest.approx(2.0, rel=0.05)
    for p in (50, 90, 99):
        assert np.percentile(lat, p) == pytest.approx(-2.0 * math.log(1 - p / 100), rel=0.07), p


def test_tail_at_scale_one_slow_request_in_a_hundred_makes_most_fan_out_queries_slow():
    # A query that needs 100 answers: 100 requests sent together to 100 idle instances, and the query is
    # done when the last answer is in. Each request is slow (1 s instead of 1 ms) with probability 1 / 100.
    cfg = sim_config(instances=100, service={"dist": "constant", "ms": 1.0},
                     delays=[{"dist": "constant", "ms": 1000.0, "probability": 0.01}])
    fan_out, n = 100, 5000
    out = simulate(build_plan(cfg, "none", 2, 1, bursts(n, fan_out, gap_s=3.0), cfg.delays[0]), cfg)
    per_request = latencies_ms(out)
    per_query = per_request.reshape(n, fan_out).max(axis=1)
    assert (per_request > 500).mean() == pytest.approx(0.01, abs=0.002)
    assert (per_query > 500).mean() == pytest.approx(1 - 0.99 ** 100, abs=0.025)  # 63%
    assert np.percentile(per_request, 50) < 2 and np.percentile(per_query, 50) > 1000


# -- failures: the runtime's rules one event at a time --------------------------------------------------

def reference(plan, service_s: float):
    """The runtime's recovery rules in simulated time, one event at a time (constant service, no overhead)."""
    k, r = plan.k, plan.r
    roles = np.asarray(plan.roles)
    fail_at = np.full(len(roles), np.inf)
    for i, t in plan.failures.items():
        fail_at[i] = t
    n = len(plan.queries.arrival)
    done = np.full(n, np.inf)
    recon = np.zeros(n, dtype=bool)
    retried = np.zeros(n, dtype=bool)
    free = np.full(len(roles), -np.inf)
    events = []  # (time, order, kind, payload): finishes before failures at the same time
    seq = [0]

    def push(t, kind, payload):
        seq[0] += 1
        heapq.heappush(events, (t, {"finish": 0, "fail": 1, "dispatch": 2}[kind], seq[0], kind, payload))

    on_instance = {i: [] for i in range(len(roles))}

    def send(i, t, s, key):
        start = max(t, free[i])
        free[i] = start + s
        entry = {"key": key, "finish": start + s, "lost": False, "inst": i}
        on_instance[i].append(entry)
        push(start + s, "finish", entry)

    coded = plan.strategy == "coded"
    if coded:
        have = plan.members < 0
        have = np.concatenate([have, np.zeros((len(have), r), dtype=bool)], 1)
        lost = np.zeros(have.shape, dtype=bool)
        pending = np.zeros(len(have), dtype=int)
        np.add.at(pending, plan.group, 1)
    for req in range(len(plan)):
        push(plan.time[req], "dispatch", req)
    for i, t in plan.failures.items():
        push(t, "fail", i)

    def answer(q, t, reconstructed):
        if done[q] == np.inf:
            done[q], recon[q] = t, reconstructed

    def retry(q, failed, t):
        for step in range(1, len(roles) + 1):
            i = (failed + step) % len(roles)
            if roles[i] == ROLE_F and fail_at[i] > t:
                retried[q] = True
                send(i, t, service_s, ("retry", q))
                return
        raise AssertionError("no live F instance")

    def failure(key, inst, t):
        kind, x = key
        if kind == "retry":
            retry(x, inst, t)
            return
        if coded:
            g = plan.group[x]
            lost[g, plan.slot[x]] = True
            pending[g] -= 1
            if have[g].sum() + pending[g] >= k:
                return
            for s, q in enumerate(plan.members[g]):
                if q >= 0 and done[q] == np.inf and lost[g, s] and not retried[q]:
                    retry(q, max(inst, 0), t)
            return
        q = plan.query[x]
        if plan.strategy == "replicate":
            other = [y for y in np.nonzero(plan.query == q)[0] if y != x][0]
            if not state.get(("gone", other)) and done[q] == np.inf:
                state[("gone", x)] = True
                return  # the other copy is still coming
        if done[q] == np.inf:
            retry(q, max(inst, 0), t)

    state = {}
    while events:
        t, _, _, kind, payload = heapq.heappop(events)
        if kind == "dispatch":
            req = payload
            i = plan.instance[req]
            if i < 0:
                state[("gone", req)] = True
                failure(("plan", req), -1, t)
            else:
                send(i, t, (service_s + plan.delay[req]) * plan.factor[req], ("plan", req))
        elif kind == "fail":
            for entry in on_instance[payload]:
                if entry["finish"] > t and not entry["lost"]:
                    entry["lost"] = True
                    if entry["key"][0] == "plan":
                        state[("gone", entry["key"][1])] = True
                    failure(entry["key"], payload, t)
        elif not payload["lost"]:
            kind_, x = payload["key"]
            if kind_ == "retry":
                answer(x, t, False)
                continue
            state[("gone", x)] = True
            q = plan.query[x]
            if not coded:
                answer(q, t, False)
                continue
            g = plan.group[x]
            have[g, plan.slot[x]] = True
            pending[g] -= 1
            if q >= 0:
                answer(q, t, False)
            if have[g].sum() >= k:
                for q2 in plan.members[g]:
                    if q2 >= 0:
                        answer(q2, t, True)
    return done, recon, retried


FAILURE_CASES = {
    "none, one instance fails": ("none", [{"instance": 1, "at_ms": 1000}]),
    "replicate, both copies of even queries lost": ("replicate", [{"instance": 0, "at_ms": 900},
                                                                  {"instance": 1, "at_ms": 1200}]),
    "coded, a data instance fails (decoded)": ("coded", [{"instance": 0, "at_ms": 1000}]),
    "coded, a data and the parity instance fail (retried)": ("coded", [{"instance": 2, "at_ms": 800},
                                                                        {"instance": 0, "at_ms": 1000}]),
    "equal-resources, retries lost to a second failure (retried)": ("equal-resources",
                                                                     [{"instance": 1, "at_ms": 1000},
                                                                      {"instance": 2, "at_ms": 1010}]),
}


@pytest.mark.parametrize("case", FAILURE_CASES)
def test_failures_are_recovered_as_the_runtimes_rules_say_event_by_event(case):
    strategy, failures = FAILURE_CASES[case]
    cfg = sim_config(instances=2, num_queries=300, failures=failures, group_timeout_ms=30.0,
                     service={"dist": "constant", "ms": 20.0},
                     delays=[{"dist": "exponential", "mean_ms": 60.0, "probability": 0.5}])
    queries = make_queries(cfg, 25.0, np.zeros(10, dtype=int))
    plan = build_plan(cfg, strategy, 2, 1, queries, cfg.delays[0])
    out = simulate(plan, cfg)
    done, recon, retried = reference(plan, 0.020)
    assert np.all(np.isfinite(out.done)) and (out.answers == 1).all()
    assert np.allclose(out.done, done, rtol=0, atol=1e-9)
    assert np.array_equal(out.reconstructed, recon)
    assert np.array_equal(out.retried, retried)
    if "retried" in case or "replicate" in case:
        assert retried.any()  # the case exercises retries
    if "decoded" in case:
        assert recon.any() and not retried.any()


def test_no_live_f_instance_is_a_user_error():
    from util.errors import UserError

    cfg = sim_config(instances=2, failures=[{"instance": 0, "at_ms": 10}, {"instance": 1, "at_ms": 10}],
                     service={"dist": "constant", "ms": 50.0})
    plan = build_plan(cfg, "none", 2, 1, bursts(20, 1, gap_s=0.001), cfg.delays[0])
    with pytest.raises(UserError, match="Every instance holding F has failed"):
        simulate(plan, cfg)


# -- seeds, profiles ------------------------------------------------------------------------------------

def test_a_seed_reproduces_the_simulation_and_another_seed_changes_it():
    def run(seed):
        cfg = sim_config(seed=seed, delays=[{"dist": "pareto", "scale_ms": 1.0, "alpha": 1.5}])
        queries = make_queries(cfg, 2000.0, np.zeros(10, dtype=int))
        return simulate(build_plan(cfg, "coded", 2, 1, queries, cfg.delays[0]), cfg).done

    assert np.array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(1))


def test_a_profile_gives_each_instance_its_own_measured_service(tmp_path):
    # Instance 1 (the second F actor) measured at 30 ms, instance 0 at 1 ms; no overhead measured on 0.
    path = tmp_path / "profile.csv"
    lines = ["role,actor,compute_ms,overhead_ms"] + ["-1,0,1.0,"] * 5 + ["-1,1,30.0,2.0"] * 5
    path.write_text("\n".join(lines) + "\n")
    cfg = sim_config(instances=2, profile=str(path))
    out = simulate(build_plan(cfg, "none", 2, 1, bursts(100, 2), cfg.delays[0]), cfg)
    lat = latencies_ms(out)
    # Instance 0 has no overhead of its own, so it draws from every measured one (all 2 ms).
    assert np.allclose(lat[0::2], 3.0) and np.allclose(lat[1::2], 32.0)
    assert read_profile(str(path))["compute_ms"].tolist() == [1.0] * 5 + [30.0] * 5


def test_bad_sim_keys_name_the_key():
    from util.errors import ConfigError

    with pytest.raises(ConfigError, match="'service'.*probability"):
        sim_config(service={"dist": "exponential", "mean_ms": 1.0, "probability": 0.5})
    with pytest.raises(ConfigError, match="'service'"):
        sim_config(service={"dist": "exponential"})
    with pytest.raises(ConfigError, match="'service'"):
        sim_config(service=3)


# -- against the Ray runtime, and through python -m serve ----------------------------------------------

def query_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def ray_sim_mismatch(tmp_path: Path, base: dict) -> str:
    """Serve ``base`` on Ray, then simulate it with the Ray run's profile; '' when they agree, else why not.

    Agreement: within 20 ms on at least 90% of queries, and within 10% + 20 ms on p50 and p90.
    """
    from serve.cli import serve_all

    with open(os.devnull, "w") as quiet:
        serve_all(validate({**base, "engine": "ray", "out_dir": str(tmp_path / "ray")}), out=quiet)
        profile = tmp_path / "ray" / "setting00" / "profile.csv"
        measured = read_profile(str(profile))
        served = sum(int(r["ok"]) for s in base["strategies"]
                     for r in query_rows(tmp_path / "ray" / "setting00" / s / "requests.csv"))
        assert len(measured["compute_ms"]) == served > 2 * 20 + 20  # every request served: copies, data, parities
        serve_all(validate({**base, "engine": "sim", "profile": str(profile), "out_dir": str(tmp_path / "sim")}),
                  out=quiet)
    for strategy in base["strategies"]:
        ray_rows = query_rows(tmp_path / "ray" / "setting00" / strategy / "queries.csv")
        sim_rows = query_rows(tmp_path / "sim" / "setting00" / strategy / "queries.csv")
        assert [r["image"] for r in ray_rows] == [r["image"] for r in sim_rows]  # same queries: never noise
        ray_ms = np.array([float(r["latency_ms"]) for r in ray_rows])
        sim_ms = np.array([float(r["latency_ms"]) for r in sim_rows])
        close = np.mean(np.abs(ray_ms - sim_ms) <= 20.0)
        if close < 0.9:
            return f"{strategy}: only {close:.0%} of queries within 20 ms (differences {np.round(ray_ms - sim_ms)})"
        for p in (50, 90):
            got, want = np.percentile(sim_ms, p), np.percentile(ray_ms, p)
            if abs(got - want) > 0.1 * want + 20:
                return f"{strategy}: p{p} {got:.1f} ms simulated, {want:.1f} ms on Ray"
    return ""


def test_the_simulator_matches_ray_query_by_query_when_injected_delays_dominate(tmp_path, digits_run_folder, local_ray):
    """Same config, ``engine`` switched, the ray run's profile as the simulator's service times.

    Tolerance: 20 ms per query, for at least 90% of queries, and 10% + 20 ms on p50 and p90. The injected
    delays (exponential, mean 150 ms, with queueing at load 0.4) spread latencies over hundreds of
    milliseconds, so a simulator that got queueing, decoding or replicas wrong misses by far more; Ray's own
    latency on this shared 2-core machine is about 2 ms at the median but can pass 100 ms on a few requests
    (the frontend, the actors and other jobs share the cores), which the 10% of slack absorbs. On a machine
    loaded enough that more than 2 of the 20 queries meet such a spike, the pair is run once more with
    another seed (the reason is logged as a warning): a wrong simulator misses both times, noise rarely does.
    """
    base = {"runs": [digits_run_folder], "rates": [5], "num_queries": 20, "instances": 2,
            "strategies": ["replicate", "coded"], "delays": [{"dist": "exponential", "mean_ms": 150}],
            "group_timeout_ms": 50, "plot": False}
    why = ray_sim_mismatch(tmp_path / "first", base)
    if why:
        warnings.warn(f"the simulator missed the Ray run ({why}); running the comparison once more")
        why = ray_sim_mismatch(tmp_path / "second", {**base, "seed": 1})
    assert not why, why


def test_python_m_serve_runs_the_simulator_with_served_accuracy(tmp_path, digits_run_folder):
    import torch

    from serve.cli import main as serve_main
    from coders.code import load_code

    cfg = {"runs": [digits_run_folder], "engine": "sim", "rates": [400], "num_queries": 3000, "instances": 2,
           "strategies": ["none", "coded"], "delays": [{"dist": "exponential", "mean_ms": 5}],
           "service": {"dist": "exponential", "mean_ms": 1.0}, "out_dir": str(tmp_path / "out"), "plot": False}
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(cfg))
    assert serve_main([str(path)]) == 0
    loaded = load_code(digits_run_folder)
    x, y = loaded.splits.split("test")
    with torch.no_grad():
        f_pred = loaded.code.base(x).argmax(1).numpy()
    none = query_rows(tmp_path / "out" / "setting00" / "none" / "queries.csv")
    assert all(int(r["predicted"]) == f_pred[int(r["image"])] for r in none)
    coded = query_rows(tmp_path / "out" / "setting00" / "coded" / "queries.csv")
    own = [r for r in coded if r["reconstructed"] == "0"]
    recon = [r for r in coded if r["reconstructed"] == "1"]
    assert len(recon) > 300 and all(int(r["predicted"]) == f_pred[int(r["image"])] for r in own)
    # Reconstructions are the decoder's, not F's: they disagree with F on some queries (a 2-epoch code).
    assert any(int(r["predicted"]) != f_pred[int(r["image"])] for r in recon)


def test_reconstructions_equal_the_decoder_on_the_outputs_in_hand(digits_run_folder):
    import torch

    from coders.code import load_code

    loaded = load_code(digits_run_folder)
    code = loaded.code
    x, y = loaded.splits.split("test")
    cfg = sim_config(instances=2, num_queries=400, delays=[{"dist": "exponential", "mean_ms": 5}])
    queries = make_queries(cfg, 300.0, y.numpy())
    plan = build_plan(cfg, "coded", code.k, code.r, queries, cfg.delays[0])
    out = simulate(plan, cfg, code=code, inputs=x)
    assert out.reconstructed.sum() > 20
    # Offline, group by group: the outputs that had arrived by the decoding moment (the k-th arrival).
    req_done = dict(zip(zip(plan.group.tolist(), plan.slot.tolist()),
                        out.requests["done"][:len(plan)].tolist()))
    checked = 0
    for g, members in enumerate(plan.members):
        if not any(q >= 0 and out.reconstructed[q] for q in members):
            continue
        times = np.array([req_done.get((g, s), -np.inf) if (s >= code.k or members[s] >= 0) else -np.inf
                          for s in range(code.k + code.r)])
        available = torch.as_tensor(times <= np.sort(times)[code.k - 1])[None]
        xg = torch.stack([x[queries.index[q]] if q >= 0 else torch.zeros_like(x[0]) for q in members])[None]
        with torch.no_grad():
            fx = code.base(xg[0])[None]
            outputs = torch.cat([fx, code.parity_outputs(code.encode(xg))], 1)
            recon = code.decode(outputs, available)[0]
        for s, q in enumerate(members):
            if q >= 0 and out.reconstructed[q]:
                assert out.predicted[q] == int(recon[s].argmax())
                checked += 1
    assert checked == out.reconstructed.sum()


def test_bad_sim_config_exits_2_naming_the_key(tmp_path, digits_run_folder):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"runs": [digits_run_folder], "engine": "sim", "service": {"dist": "gamma"}}))
    proc = subprocess.run([sys.executable, "-m", "serve", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "'service'" in proc.stderr and "Traceback" not in proc.stderr


# -- the map --------------------------------------------------------------------------------------------

def write_map_config(tmp_path, **overrides) -> Path:
    raw = {"instances": 20, "num_queries": 20000, "service": {"dist": "exponential", "mean_ms": 1.0}, "batch_size": 1,
           "delays": [{"dist": "constant", "ms": 20}], "group_timeout_ms": 5.0, "out_dir": str(tmp_path / "map"),
           "strategies": ["equal-resources", "replicate", "coded"],
           "map": {"loads": [0.2, 0.8], "straggler_rates": [0.01], "k_vals": [2], "r_vals": [2]}, **overrides}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(raw))
    return path


def test_the_map_compares_at_equal_cost_and_finds_where_coding_wins(tmp_path, capsys):
    from serve.map import main as map_main

    assert map_main([str(write_map_config(tmp_path))]) == 0
    rows = query_rows(tmp_path / "map" / "map.csv")
    assert len(rows) == 2 and (tmp_path / "map" / "map.png").is_file()
    for row in rows:
        budget = int(row["budget"])  # m + r ceil(m / k) = 20 + 2 * 10
        assert budget == 40 and int(row["coded_instances"]) == int(row["equal-resources_instances"]) == budget
        assert int(row["replicate_instances"]) == budget
        p999 = {s: float(row[f"{s}_p99.9_ms"]) for s in ("equal-resources", "replicate", "coded")}
        ranked = sorted(p999, key=p999.get)
        assert row["winner"] == ranked[0]
        assert float(row["factor"]) == pytest.approx(p999[ranked[1]] / p999[ranked[0]])
    low, high = sorted(rows, key=lambda r: float(r["load"]))
    # Light load: a straggler is rebuilt from the group's other outputs, so coding wins the tail. At 0.8 of
    # the budget the data instances alone carry 0.8 x 40 / 20 = 1.6 of their capacity: coding loses badly.
    assert low["winner"] == "coded" and float(low["factor"]) > 1.3
    assert high["winner"] == "equal-resources" and float(high["coded_gain"]) < 0.3
    assert "wins p99.9" in capsys.readouterr().out


@pytest.mark.parametrize("change,key", [
    ({"map": {"loads": [0]}}, "'map.loads'"),
    ({"map": {"k_vals": [2.5]}}, "'map.k_vals'"),
    ({"map": {"straggler_rate": [0.1]}}, "'map.straggler_rate'"),
    ({"rates": [10]}, "'rates'"),
    ({"delays": [{"dist": "none"}]}, "'delays'"),
    ({"strategies": ["none", "coded"]}, "'strategies'"),
    ({"service": {"dist": "pareto", "scale_ms": 1, "alpha": 0.5}}, "'service'"),
])
def test_bad_map_configs_exit_2_naming_the_key(tmp_path, capsys, change, key):
    from serve.map import main as map_main

    assert map_main([str(write_map_config(tmp_path, **change))]) == 2
    err = capsys.readouterr().err
    assert key in err and not (tmp_path / "map" / "map.csv").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "map").glob("*.json")), ids=lambda p: p.name)
def test_shipped_map_configs_are_valid(path):
    from serve.map import read_map_config

    cfg, lists = read_map_config(path)
    assert cfg.engine == "sim" and all(lists.values())


def test_interference_is_refused_by_the_simulator():
    from util.errors import ConfigError

    with pytest.raises(ConfigError, match="'interference'"):
        sim_config(interference={"instances": [0], "processes": 1})


def test_a_failure_loses_only_unfinished_requests_and_the_retry_queues_behind_the_live_instances_work():
    # Four queries at t = 0 on two instances (100 ms each): instance 0 serves q0 (done 0.1 s), then q2.
    # It fails at 0.1005 s: q0 is already answered, q2 is lost and sent again to instance 1, where it waits
    # for q1 and q3 (done 0.1 and 0.2 s) and is answered at 0.3 s.
    cfg = sim_config(instances=2, service={"dist": "constant", "ms": 100.0},
                     failures=[{"instance": 0, "at_ms": 100.5}])
    out = simulate(build_plan(cfg, "none", 2, 1, bursts(1, 4), cfg.delays[0]), cfg)
    assert np.allclose(out.done, [0.1, 0.1, 0.3, 0.2])
    assert out.retried.tolist() == [False, False, True, False]
    assert out.requests["ok"].tolist() == [True, True, False, True, True]
