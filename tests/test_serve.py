"""Serving on Ray (serve/): plans, routing, stragglers, failures and bad configs.

The tests that serve for real share one local Ray for the whole module
(``ray.init`` costs about 10 s) and inject delays of hundreds of
milliseconds, far above Ray's own few-millisecond latency on this machine.
"""
import csv
import json
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from serve.cli import main as serve_main
from serve.cli import serve_all
from serve.config import validate
from serve.plan import build_plan, form_groups, make_queries, pool_roles
from coders.code import load_code

ROOT = Path(__file__).resolve().parents[1]


def serve_config(tmp_path, digits_run_folder, **overrides):
    raw = {"runs": [digits_run_folder], "rates": [20], "num_queries": 20, "instances": 2, "num_cpus": 2,
           "out_dir": str(tmp_path / "out"), "plot": False, **overrides}
    return validate(raw)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# -- plans (no Ray) --------------------------------------------------------------------------------

def plan_for(tmp_path, digits_run_folder, strategy, n=40, **overrides):
    cfg = serve_config(tmp_path, digits_run_folder, num_queries=n, **overrides)
    queries = make_queries(cfg, 50.0, np.arange(100) % 10)
    return build_plan(cfg, strategy, 2, 1, queries, cfg.delays[0], 0), cfg


def test_strategies_route_as_documented(tmp_path, digits_run_folder):
    none, _ = plan_for(tmp_path, digits_run_folder, "none")
    assert np.array_equal(none.instance, np.arange(40) % 2) and none.num_instances == 2
    er, _ = plan_for(tmp_path, digits_run_folder, "equal-resources")
    assert np.array_equal(er.instance, np.arange(40) % 3) and er.num_instances == 3
    rep, _ = plan_for(tmp_path, digits_run_folder, "replicate")
    assert rep.num_instances == 4 and len(rep) == 80
    for q in range(40):
        copies = rep.instance[rep.query == q]
        assert len(copies) == 2 and copies[0] != copies[1]
    coded, _ = plan_for(tmp_path, digits_run_folder, "coded", group_timeout_ms=10_000)
    assert coded.num_instances == 3 and pool_roles("coded", 2, 2, 1) == [-1, -1, 0]
    data = coded.query >= 0
    assert np.array_equal(coded.instance[data], coded.query[data] % 2)
    assert set(coded.instance[~data]) == {2} and (~data).sum() == 20  # one parity per group of two


def test_groups_close_at_the_kth_arrival_or_the_timeout():
    arrival = np.array([0.0, 0.001, 0.5, 0.6, 0.601, 0.602, 2.0])
    members, closed = form_groups(arrival, 3, 0.2)
    assert members.tolist() == [[0, 1, -1], [2, 3, 4], [5, -1, -1], [6, -1, -1]]
    assert np.allclose(closed, [0.2, 0.601, 0.802, 2.2])


def test_a_seed_reproduces_arrivals_images_and_delays(tmp_path, digits_run_folder):
    delay = {"delays": [{"dist": "pareto", "scale_ms": 5, "alpha": 1.5, "probability": 0.3}],
             "slowdown": {"fraction": 0.3, "factor": 4, "period_ms": 100}}
    a, _ = plan_for(tmp_path, digits_run_folder, "coded", **delay)
    b, _ = plan_for(tmp_path, digits_run_folder, "coded", **delay)
    c, _ = plan_for(tmp_path, digits_run_folder, "coded", seed=1, **delay)
    for field in ("time", "instance", "query", "delay", "factor"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.delay, c.delay) and not np.array_equal(a.time, c.time)
    assert (a.delay > 0).any() and (a.delay == 0).any() and (a.factor > 1).any()


def test_requests_after_a_failure_go_to_a_live_instance_of_the_same_role(tmp_path, digits_run_folder):
    plan, _ = plan_for(tmp_path, digits_run_folder, "coded", n=200, failures=[{"instance": 0, "at_ms": 1000}])
    late = plan.time >= 1.0
    assert late.any() and not np.any(plan.instance[late] == 0)
    assert np.all(plan.instance[late & (plan.query >= 0)] == 1)  # data requests stay on F instances
    assert np.any(plan.instance[~late] == 0)


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "serve").glob("*.json")), ids=lambda p: p.name)
def test_shipped_serving_configs_follow_the_schema(path):
    from serve.config import ServeConfig, check_delay
    from coders.config import read_json_config, validate_schema

    cfg = validate_schema(read_json_config(path, ""), ServeConfig, str(path))
    for delay in cfg.delays:
        check_delay(delay, str(path))
    assert cfg.runs and set(cfg.strategies) <= {"none", "equal-resources", "replicate", "coded"}


