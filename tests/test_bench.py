"""The speed benchmark runs end to end and prints every figure it promises (no timing is asserted)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from bench import speed


def test_speed_benchmark_prints_every_setup_and_the_inference_table(data_dir, anchor_dir, capsys):
    weights = anchor_dir / "mnist" / "base-mlp" / "model.t7"
    code = speed.main(["--quick", "--steps", "2", "--data-dir", str(data_dir), "--device", "cpu",
                       "--base-model-file", str(weights)])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"dense fp32 matmul \(2048\^3\): [\d.]+ GFLOP/s; memory copy: [\d.]+ GB/s", out)
    for name in speed.SETUPS:
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        cells = re.split(r"\s{2,}", line.strip())
        groups, seconds, per_s, vs_original, gflop = cells[1:6]
        assert int(groups) == (27500 if "disjoint" in name else 55000)
        assert float(seconds) > 0 and float(gflop) > 0
        # groups/s is printed as a whole number and s/epoch to 0.01 s, so allow the rounding of both
        assert abs(float(per_s) - int(groups) / float(seconds)) <= max(0.6, 0.01 * float(per_s))
        assert vs_original.endswith("x") and float(vs_original[:-1]) > 0
    for model, weights in (("base-mlp", "reference"), ("resnet18", "random")):
        row = next(ln for ln in out.splitlines() if ln.startswith(model + " "))
        cells = row.split()
        assert float(cells[5]) > 0 and cells[6] == weights  # (E+D)/F, and which weights F had


def test_speed_benchmark_reports_a_bad_weights_path_as_one_error(data_dir, anchor_dir, capsys):
    code = speed.main(["--quick", "--steps", "1", "--only", "train", "--data-dir", str(data_dir), "--device", "cpu",
                       "--base-model-file", str(anchor_dir / "mnist")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "is a folder" in err and "Traceback" not in err


def test_fit_mode_times_whole_epochs_and_names_the_f_and_the_subnormal_mode(small_mnist_dir, anchor_dir, capsys):
    # the first 1,200 MNIST images: whole epochs through fit, in both subnormal modes, in seconds
    weights = anchor_dir / "mnist" / "base-mlp" / "model.t7"
    code = speed.main(["--quick", "--steps", "2", "--fit", "1", "--setup", "concat parity model", "--only", "train",
                       "--data-dir", str(small_mnist_dir), "--device", "cpu", "--base-model-file", str(weights),
                       "--flush-denormal", "both"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [re.split(r"\s{2,}", ln.strip()) for ln in out.splitlines() if ln.startswith("concat parity model ")]
    assert [row[11:13] for row in rows] == [["reference", "flushed"], ["reference", "kept"]]
    for row in rows:
        fit_s, fit_train_s = float(row[13]), float(row[14])
        assert fit_s > fit_train_s > 0  # the epoch through fit includes its evaluation and checkpoints


def test_fit_disagreement_is_reported_beyond_twenty_percent():
    row = {"name": "learned MLP", "F": "reference", "subnormals": "kept", "how": "15 steps x 860",
           "seconds": 10.0, "fit_train_s": 11.0}
    assert speed.fit_disagreements([{**row, "fit_s": 11.9}, {**row, "fit_s": 8.1}]) == []
    (slow,) = speed.fit_disagreements([{**row, "fit_s": 40.0}])
    assert "+300%" in slow and "'learned MLP' (F reference, subnormals kept)" in slow
    (fast,) = speed.fit_disagreements([{**row, "fit_s": 7.0}])
    assert "-30%" in fast


def test_seed_spread_per_class_figures_add_up_to_the_logged_degraded_accuracy(digits_run_folder, capsys):
    from pathlib import Path

    from bench import seed_spread

    folder = Path(digits_run_folder)
    rows = seed_spread.read_rows(folder)
    best = seed_spread.best_row(rows)
    base_acc, degraded, counts = seed_spread.per_class(folder, "test")
    # weighted by how many rebuilt outputs each class has, the classes give the run's own figure
    assert float((degraded * counts).sum() / counts.sum()) == pytest.approx(best["test_degraded_acc"], abs=1e-6)
    assert seed_spread.main([str(folder), str(folder), "--last", "2"]) == 0
    out = capsys.readouterr().out
    assert f"| {best['epoch']} | " in out and f"{100 * best['test_degraded_acc']:.2f}" in out
    class_rows = [line for line in out.splitlines() if re.match(r"\| \d+ \| \d", line)]
    assert len(class_rows) == len(counts) and all(line.endswith("| 0.00 |") for line in class_rows)


def test_seed_spread_wobble_measures_the_last_epochs_only():
    from bench import seed_spread

    rows = [{"epoch": e, "val_recon_acc": v} for e, v in enumerate([0.1, 0.5, 0.9, 0.8, 0.9])]
    sd, step = seed_spread.wobble(rows, 3)
    assert step == pytest.approx(0.1) and sd == pytest.approx(0.04714045, rel=1e-6)
    assert seed_spread.best_row(rows)["epoch"] == 2  # the first of equal best epochs, as best.pt keeps it


def test_seed_spread_refuses_a_missing_data_dir_before_any_table(digits_run_folder, tmp_path, capsys):
    from bench import seed_spread

    assert seed_spread.main([str(digits_run_folder), "--data-dir", str(tmp_path / "none")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--data-dir" in err and "Traceback" not in err


def test_every_bench_script_states_the_load_through_one_helper():
    # bench.machine_rates.load_line is the one phrase for the machine's load: a script reading the load
    # average itself would print it its own way (one minute only, other rounding, "CPUs" for cores)
    from pathlib import Path

    from bench.machine_rates import load_line
    bench = Path(__file__).resolve().parents[1] / "bench"
    own = [p.name for p in sorted(bench.glob("*.py")) if p.name != "machine_rates.py"
           and ("getloadavg()" in p.read_text() or "cpu_count()} cores" in p.read_text())]
    assert not own, f"these bench scripts format the load themselves; use bench.machine_rates.load_line: {own}"
    assert load_line().startswith("load average ") and load_line().endswith(" cores")


# -- bench/capacity.py: the capacity search ------------------------------------------------------------------
def mm1_p99_ms(rate: float, mu: float = 1000.0) -> float:
    """p99 of an M/M/1 queue's sojourn time (exponential with rate mu - rate), in ms."""
    return 1000.0 * math.log(100.0) / (mu - rate) if rate < mu else math.inf


