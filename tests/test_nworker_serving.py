"""N-worker serving by a deadline and with perturbed workers (serve/core/workers.py), in the simulator (one
test on Ray): a deadline before every output decodes from exactly the decoder's minimum, one after every
output is the no-deadline run; probabilistic stragglers (a delay law with "probability" p) are late at rate p
and a decode by the deadline uses exactly the workers not late; A = 0 serves the plain answers, a planted
adversary costs the plain decoder and the locating decoder wins it back; bad values are refused."""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import torch

from serve.core.config import validate
from util.errors import ConfigError

LATE = {"dist": "shifted-exponential", "shift_ms": 20.0, "mean_ms": 5.0}  # every output after 20 ms
LOADED: dict = {}


def _train(tmp_path_factory, name: str, decoder) -> str:
    from train.cli import run_all

    tmp = tmp_path_factory.mktemp(name)
    cfg = {"form": "nworker", "num_epoch": 0, "k_vals": [2], "n_workers": [6], "stragglers": [1],
           "enc_dec_types": [["coders.nworker.BerrutEncoder", decoder]], "datasets": ["digits"],
           "models": ["base-mlp"], "losses": ["mse"], "epoch_groups": "disjoint", "save_dir": str(tmp / "save"),
           "device": "cpu", "progress": False}
    (tmp / "train.json").write_text(json.dumps(cfg))
    with open(os.devnull, "w") as quiet:
        run_all(str(tmp / "train.json"), {}, out=quiet)
    return str(next((tmp / "save").rglob("best.pt")).parent)


@pytest.fixture(scope="module")
def berrut_run(tmp_path_factory, base_model_dir) -> str:
    """K = 2, N = 6, S = 1, Berrut's plain decoder (nothing trained)."""
    return _train(tmp_path_factory, "berrut6", "coders.nworker.BerrutDecoder")


@pytest.fixture(scope="module")
def locating_run(tmp_path_factory, base_model_dir) -> str:
    """The same code with ApproxIFER's error locator (e_max = 1)."""
    return _train(tmp_path_factory, "locating6", {"class": "coders.adversary.LocatingBerrutDecoder",
                                                  "args": {"e_max": 1}})


def serve_sim(run: str, rate: float = 50.0, fewest=None, **keys):
    """One nworker row in the simulator, in process: (outcome, plan)."""
    from coders.code import load_code
    from serve.core.plan import build_plan, code_layout, make_queries
    from serve.core.workers import served_code, with_deadline
    from serve.simulator.simulate import simulate

    cfg = validate({"runs": [run], "strategies": ["nworker"], "engine": "sim", "plot": False, "instances": 6,
                    "num_queries": 100, "group_timeout_ms": 1000.0, **keys})
    if run not in LOADED:
        LOADED[run] = load_code(run)
    loaded = LOADED[run]
    code = served_code(cfg, loaded.code, run)
    if fewest is not None:  # a decoder that needs more outputs than Berrut's one
        code.decoder.min_answering = fewest
    try:
        x, y = loaded.splits.split("test")
        k, r, need = code_layout(code)
        plan = with_deadline(build_plan(cfg, "nworker", k, r, make_queries(cfg, rate, y.numpy()), cfg.delays[0],
                                        need=need), cfg, code)
        return simulate(plan, cfg, code=code, inputs=x), plan
    finally:
        if fewest is not None:
            del code.decoder.min_answering


def accuracy(outcome) -> float:
    return float(np.mean(outcome.predicted == outcome.label))


