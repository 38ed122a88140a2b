"""Serving and the simulator as a hostile user meets them: signals, bad input refused up front, sizes bounded.

Every refusal here is exit 2 with one paragraph naming the key or flag, before Ray
starts and before anything is written: the tests replace Ray's start and the
serving of a setting (or a map cell) with a tripwire, so a check that comes after
the work began fails them, and they look for the output folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from util.signals import alive, descendants

ROOT = Path(__file__).resolve().parents[1]


# -- harness ---------------------------------------------------------------------------------------------

class WorkStarted(AssertionError):
    pass


@pytest.fixture
def tripwires(monkeypatch):
    """Ray's start, a setting's serving and a map cell raise: a refusal must come before them."""
    import serve.cli
    import serve.map
    import serve.runtime
    import util.ray_cluster

    def trip(*args, **kwargs):
        raise WorkStarted("work started before the config was refused")

    monkeypatch.setattr(serve.runtime, "start_ray", trip)
    monkeypatch.setattr(util.ray_cluster, "start_ray", trip)
    monkeypatch.setattr(serve.cli, "serve_setting", trip)
    monkeypatch.setattr(serve.map, "run_cell", trip)


@pytest.fixture
def no_hang():
    """A hang becomes a failure after 120 s instead of a stuck suite."""
    def hung(signum, frame):
        raise TimeoutError("the command hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def run_main(main, raw: dict, tmp_path: Path, capsys) -> tuple[int, str]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    try:
        code = main([str(path)])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


def serve_raw(tmp_path: Path, run: str, **overrides) -> dict:
    return {"runs": [run], "engine": "ray", "num_queries": 20, "rates": [20], "instances": 2, "plot": False,
            "out_dir": str(tmp_path / "out"), **overrides}


def map_raw(tmp_path: Path, **overrides) -> dict:
    return {"instances": 4, "num_queries": 2000, "service": {"dist": "exponential", "mean_ms": 1.0},
            "delays": [{"dist": "constant", "ms": 20}], "out_dir": str(tmp_path / "out"), "plot": False,
            "map": {"loads": [0.5], "straggler_rates": [0.01], "k_vals": [2], "r_vals": [1]}, **overrides}


def refused(code: int, err: str, needle: str, tmp_path: Path) -> None:
    assert code == 2, err[-2000:]
    assert needle in err, err[-2000:]
    assert "Traceback" not in err and err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert not (tmp_path / "out").exists(), "something was written before the refusal"


def serve_main(argv):
    from serve.cli import main

    return main(argv)


def map_main(argv):
    from serve.map import main

    return main(argv)


# -- every key of the serving and map schemas, one bad value at a time ------------------------------------

BIG = 10 ** 12
SERVE_CASES = [  # (key, bad value, overrides that make the key apply); every ServeConfig key appears
    ("runs", "save/run", {}), ("runs", ["/nonexistent/run"], {}), ("runs", [], {}),
    ("strategies", "coded", {}), ("strategies", ["coded", "raid"], {}), ("strategies", ["coded", "coded"], {}),
    ("rates", "fast", {}), ("rates", [-1], {}), ("rates", [1e9], {}),
    ("delays", {"dist": "none"}, {}), ("delays", [{"dist": "gamma"}], {}),
    ("delays", [{"dist": "constant", "ms": -1}], {}), ("delays", [{"dist": "constant", "ms": 1e12}], {}),
    ("num_queries", "many", {}), ("num_queries", 0, {}), ("num_queries", BIG, {}),
    ("warmup_queries", -1, {}), ("warmup_queries", 20, {}), ("warmup_queries", "x", {}),
    ("instances", "2", {}), ("instances", 0, {}), ("instances", 10 ** 9, {}),
    ("group_timeout_ms", -1, {}), ("group_timeout_ms", "x", {}),
    ("batch_size", 0, {}), ("batch_size", "x", {}), ("batch_size", 10 ** 9, {}), ("batch_wait_ms", -1, {}),
    ("batch_wait_ms", float("inf"), {}), ("batch_inflight", 0, {}), ("batch_adaptive_ms", 0, {}),
    ("batch_adaptive_ms", "fast", {}),
    ("slowdown", {"fraction": 2, "factor": 2, "period_ms": 10}, {}),
    ("slowdown", {"fraction": 0.1, "factor": 0.5, "period_ms": 10}, {}),
    ("slowdown", {"fraction": 0.1, "factor": 2, "period_ms": 1e-9}, {}),
    ("interference", {"instances": [0]}, {}), ("interference", {"instances": [99], "processes": 1}, {}),
    ("interference", {"instances": [0], "processes": 10 ** 6}, {}),
    ("failures", [{"instance": 0}], {}), ("failures", [{"instance": -1, "at_ms": 0}], {}),
    ("failures", [{"instance": 10 ** 9, "at_ms": 0}], {}),
    ("split", "validation", {}), ("split", 3, {}),
    ("checkpoint", "epoch7.pt", {}), ("checkpoint", 5, {}),
    ("seed", -1, {}), ("seed", 2 ** 64, {}), ("seed", "x", {}),
    ("engine", "gpu", {}), ("engine", 1, {}),
    ("address", 5, {}),
    ("num_cpus", 0, {}), ("num_cpus", "2", {}),
    ("instance_cpus", -1, {}), ("instance_cpus", "x", {}), ("instance_cpus", 1000, {}),
    ("instance_threads", 0, {}), ("instance_threads", "x", {}), ("instance_threads", 10 ** 6, {}),
    ("device", "tpu", {}), ("device", 3, {}),
    ("flush_denormal", "yes", {}),
    ("data_dir", 5, {}),
    ("out_dir", "", {}), ("out_dir", 5, {}),
    ("plot", "yes", {}),
    ("profile", "/nonexistent/profile.csv", {"engine": "sim"}), ("profile", 5, {"engine": "sim"}),
    ("backup_model", {"model": "logistic"}, {"strategies": ["none", "backup"]}),
    ("backup_model", {"model": "logistic", "file": "/nonexistent/model.pt"}, {"strategies": ["none", "backup"]}),
    ("service", 3, {"engine": "sim"}), ("service", {"dist": "constant", "ms": -1}, {"engine": "sim"}),
    ("service", {"dist": "constant", "ms": 1e12}, {"engine": "sim"}),
    ("app", 5, {}), ("app", {"bogus": 1}, {}), ("app", {"strategy": "raid"}, {}), ("app", {"run": 3}, {}),
    ("app", {"delay": 5}, {}), ("app", {"port": 70000}, {}), ("app", {"port": "80"}, {}), ("app", {"host": 5}, {}),
    ("app", {"max_queue": 0}, {}), ("app", {"max_batch": -1}, {}), ("app", {"max_body_bytes": "1MB"}, {}),
    ("app", {"retry_after_s": 0}, {}), ("app", {"strategy": "backup"}, {}),
    ("policies", 5, {}), ("policies", [5], {}), ("policies", [{"routing": "jsq"}], {}),
    ("policies", [{"strategy": "raid"}], {}), ("policies", [{"strategy": "coded", "routing": "fast"}], {}),
    ("policies", [{"strategy": "coded", "pool": "all"}], {}),
    ("policies", [{"strategy": "replicate", "pool": "shared"}], {}),
    ("policies", [{"strategy": "coded", "cancel": "yes"}], {}),
    ("policies", [{"strategy": "coded", "defer": {"ms": -1}}], {}),
    ("policies", [{"strategy": "coded", "defer": {"percentile": 200, "window": 10}}], {}),
    ("policies", [{"strategy": "coded", "defer": {"percentile": 90, "window": BIG}}], {}),
    ("policies", [{"strategy": "none", "defer": {"ms": 5}}], {}),
    ("policies", [{"strategy": "coded", "name": "a/b"}], {}), ("policies", [{"strategy": "coded", "name": "coded"}], {}),
    ("policies", [{"strategy": "coded", "bogus": 1}], {}),
    ("deadline_ms", -1, {"strategies": ["nworker"]}), ("deadline_ms", "soon", {"strategies": ["nworker"]}),
    ("deadline_ms", 5, {}),  # no nworker row reads it
    ("perturb", 5, {"strategies": ["nworker"]}), ("perturb", {"adversaries": -1}, {"strategies": ["nworker"]}),
    ("perturb", {"adversary": "flip"}, {"strategies": ["nworker"]}), ("perturb", {"bogus": 1}, {"strategies": ["nworker"]}),
    ("perturb", {"adversary_target": 3}, {"strategies": ["nworker"]}), ("perturb", {"adversaries": 1}, {}),
]
SECTIONS = ("app", "policies")  # their errors name the key inside: 'app.port', 'policies[0]'

MAP_CASES = [
    ("map", 5), ("map", {"bogus": [1]}),
    ("map.loads", "x"), ("map.loads", [0]), ("map.loads", [1e6]),
    ("map.straggler_rates", [2]), ("map.straggler_rates", "x"),
    ("map.k_vals", [0]), ("map.k_vals", [1.5]), ("map.k_vals", [100000]),
    ("map.r_vals", [0]), ("map.r_vals", ["1"]), ("map.r_vals", [10 ** 9]),
    ("runs", ["x"]), ("rates", [10]),
    ("num_queries", BIG), ("instances", 10 ** 9), ("service", {"dist": "constant", "ms": 0}),
]


def test_every_serving_config_key_is_tried():
    from serve.config import ServeConfig

    assert {key for key, _, _ in SERVE_CASES} == set(ServeConfig.__dataclass_fields__)


@pytest.mark.parametrize("key, value, extra", SERVE_CASES, ids=[f"{k}={json.dumps(v)[:30]}" for k, v, _ in SERVE_CASES])
def test_a_bad_serving_value_is_exit_2_before_any_work(key, value, extra, tmp_path, digits_run_folder, capsys,
                                                       tripwires, no_hang):
    raw = serve_raw(tmp_path, digits_run_folder, **extra)
    raw[key] = value
    code, err = run_main(serve_main, raw, tmp_path, capsys)
    refused(code, err, f"'{key}" if key in SECTIONS else f"'{key}'", tmp_path)


@pytest.mark.parametrize("key, value", MAP_CASES, ids=[f"{k}={json.dumps(v)[:30]}" for k, v in MAP_CASES])
def test_a_bad_map_value_is_exit_2_before_any_work(key, value, tmp_path, capsys, tripwires, no_hang):
    raw = map_raw(tmp_path)
    if key.startswith("map."):
        raw["map"] = {**raw["map"], key[4:]: value}
    else:
        raw[key] = value
    if key == "service":  # no work per request, and no straggler to add any
        raw["map"]["straggler_rates"] = [0]
    code, err = run_main(map_main, raw, tmp_path, capsys)
    refused(code, err, "'map" if key == "map" else f"'{key}'", tmp_path)


# -- checked too late before: now before Ray and before any file ------------------------------------------

@pytest.mark.parametrize("strategies", [["replicate", "none"], ["none"]])
def test_every_f_instance_failing_is_refused_before_ray_starts(strategies, tmp_path, digits_run_folder, capsys,
                                                             tripwires):
    raw = serve_raw(tmp_path, digits_run_folder, strategies=strategies,
                    failures=[{"instance": 0, "at_ms": 10}, {"instance": 1, "at_ms": 20}])
    code, err = run_main(serve_main, raw, tmp_path, capsys)
    refused(code, err, "'failures'", tmp_path)
    assert "strategy 'none'" in err


def test_a_map_whose_strategy_loses_every_f_instance_is_refused(tmp_path, capsys, tripwires):
    raw = map_raw(tmp_path, failures=[{"instance": i, "at_ms": 5} for i in range(4)])
    code, err = run_main(map_main, raw, tmp_path, capsys)
    refused(code, err, "'failures'", tmp_path)


@pytest.mark.parametrize("command", ["serve", "map"])
def test_an_out_dir_under_a_file_is_refused_first(command, tmp_path, digits_run_folder, capsys, tripwires):
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / "file" / "results")
    raw = serve_raw(tmp_path, digits_run_folder, out_dir=out) if command == "serve" else map_raw(tmp_path, out_dir=out)
    code, err = run_main(serve_main if command == "serve" else map_main, raw, tmp_path, capsys)
    refused(code, err, "'out_dir'", tmp_path)
    assert "is a file" in err


def test_huge_sizes_are_refused_with_the_figure(tmp_path, digits_run_folder, capsys, tripwires):
    code, err = run_main(serve_main, serve_raw(tmp_path, digits_run_folder, num_queries=BIG), tmp_path, capsys)
    refused(code, err, "'num_queries'", tmp_path)
    assert "TiB of memory" in err and "available" in err
    code, err = run_main(serve_main, serve_raw(tmp_path, digits_run_folder, rates=[1e9]), tmp_path, capsys)
    refused(code, err, "'rates'", tmp_path)
    assert "load" in err and "queries/s" in err


def test_a_map_instance_count_that_would_not_fit_is_refused_in_a_subprocess(tmp_path):
    """As a user runs it: before, this grew to 23.7 GB and was killed by the kernel after 80 s."""
    path = tmp_path / "map.json"
    path.write_text(json.dumps(map_raw(tmp_path, instances=10 ** 9)))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "serve.map", str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "'instances'" in proc.stderr and "GiB of memory" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    assert time.time() - t0 < 60


def test_a_load_above_one_runs_with_a_warning(tmp_path, digits_run_folder, capsys):
    raw = serve_raw(tmp_path, digits_run_folder, engine="sim", rates=[3000], strategies=["none"],
                    service={"dist": "constant", "ms": 1.0})
    code, err = run_main(serve_main, raw, tmp_path, capsys)
    assert code == 0 and "warning:" in err and "load 1.5" in err, err
    code, err = run_main(map_main, map_raw(tmp_path, map={"loads": [2], "straggler_rates": [0.01], "k_vals": [2],
                                                           "r_vals": [1]}), tmp_path, capsys)
    assert code == 0 and "warning:" in err and "'map.loads' holds 2" in err, err


def test_a_map_with_no_work_per_request_is_refused_not_divided_by_zero(tmp_path, capsys, tripwires):
    raw = map_raw(tmp_path, service={"dist": "constant", "ms": 0})
    raw["map"]["straggler_rates"] = [0, 0.01]
    code, err = run_main(map_main, raw, tmp_path, capsys)
    refused(code, err, "'service'", tmp_path)
    assert "straggler rate 0" in err


# -- signals ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
@pytest.mark.parametrize("sig, engine, code, said", [(signal.SIGINT, "sim", 130, "interrupted (Ctrl-C)"),
                                                     (signal.SIGTERM, "ray", 143, "terminated (SIGTERM)")])
def test_a_signal_stops_serving_with_one_line_and_leaves_no_ray_and_whole_settings(sig, engine, code, said,
                                                                                  tmp_path, digits_run_folder):
    pytest.importorskip("ray")
    out = tmp_path / "out"
    # Four settings; the signal comes once the first is written, while a later one is being served.
    raw = {"runs": [digits_run_folder], "engine": engine, "strategies": ["none", "coded"], "plot": False,
           "out_dir": str(out), "instances": 2, "num_cpus": 2}
    if engine == "ray":
        raw.update(num_queries=20, rates=[40, 2, 2, 2])
    else:
        raw.update(num_queries=50000, rates=[1000, 1001, 1002, 1003], service={"dist": "constant", "ms": 0.5})
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(raw))
    proc = subprocess.Popen([sys.executable, "-m", "serve", str(path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            # Python ignores Ctrl-C when started with SIGINT ignored (as by `cmd &`)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    family: set[int] = set()
    try:
        deadline = time.time() + 300
        while not (out / "setting00" / "setting.json").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, "the first setting never finished"
            family |= descendants(proc.pid)
            time.sleep(0.05)
        family |= descendants(proc.pid)
        proc.send_signal(sig)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err[-3000:]
    assert err.strip().startswith(said) and err.strip().count("\n") == 0, err[-3000:]
    assert (engine == "ray") == bool(family), "Ray runs in child processes; the simulator in none"
    deadline = time.time() + 30
    while any(alive(p) for p in family) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in family if alive(p)], "Ray processes of this command outlived it"
    finished = [json.loads(p.read_text())["name"] for p in sorted(out.glob("*/setting.json"))]
    assert finished and len(finished) < 4, finished  # stopped part way
    for name in finished:
        for strategy in raw["strategies"]:
            summary = json.loads((out / name / strategy / "summary.json").read_text())
            rows = (out / name / strategy / "queries.csv").read_text().splitlines()
            assert summary["queries"] == raw["num_queries"] == len(rows) - 1
    assert not list(out.rglob("*.tmp"))


def test_a_killed_writes_temporaries_are_removed_at_the_next_start_and_said(tmp_path, digits_run_folder, capsys):
    stale = [tmp_path / "out" / "setting00" / "none" / "queries.csv.k1ll3d.tmp",
             tmp_path / "out" / "setting00" / "setting.json.x7.tmp"]
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("half a file")
    keep = tmp_path / "out" / "notes.tmp"  # not a temporary of lcc's writes
    keep.write_text("mine")
    raw = serve_raw(tmp_path, digits_run_folder, engine="sim", strategies=["none"], num_queries=50)
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(raw))
    assert serve_main([str(path)]) == 0
    err = capsys.readouterr().err
    assert not any(p.exists() for p in stale) and keep.exists()
    assert "removed 1 temporary file(s)" in err and err.count("removed") == 2
    assert (tmp_path / "out" / "setting00" / "none" / "queries.csv").is_file()


# -- training: the last resume traceback --------------------------------------------------------------------

def test_resume_on_a_checkpoint_without_module_weights_is_exit_2_naming_the_file(digits_config, capsys):
    from train.cli import main
    from coders.code import load_code
    from util.errors import UserError

    path = digits_config(num_epoch=1)
    assert main([str(path)]) == 0
    current = next((Path(json.loads(path.read_text())["save_dir"])).rglob("current.pt"))
    state = torch.load(current, weights_only=True)
    del state["encoder"]
    torch.save(state, current)  # "a checkpoint from elsewhere with the right config"
    capsys.readouterr()
    assert main([str(path), "--resume", "--set", "num_epoch=2"]) == 2
    err = capsys.readouterr().err
    assert str(current) in err and "encoder" in err and "Traceback" not in err
    with pytest.raises(UserError, match="lacks the module weights encoder"):
        load_code(str(current.parent), "current.pt")


# -- names the user typed --------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, flag, key", [(["--dataset", "nope"], "--dataset", "datasets"),
                                              (["--val-size", "100000"], "--val-size", "val_size")])
def test_the_base_model_trainer_names_its_flags_not_config_keys(flags, flag, key, capsys, tmp_path):
    from base_models.fit import main

    assert main(["--epochs", "1", "--root", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert flag in err and f"'{key}'" not in err and "Config key" not in err


def test_modules_a_rename_moved_keep_their_old_names():
    import base_models.fit
    import base_models.train
    import bench.base_model_fit
    import bench.base_models

    assert base_models.train is base_models.fit and bench.base_models is bench.base_model_fit
    proc = subprocess.run([sys.executable, "-m", "base_models.train", "--dataset", "nope"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2 and "--dataset" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