# -- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, key", [
    ({"rate": [10]}, "'rate'"),
    ({"delays": [{"dist": "gamma", "mean_ms": 3}]}, "'delays'"),
    ({"delays": [{"dist": "exponential"}]}, "'delays'"),
    ({"strategies": ["coded", "raid"]}, "'strategies'"),
    ({"failures": [{"instance": 9, "at_ms": 10}]}, "'failures'"),
    ({"rates": [0]}, "'rates'"),
    ({"runs": ["/nonexistent/run"]}, "'runs'"),
    ({"checkpoint": "epoch7.pt"}, "'checkpoint'"),
    ({"out_dir": ""}, "'out_dir'"),
])
def test_bad_configs_exit_2_naming_the_key(tmp_path, digits_run_folder, capsys, bad, key):
    raw = {"runs": [digits_run_folder], "out_dir": str(tmp_path / "out"), **bad}
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(raw))
    assert serve_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_bad_config_is_one_paragraph_from_the_command_line(tmp_path):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"runs": [str(tmp_path)], "num_querys": 5}))
    proc = subprocess.run([sys.executable, "-m", "serve", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "num_querys" in proc.stderr and "num_queries" in proc.stderr and "Traceback" not in proc.stderr


# -- serving for real, on one local Ray -------------------------------------------------------------



def outcome_files(cfg, strategy):
    folder = Path(cfg.out_dir) / "setting00" / strategy
    return rows(folder / "queries.csv"), rows(folder / "requests.csv"), json.loads((folder / "summary.json").read_text())


def test_a_slow_instances_queries_are_answered_by_the_decoder(local_ray, tmp_path, digits_run_folder):
    # Groups always fill (long timeout), so slot 0 of every group goes to instance 0, which is 400 ms slow.
    cfg = serve_config(tmp_path, digits_run_folder, strategies=["coded"], num_queries=16, group_timeout_ms=10_000,
                       delays=[{"dist": "constant", "ms": 400, "instances": [0]}])
    serve_all(cfg, out=open("/dev/null", "w"))
    queries, requests, summary = outcome_files(cfg, "coded")
    assert [int(r["query"]) for r in queries] == list(range(16))
    recon = [int(r["reconstructed"]) for r in queries]
    assert recon == [1, 0] * 8  # every query of instance 0, and none of the others
    assert summary["reconstructed"] == 0.5

    # The served answers equal the decoder's output computed offline from the other k outputs.
    code = load_code(digits_run_folder).code
    x, _ = load_code(digits_run_folder).splits.split("test")
    images = torch.tensor([int(r["image"]) for r in queries])
    predicted = torch.tensor([int(r["predicted"]) for r in queries])
    groups = x[images].view(8, 2, *x.shape[1:])
    offline = code(groups, torch.tensor([[False, True, True]] * 8))
    assert torch.equal(predicted.view(8, 2), offline.argmax(-1))
    assert {int(r["instance"]) for r in requests} == {0, 1, 2}


def test_every_strategy_answers_every_query_exactly_once(digits_pool, tmp_path, digits_run_folder):
    from serve.runtime import Frontend

    cfg = serve_config(tmp_path, digits_run_folder, num_queries=30, rates=[40],
                       delays=[{"dist": "exponential", "mean_ms": 60, "probability": 0.3}])
    loaded = load_code(digits_run_folder)
    x, y = loaded.splits.split("test")
    queries = make_queries(cfg, 40.0, y.numpy())
    pad = loaded.code.base(torch.zeros(1, *x.shape[1:]))[0].detach()
    for i, strategy in enumerate(("none", "equal-resources", "replicate", "coded")):
        plan = build_plan(cfg, strategy, 2, 1, queries, cfg.delays[0], i)
        outcome = Frontend(plan, digits_pool.actors_for(plan.roles), loaded.code, x, pad).run()
        assert outcome.answers.tolist() == [1] * 30, strategy
        assert np.all(outcome.done >= outcome.arrival)
        served = outcome.requests["instance"]
        expected = {"none": {0, 1}, "equal-resources": {0, 1, 2}, "replicate": {0, 1, 2, 3},
                    "coded": {0, 1, 2}}[strategy]
        assert set(served.tolist()) <= expected
        # Own outputs are F's argmax on the query's image.
        own = ~outcome.reconstructed
        with torch.no_grad():
            f_pred = loaded.code.base(x[outcome.image[own]]).argmax(1).numpy()
        assert np.array_equal(outcome.predicted[own], f_pred)


def test_an_nworker_group_answers_without_its_straggler_as_the_code_decodes_offline(digits_pool, tmp_path,
                                                                                    nworker_run_folder):
    """An N-worker Berrut run (K = 2, N = 3, S = 1) on Ray: instance 0, which gets coded input 0 of every group,
    is 300 ms late, so every group is decoded from its other N - S = 2 outputs long before it answers; the
    served outputs equal the code's own computation (encode, F, decode) offline from those same two outputs."""
    from serve.plan import code_layout
    from serve.runtime import Frontend, fingerprint

    cfg = serve_config(tmp_path, nworker_run_folder, strategies=["nworker"], num_queries=4, rates=[50],
                       group_timeout_ms=10_000, delays=[{"dist": "constant", "ms": 300, "instances": [0]}])
    loaded = load_code(nworker_run_folder)
    code, (x, y) = loaded.code, loaded.splits.split("test")
    assert code_layout(code) == (2, 1, 2)
    plan = build_plan(cfg, "nworker", *code_layout(code)[:2], make_queries(cfg, 50.0, y.numpy()), cfg.delays[0],
                      need=code_layout(code)[2])
    assert fingerprint([code.base]) == fingerprint([digits_pool.code.base])  # the pool's instances hold this F
    frontend = Frontend(plan, digits_pool.actors_for(plan.roles), code, x, code.base(torch.zeros(1, *x.shape[1:]))[0])
    outcome = frontend.run()
    assert outcome.answers.tolist() == [1] * 4 and outcome.reconstructed.all()
    assert ((outcome.done - outcome.arrival) < 0.25).all()  # none waited for the 300-ms straggler
    available = torch.as_tensor(frontend.policy.available)
    assert available.tolist() == [[False, True, True]] * 2  # the first N - S outputs: never the straggler's
    with torch.no_grad():
        offline = code(x[torch.as_tensor(plan.queries.index)].view(2, 2, *x.shape[1:]), available)
    assert torch.allclose(torch.as_tensor(outcome.outputs).view(2, 2, -1), offline, atol=1e-5)
    assert np.array_equal(outcome.predicted, offline.argmax(-1).flatten().numpy())


def test_a_killed_instance_loses_no_query(local_ray, tmp_path, digits_run_folder):
    # Instance 0 is slow, so requests queue on it, and it is killed while they wait.
    cfg = serve_config(tmp_path, digits_run_folder, strategies=["none", "coded"], num_queries=30, rates=[30],
                       delays=[{"dist": "constant", "ms": 150, "instances": [0]}],
                       failures=[{"instance": 0, "at_ms": 300}])
    serve_all(cfg, out=open("/dev/null", "w"))
    for strategy in ("none", "coded"):
        queries, requests, _ = outcome_files(cfg, strategy)
        assert sorted(int(r["query"]) for r in queries) == list(range(30))
        failed = [r for r in requests if r["ok"] == "0"]
        assert failed and all(r["instance"] == "0" for r in failed), strategy
        if strategy == "none":
            assert any(r["retried"] == "1" for r in queries)
        else:  # the group's other outputs suffice: recovered by reconstruction, not sent again
            assert any(r["reconstructed"] == "1" for r in queries)
        late = [r for r in requests if float(r["sent_s"]) > 0.35]
        assert late and all(r["instance"] != "0" for r in late)


def test_interference_processes_compete_while_on_and_are_gone_after():
    from serve.runtime import Instance

    inst = Instance(torch.nn.Linear(4, 3), threads=1, flush=True, device="cpu")
    assert inst.start_interference(2) == 2
    procs = list(inst.busy)
    time.sleep(0.2)
    assert all(p.poll() is None for p in procs)  # still running, competing for the CPU
    inst.stop_interference()
    assert all(p.poll() is not None for p in procs) and inst.busy == []


def test_an_instance_serves_its_module_with_the_injected_delay_and_factor():
    from serve.runtime import Instance

    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    inst = Instance(module, threads=1, flush=True, device="cpu")
    x = np.random.default_rng(0).random(4, dtype=np.float32)
    t = time.perf_counter()
    out, compute = inst.infer(x, 0.05, 3.0)
    took = time.perf_counter() - t
    assert np.allclose(out, module(torch.from_numpy(x)[None])[0].detach().numpy())
    assert took >= 0.15 and compute < took  # (compute + delay) x factor, slept rather than computed


def test_measured_latency_files_are_read_as_milliseconds(tmp_path):
    from serve.plan import read_latency_file, sample_delays
    from util.errors import ConfigError

    plain = tmp_path / "lat.txt"
    plain.write_text("1.5\n2.5\n\n10\n")
    assert read_latency_file(str(plain)).tolist() == [1.5, 2.5, 10.0]
    table = tmp_path / "lat.csv"
    table.write_text("instance,latency_ms\n0,3\n1,4\n")
    assert read_latency_file(str(table), "latency_ms").tolist() == [3.0, 4.0]
    drawn = sample_delays({"dist": "file", "path": str(plain)}, np.zeros(500, dtype=int), np.random.default_rng(0))
    assert set(np.round(drawn * 1000, 6)) == {1.5, 2.5, 10.0}
    bad = tmp_path / "bad.txt"
    bad.write_text("fast\n")
    with pytest.raises(ConfigError, match="bad.txt"):
        read_latency_file(str(bad))


def test_an_unreadable_latency_file_is_refused_before_any_work(tmp_path, digits_run_folder, capsys):
    bad = tmp_path / "latencies.txt"
    bad.write_text("fast\nslow\n")
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"runs": [digits_run_folder], "out_dir": str(tmp_path / "out"), "engine": "sim",
                                "delays": [{"dist": "file", "path": str(bad)}]}))
    assert serve_main([str(path)]) == 2
    assert "latencies.txt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# -- the backup strategy: a cheaper model on r/k extra instances -----------------------------------