# -- deadlines ----------------------------------------------------------------------------------------------
def test_a_deadline_before_every_output_decodes_from_exactly_the_decoders_minimum(berrut_run, tmp_path):
    """Every output comes 20+ ms after its group's close; with a 1-ms deadline each group decodes at its first
    output (Berrut needs one), and the per-query CSV says so; a decoder needing three waits for three; without a
    deadline every decode uses N - S = 5."""
    from serve.cli import serve_all

    cfg = validate({"runs": [berrut_run], "strategies": ["nworker"], "engine": "sim", "plot": False,
                    "instances": 6, "num_queries": 60, "group_timeout_ms": 1000.0, "delays": [LATE],
                    "deadline_ms": 1.0, "out_dir": str(tmp_path / "out")})
    (_, (summary,)), = serve_all(cfg, out=io.StringIO())
    with open(tmp_path / "out" / "setting00" / "nworker" / "queries.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["outputs_used"] for r in rows} == {"1"} and summary["outputs_used_mean"] == 1.0
    three, _ = serve_sim(berrut_run, delays=[LATE], deadline_ms=1.0, fewest=3)
    plain, _ = serve_sim(berrut_run, delays=[LATE])
    assert (three.used[three.reconstructed] == 3).all() and (plain.used[plain.reconstructed] == 5).all()
    assert three.reconstructed.all() and plain.reconstructed.all()
    assert (three.done <= plain.done).all() and (three.done < plain.done).any()  # decoded earlier


def test_a_deadline_after_every_output_serves_the_no_deadline_run(berrut_run):
    late, _ = serve_sim(berrut_run, delays=[LATE], deadline_ms=10_000.0)
    plain, _ = serve_sim(berrut_run, delays=[LATE])
    for name in ("done", "predicted", "reconstructed", "used"):
        assert np.array_equal(getattr(late, name), getattr(plain, name)), name


def test_probabilistic_stragglers_are_late_at_rate_p_and_a_deadline_decodes_from_the_others(berrut_run):
    """Each request late (30 ms) with probability p: p = 0 is no straggler at all, the fraction late follows p
    (4 standard deviations, fixed seed), and with a 10-ms deadline a group with j late workers decodes from
    min(N - S, N - j) outputs: the decode waits for N - S only while they can come by the deadline."""
    none, _ = serve_sim(berrut_run, delays=[{"dist": "none"}])
    zero, _ = serve_sim(berrut_run, delays=[{"dist": "constant", "ms": 30.0, "probability": 0.0}])
    for name in ("done", "predicted", "used"):
        assert np.array_equal(getattr(none, name), getattr(zero, name)), name
    p = 0.3
    out, plan = serve_sim(berrut_run, rate=2.0, delays=[{"dist": "constant", "ms": 30.0, "probability": p}],
                          deadline_ms=10.0, num_queries=400)
    late = plan.delay > 0
    assert abs(late.mean() - p) < 4 * np.sqrt(p * (1 - p) / len(late))
    late_per_group = np.zeros(len(plan.closed), dtype=int)
    np.add.at(late_per_group, plan.group, late)
    expected = np.clip(6 - late_per_group, plan.fewest, plan.need)  # none on time: the first late one
    assert plan.fewest == 1 and {0, 1, 2} <= set(late_per_group.tolist())  # groups with 0, 1 and 2 late
    assert out.reconstructed.all() and np.array_equal(out.used[plan.members[:, 0]], expected)


# -- perturbed workers --------------------------------------------------------------------------------------
def test_no_adversary_serves_the_plain_answers(berrut_run):
    plain, _ = serve_sim(berrut_run, delays=[LATE])
    zero, _ = serve_sim(berrut_run, delays=[LATE], perturb={"adversaries": 0, "adversary": "sign"})
    assert np.array_equal(plain.predicted, zero.predicted) and np.array_equal(plain.done, zero.done)


def test_a_planted_adversary_costs_the_plain_decoder_and_the_locator_recovers_it(berrut_run, locating_run):
    """One worker of every group adds N(0, 100^2) to its output: the plain Berrut decoder's served accuracy
    falls well below the clean one, the locating decoder's stays at it (and is the plain one without it)."""
    bad = {"adversaries": 1, "adversary": "gaussian", "adversary_scale": 100.0}
    clean = accuracy(serve_sim(berrut_run)[0])
    hit = accuracy(serve_sim(berrut_run, perturb=bad)[0])
    located = accuracy(serve_sim(locating_run, perturb=bad)[0])
    assert accuracy(serve_sim(locating_run)[0]) == clean
    assert hit < clean - 0.1 and located >= clean - 0.03, (clean, hit, located)


def test_a_group_meets_the_same_corruption_however_groups_are_batched(berrut_run):
    from coders.code import load_code
    from coders.perturb import Perturbation, PerturbedNWorkerCode

    code = PerturbedNWorkerCode(load_code(berrut_run).code, Perturbation(1, "gaussian", 100.0), seed=3)
    outputs = torch.randn(3, 6, 10)
    avail = torch.ones(3, 6, dtype=torch.bool)
    avail[1, 2] = False
    together = code.decode_groups(outputs, avail, [4, 9, 11])
    alone = torch.cat([code.decode_groups(outputs[i:i + 1], avail[i:i + 1], [g]) for i, g in enumerate([4, 9, 11])])
    assert torch.equal(together, alone)
    assert not torch.equal(together, code.decode(outputs, avail))  # something was corrupted
    other = PerturbedNWorkerCode(code, code.perturbation, seed=4).decode_groups(outputs, avail, [4, 9, 11])
    assert not torch.equal(together, other)  # the seed picks the corruption


def test_more_adversaries_than_a_decode_reads_are_refused_naming_the_key(berrut_run, tmp_path):
    from serve.cli import serve_all

    cfg = validate({"runs": [berrut_run], "strategies": ["nworker"], "engine": "sim", "plot": False,
                    "perturb": {"adversaries": 5}, "out_dir": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="'perturb'.*N - S = 5.*at most 4"):
        serve_all(cfg, out=io.StringIO())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keys,key", [
    ({"deadline_ms": -1.0}, "deadline_ms"),
    ({"deadline_ms": 5.0, "strategies": ["none"]}, "deadline_ms"),
    ({"perturb": {"adversary": "flip"}}, "perturb"),
    ({"perturb": {"noise": 0.1}}, "perturb"),
    ({"perturb": {"output_noise": -1}}, "perturb"),
    ({"perturb": {"adversary_target": 2}}, "perturb"),
])
def test_bad_worker_keys_name_the_key(keys, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'.*(Fix|must|got)"):
        validate({"instances": 2, "engine": "sim", "strategies": ["nworker"], **keys}, need_runs=False)


# -- on Ray -------------------------------------------------------------------------------------------------
def test_ray_decodes_by_the_deadline_from_the_first_output(berrut_run, tmp_path, local_ray):
    """The Ray frontend wakes at the deadline: with every output 20+ ms late and a 1-ms deadline, each group is
    decoded from its first output, answered at once (not with a later reply)."""
    from serve.cli import serve_all

    cfg = validate({"runs": [berrut_run], "strategies": ["nworker"], "engine": "ray", "plot": False,
                    "instances": 2, "num_queries": 8, "rates": [20.0], "group_timeout_ms": 1000.0,
                    "delays": [LATE], "deadline_ms": 1.0, "perturb": {"adversaries": 0},
                    "out_dir": str(tmp_path / "out")})
    (_, (summary,)), = serve_all(cfg, out=io.StringIO())
    with open(tmp_path / "out" / "setting00" / "nworker" / "queries.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and {r["outputs_used"] for r in rows if r["reconstructed"] == "1"} == {"1"}
    assert summary["reconstructed"] == 1.0


@pytest.mark.parametrize("extra", [[], ["--sweep", "--deadlines", "soon"], ["--sweep", "--late-p", "2"],
                                   ["--sweep", "--adversaries", "-1"]])
def test_the_serving_bench_refuses_bad_sweeps_before_any_work(extra, berrut_run, capsys):
    from bench.nworker_serve import main

    assert main(["--nworker", berrut_run, *extra]) == 2
    err = capsys.readouterr().err
    assert ("--systematic" if not extra else "--deadlines") in err and "Traceback" not in err
