"""N-worker evaluation by a deadline (coders/deadline.py): the workers used are exactly those whose drawn time
is at most the deadline, the times are seeded, a deadline past every time is the no-straggler decode, the
fraction answered grows with the deadline; the config keys are refused when wrong; a run through train.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coders.config import validate_dict
from coders.deadline import answered_patterns, by_deadline, completion_ms, on_time
from util.errors import ConfigError

LAW = {"dist": "shifted-exponential", "shift_ms": 10.0, "mean_ms": 5.0}


def test_the_workers_used_are_exactly_those_done_by_the_deadline():
    """Times at the deadline itself count as on time (a '<' would drop them), and the pattern is the drawn
    times' (a straggler_p law with the same share late would not match it row by row)."""
    law = {"dist": "constant", "ms": 10.0, "probability": 0.4}  # times are exactly 0 or 10 ms
    times = completion_ms(law, 9, 200, np.random.default_rng(5))
    assert set(np.unique(times)) == {0.0, 10.0}
    patterns, answered = by_deadline(law, 10.0, 9, 200, np.random.default_rng(5), fewest=1)
    assert answered == 1.0 and bool(patterns.all())  # every time is <= 10
    early, answered = by_deadline(law, 9.999, 9, 200, np.random.default_rng(5), fewest=3)
    late = torch.from_numpy(times > 0)
    keep = (~late).sum(1) >= 3
    assert torch.equal(early, ~late[keep]) and answered == pytest.approx(float(keep.float().mean()))
    # a continuous law, with the deadline set at one drawn time: that worker is used, the next later is not
    times = completion_ms(LAW, 12, 50, np.random.default_rng(1))
    deadline = float(times[0, 4])
    got, _ = by_deadline(LAW, deadline, 12, 50, np.random.default_rng(1), fewest=1)
    mask = torch.from_numpy(times <= deadline)
    assert bool(mask[0, 4]) and torch.equal(got, mask[mask.sum(1) >= 1])
    assert torch.equal(on_time(times, deadline), mask)


def test_the_drawn_times_are_seeded_and_follow_the_law():
    a = completion_ms(LAW, 16, 500, np.random.default_rng(7))
    assert np.array_equal(a, completion_ms(LAW, 16, 500, np.random.default_rng(7)))
    assert not np.array_equal(a, completion_ms(LAW, 16, 500, np.random.default_rng(8)))
    assert a.min() >= 10.0 and abs(a.mean() - 15.0) < 0.3  # shift + exponential tail of mean 5 (8,000 draws)
    only = completion_ms({**LAW, "instances": [2]}, 4, 100, np.random.default_rng(0))
    assert (only[:, [0, 1, 3]] == 0).all() and (only[:, 2] >= 10).all()


def test_the_fraction_answered_grows_with_the_deadline():
    fractions = [by_deadline(LAW, d, 10, 400, np.random.default_rng(3), fewest=6)[1]
                 for d in (0.0, 10.0, 12.0, 14.0, 16.0, 20.0, 30.0, 80.0)]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(a <= b for a, b in zip(fractions, fractions[1:])) and len(set(fractions)) > 3


def test_training_patterns_are_redrawn_until_answered_and_refused_when_none_can_be():
    rows = answered_patterns(LAW, 14.0, 10, 64, np.random.default_rng(0), fewest=5)
    assert len(rows) == 64 and bool((rows.sum(1) >= 5).all())
    with pytest.raises(ValueError, match="raise deadline_ms"):
        answered_patterns(LAW, 5.0, 10, 8, np.random.default_rng(0), fewest=1, rounds=3)


BASE = {"num_epoch": 1, "k_vals": [4], "enc_dec_types": [["coders.nworker.BerrutEncoder",
                                                          "coders.nworker.BerrutDecoder"]],
        "datasets": ["mnist"], "models": ["base-mlp"], "losses": ["mse"],
        "form": "nworker", "n_workers": [8], "stragglers": [0]}