@pytest.mark.parametrize("factor", [2.0, 3.0])
def test_capacity_search_finds_the_rate_where_p99_reaches_the_factor_times_light_p99(factor):
    from bench.capacity import search_capacity

    # M/M/1 at mu = 1000/s: p99 = f x p99(light) where mu - rate = (mu - light) / f
    light, mu = 40.0, 1000.0
    truth = mu - (mu - light) / factor
    found = search_capacity(lambda r: (mm1_p99_ms(r, mu), 1.0), light, factor=factor, refine=4)
    assert found["bounded"] and found["light_p99_ms"] == pytest.approx(mm1_p99_ms(light))
    assert found["limit_ms"] == pytest.approx(factor * mm1_p99_ms(light))
    # the highest passing rate: never above the truth, and within the refinement's step (2^(1/16)) of it
    assert truth / 2 ** (1 / 16) <= found["capacity"] <= truth
    passed = [r for r, p99, _, ok in found["probes"] if ok]
    assert found["capacity"] == max(passed)
    assert all(ok == (p99 <= found["limit_ms"]) for _, p99, _, ok in found["probes"])


def test_capacity_search_fails_a_rate_that_drops_queries_and_an_unbounded_curve_says_so():
    from bench.capacity import search_capacity

    # flat p99, but past 300 queries/s only 95% of queries are answered: that is the capacity's bound
    found = search_capacity(lambda r: (10.0, 1.0 if r <= 300 else 0.95), 50.0, refine=3)
    assert found["bounded"] and 300 / 2 ** (1 / 8) <= found["capacity"] <= 300
    flat = search_capacity(lambda r: (10.0, 1.0), 50.0, max_rate=1000.0)
    assert not flat["bounded"] and flat["capacity"] == 800.0


def test_capacity_search_through_the_simulator_finds_mm1s_capacity():
    from dataclasses import replace

    from bench.capacity import search_capacity
    from serve.core.config import validate
    from serve.core.plan import build_plan, make_queries
    from serve.core.results import summarize
    from serve.simulator.simulate import simulate

    # one instance, exponential service of mean 1 ms, Poisson arrivals: M/M/1 with mu = 1000/s
    cfg = validate({"instances": 1, "num_queries": 40_000, "service": {"dist": "exponential", "mean_ms": 1.0},
                    "engine": "sim", "batch_size": 1, "plot": False, "seed": 1}, need_runs=False)

    def probe(rate):
        c = replace(cfg, rates=[rate])
        q = make_queries(c, rate, np.zeros(10, dtype=int))
        out = simulate(build_plan(c, "none", 2, 1, q, c.delays[0]), c)
        return summarize(out, "none", 1, 2000)["p99_ms"], 1.0

    found = search_capacity(probe, 100.0, refine=3)
    truth = 1000.0 - (1000.0 - 100.0) / 2  # 550 queries/s
    assert found["light_p99_ms"] == pytest.approx(mm1_p99_ms(100.0), rel=0.1)
    assert truth / 1.2 <= found["capacity"] <= truth * 1.1


def test_capacity_benchmark_prints_capacities_and_the_tail_at_their_fractions(digits_run_folder, tmp_path, capsys):
    from bench import capacity

    # the whole run in the simulator (no Ray, no HTTP): the shipped digits config's stragglers, quick sizes
    code = capacity.main([digits_run_folder, "--quick", "--engine", "sim", "--config", "conf/serve/digits.json",
                          "--out", str(tmp_path), "--set", "plot=false"])
    out = capsys.readouterr().out
    assert code == 0 and "load average" in out
    cap = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[0] in ("equal-resources", "coded"):
            light, limit = float(cells[1]), float(cells[2])
            assert limit == pytest.approx(2 * light, abs=0.11)  # the 2x rule, as printed to 0.1 ms
            cap[cells[0]] = float(cells[3].removeprefix(">= ").replace(",", ""))
    assert set(cap) == {"equal-resources", "coded"}
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in out.splitlines() if ln.startswith("| 0.")]
    assert [(r[0], r[2]) for r in rows] == [("0.5", "equal-resources"), ("0.5", "coded"),
                                            ("0.7", "equal-resources"), ("0.7", "coded")]
    for frac, rate, strategy, own, *_ in rows:
        # every compared strategy at the same fraction of equal-resources' capacity, its own fraction beside it
        assert float(rate.replace(",", "")) == pytest.approx(float(frac) * cap["equal-resources"], abs=0.51)
        assert float(own) == pytest.approx(float(frac) * cap["equal-resources"] / cap[strategy], abs=0.006)
    assert "coded p99.9 / equal-resources p99.9 = " in out and "simulator vs Ray" not in out
    assert (tmp_path / "sim" / "cdf_0.7.png").is_file()


def test_capacity_benchmark_refuses_a_bad_light_rate_before_any_work(tmp_path, capsys):
    from bench import capacity

    assert capacity.main([str(tmp_path), "--light", "0"]) == 2
    err = capsys.readouterr().err
    assert "--light" in err and "Traceback" not in err