@pytest.fixture(scope="module")
def backup_file(tmp_path_factory) -> str:
    """A logistic-regression backup model for digits, trained for two epochs."""
    from base_models.fit import main as train_f

    root = tmp_path_factory.mktemp("backup")
    assert train_f(["--dataset", "digits", "--model", "logistic", "--epochs", "2", "--root", str(root)]) == 0
    return str(root / "digits" / "logistic" / "model.pt")


def test_backup_sends_every_query_to_f_and_to_a_backup_instance(tmp_path, digits_run_folder):
    plan, _ = plan_for(tmp_path, digits_run_folder, "backup", strategies=["backup"],
                       backup_model={"model": "logistic", "file": __file__})
    assert plan.roles == [-1, -1, -2] and len(plan) == 80
    for q in range(40):
        copies = plan.instance[plan.query == q]
        assert copies.tolist() == [q % 2, 2]


def test_backup_needs_a_backup_model(tmp_path, digits_run_folder, capsys):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"runs": [digits_run_folder], "strategies": ["none", "backup"],
                                "out_dir": str(tmp_path / "out")}))
    assert serve_main([str(path)]) == 2
    assert "'backup_model'" in capsys.readouterr().err


# "ray" asks for the session's Ray only when it runs, so it joins the tests on it (tests/conftest.py) by name
@pytest.mark.parametrize("engine", ["sim", pytest.param("ray", marks=pytest.mark.xdist_group("ray"))])
def test_a_slow_f_instances_queries_are_answered_by_the_backup_model(engine, request, tmp_path, digits_run_folder,
                                                                      backup_file):
    if engine == "ray":
        request.getfixturevalue("local_ray")
    cfg = serve_config(tmp_path, digits_run_folder, strategies=["backup"], num_queries=16, engine=engine,
                       delays=[{"dist": "constant", "ms": 400, "instances": [0]}],
                       backup_model={"model": "logistic", "file": backup_file})
    serve_all(cfg, out=open("/dev/null", "w"))
    queries, _, summary = outcome_files(cfg, "backup")
    loaded = load_code(digits_run_folder)
    x, _ = loaded.splits.split("test")
    from serve.cli import load_backup

    backup = load_backup(cfg, loaded.splits)
    with torch.no_grad():
        images = torch.tensor([int(r["image"]) for r in queries])
        by_backup = backup(x[images]).argmax(1).tolist()
        by_f = loaded.code.base(x[images]).argmax(1).tolist()
    for q, row in enumerate(queries):
        approximate = row["reconstructed"] == "1"
        if q % 2 == 0:  # F instance 0 is 400 ms slow: the backup answers first
            assert approximate, q
        assert int(row["predicted"]) == (by_backup[q] if approximate else by_f[q])
    assert summary["instances"] == 3