@pytest.mark.parametrize("extra,key", [
    ({"deadline_ms": -1.0, "worker_latency": LAW}, "deadline_ms"),
    ({"deadline_ms": 20.0}, "deadline_ms"),
    ({"worker_latency": LAW}, "worker_latency"),
    ({"deadline_ms": 20.0, "worker_latency": {"dist": "gamma"}}, "worker_latency"),
    ({"deadline_ms": 20.0, "worker_latency": {"dist": "exponential", "mean_ms": -2}}, "worker_latency"),
    ({"deadline_ms": 20.0, "worker_latency": {**LAW, "instances": [8]}}, "worker_latency"),
    ({"deadline_ms": 20.0, "worker_latency": LAW, "straggler_p": 0.1}, "straggler_p"),
    ({"deadline_ms": 20.0, "worker_latency": LAW, "stragglers": [1]}, "stragglers"),
    ({"deadline_ms": 20.0, "worker_latency": LAW, "form": "systematic", "n_workers": None, "stragglers": None},
     "worker_latency"),
])
def test_config_refuses_bad_deadline_keys(extra, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        validate_dict({**BASE, **extra})
    validate_dict({**BASE, "deadline_ms": 20.0, "worker_latency": LAW})  # the good one passes


def test_train_py_scores_by_the_deadline(digits_config, tmp_path, capsys):
    """Berrut on digits, N = 7, K = 2: the fraction answered is the drawn times' (seed + 1), grows with the
    deadline, and a deadline past every time scores exactly as the run with no straggler."""
    from train.cli import run_all

    law = {"dist": "shifted-exponential", "shift_ms": 10.0, "mean_ms": 5.0}
    common = dict(form="nworker", k_vals=[2], n_workers=[7], stragglers=[0], num_epoch=0, max_patterns=16,
                  enc_dec_types=[["coders.nworker.BerrutEncoder", "coders.nworker.BerrutDecoder"]], seed=3)
    path = digits_config(**common, worker_latency=law, deadline_ms=10.5)
    first = run_all(str(path), {"save_dir": str(tmp_path / "a")})[0][-1]
    again = run_all(str(path), {"save_dir": str(tmp_path / "b")})[0][-1]
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert drop(first) == drop(again)
    times = completion_ms(law, 7, 16, np.random.default_rng(3 + 1))
    assert first["val_answered"] == pytest.approx(float(((times <= 10.5).sum(1) >= 1).mean()))
    assert 0 < first["val_answered"] < 1
    assert "deadline 10.5 ms" in capsys.readouterr().out
    folder = next((tmp_path / "a").rglob("config.json")).parent
    rows = {d: run_all(str(folder), {"deadline_ms": d}, only_test=True)[0] for d in (10.1, 10.5, 1e9)}
    answered = [rows[d]["test_answered"] for d in sorted(rows)]
    assert answered == sorted(answered) and answered[-1] == 1.0
    plain = digits_config(**common)
    base = run_all(str(plain), {"save_dir": str(tmp_path / "c")})[0][-1]
    compared = [key for key in ("val_mse", "val_degraded_acc") if key in base]
    assert compared and all(first[key] != base[key] for key in compared)
    folder = next((tmp_path / "c").rglob("config.json")).parent
    clean = run_all(str(folder), {}, only_test=True)[0]
    assert {k: v for k, v in rows[1e9].items() if k != "test_answered"} == pytest.approx(clean)
    assert json.loads(next((tmp_path / "a").rglob("config.json")).read_text())["deadline_ms"] == 10.5


def test_a_file_latency_law_reads_its_file_once_until_it_changes(tmp_path, monkeypatch):
    """Every draw of a "file" law samples the file's values; the file is parsed once, and again after an edit
    (its size or modification time changes), so a changed file is never served stale."""
    import os

    import util.latency as latency

    path = tmp_path / "times.csv"
    path.write_text("worker,ms\n0,3.0\n1,4.0\n")
    reads = []
    real = latency._read_latency_file
    monkeypatch.setattr(latency, "_read_latency_file", lambda *a: reads.append(a) or real(*a))
    law = {"dist": "file", "path": str(path), "column": "ms"}
    for seed in range(3):
        assert set(latency.sample_ms(law, np.zeros(50, dtype=int), np.random.default_rng(seed))) == {3.0, 4.0}
    assert len(reads) == 1
    with pytest.raises(ValueError):  # the kept values are read-only: no reader can change them for the others
        latency.read_latency_file(str(path), "ms")[0] = 0.0
    path.write_text("worker,ms\n0,7.0\n")
    os.utime(path, ns=(0, 10 ** 9))  # a different modification time too, even where the clock is coarse
    assert set(latency.sample_ms(law, np.zeros(20, dtype=int), np.random.default_rng(0))) == {7.0}
    assert len(reads) == 2
