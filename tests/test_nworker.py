"""N-worker codes: Berrut (BACC / ApproxIFER), LeTCC's splines, the learned pair, patterns, config."""
from __future__ import annotations

import io
import itertools
import json
import math

import numpy as np
import pytest
import torch

from coders.nworker import (BerrutDecoder, BerrutEncoder, MLPDecoder, MLPEncoder, NWorkerCode, chebyshev_points,
                            pattern_count, straggler_patterns)
from coders.spline import SplineDecoder, SplineEncoder
from coders.config import validate_dict
from util.errors import ConfigError
from util.report import main as report_main


class Affine(torch.nn.Module):
    """A linear F (plus a constant): ``(M, D) -> (M, n)``."""

    def __init__(self, d: int, n: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(d, n, generator=gen, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return x.reshape(len(x), -1) @ self.a + self.b


def code_of(enc_cls, dec_cls, k, n, d=5, out=3, **args):
    f = Affine(d, out)
    return NWorkerCode(f, enc_cls(k, n, [-1, d], **args), dec_cls(k, n, [-1, out], **args), k, n, 0), f


def all_patterns(n, late_from, s):
    """Every availability row with ``s`` late workers among the positions ``late_from``."""
    rows = []
    for late in itertools.combinations(late_from, s):
        row = torch.ones(n, dtype=torch.bool)
        row[list(late)] = False
        rows.append(row)
    return torch.stack(rows)


# -- Berrut ------------------------------------------------------------------------------------------
def test_chebyshev_points_nest_at_odd_multiples():
    """The first-kind points of K are among those of 3K (the exact case below relies on it), not of 2K."""
    small, big = chebyshev_points(3), chebyshev_points(9)
    assert torch.allclose(big[1::3], small, atol=1e-15)
    assert torch.cdist(chebyshev_points(6).view(-1, 1), small.view(-1, 1)).min() > 0.05


@pytest.mark.parametrize("n,s", [(2, 1), (5, 2), (7, 6)])
def test_berrut_k1_is_exact_from_any_workers(n, s):
    """K = 1: every worker gets the input itself, so any N - S answers rebuild F(x) exactly."""
    code, f = code_of(BerrutEncoder, BerrutDecoder, 1, n)
    x = torch.randn(4, 1, 5, dtype=torch.float64)
    patterns = all_patterns(n, range(n), s)
    rebuilt = code.forward_patterns(x, patterns)
    assert torch.allclose(rebuilt, f(x[:, 0]).unsqueeze(1).expand_as(rebuilt[0]), atol=1e-12)


def test_berrut_exact_when_data_points_answer_for_every_subset():
    """N = 3K: the K data points are worker points; with the S late workers among the others,
    every subset of N - S answers rebuilds F(X_j) exactly (Berrut's interpolant passes through
    its nodes), and all subsets agree."""
    k, n, s = 3, 9, 2
    code, f = code_of(BerrutEncoder, BerrutDecoder, k, n)
    x = torch.randn(4, k, 5, dtype=torch.float64)
    on_data = [1, 4, 7]  # where chebyshev_points(9) holds chebyshev_points(3)
    patterns = all_patterns(n, [i for i in range(n) if i not in on_data], s)
    assert len(patterns) == math.comb(6, 2)
    rebuilt = code.forward_patterns(x, patterns)
    want = f(x.flatten(0, 1)).view(4, k, -1)
    assert torch.allclose(rebuilt, want.expand_as(rebuilt), atol=1e-12)


def test_berrut_is_only_approximate_elsewhere():
    """Outside the exact cases Berrut's decoding of a linear F is not exact (so the tests above
    would catch an encoder that sent raw inputs, or a decoder that ignored the pattern)."""
    code, f = code_of(BerrutEncoder, BerrutDecoder, 4, 9)
    x = torch.randn(4, 4, 5, dtype=torch.float64)
    rebuilt = code(x, torch.ones(4, 9, dtype=torch.bool))
    err = (rebuilt - f(x.flatten(0, 1)).view(4, 4, -1)).abs().max()
    assert err > 1e-3


def test_late_outputs_are_never_read():
    """Whatever a late worker's output holds (NaN here), the rebuilt outputs are the same."""
    code, _ = code_of(BerrutEncoder, BerrutDecoder, 4, 9)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    outputs = code.worker_outputs(code.encode(x))
    available = torch.ones(2, 9, dtype=torch.bool)
    available[:, [2, 5]] = False
    spoiled = outputs.clone()
    spoiled[:, [2, 5]] = float("nan")
    assert torch.equal(code.decode(outputs, available), code.decode(spoiled, available))


# -- LeTCC splines -----------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [0.0, 1e-6, 10.0, "gcv"])
def test_spline_rebuilds_data_on_a_line_from_any_workers(lam):
    """Inputs that are a linear function of the data point stay linear through both splines (lines
    have no curvature, so no lam bends them) and through a linear F: exact from every subset."""
    k, n, s = 6, 10, 2
    code, f = code_of(SplineEncoder, SplineDecoder, k, n)
    code.decoder.lam = lam
    t = chebyshev_points(k).view(1, k, 1)
    x = 2.0 * t + torch.randn(3, 1, 5, dtype=torch.float64) * t + 1.0
    patterns = all_patterns(n, range(n), s)
    if lam == "gcv":  # one SciPy fit per group, pattern and coordinate: a few patterns suffice
        patterns = patterns[::9]
    rebuilt = code.forward_patterns(x, patterns)
    want = f(x.flatten(0, 1)).view(3, k, -1)
    assert torch.allclose(rebuilt, want.expand_as(rebuilt), atol=1e-9)


def test_spline_smooths_a_curve():
    """A curved input is not reproduced exactly at lam > 0 (the decoder smooths), so the test above
    is not passing because the splines interpolate everything."""
    code, f = code_of(SplineEncoder, SplineDecoder, 6, 10)
    code.decoder.lam = 1.0
    t = chebyshev_points(6).view(1, 6, 1)
    x = (t ** 3).expand(2, 6, 5).contiguous()
    rebuilt = code(x, torch.ones(2, 10, dtype=torch.bool))
    assert (rebuilt - f(x.flatten(0, 1)).view(2, 6, -1)).abs().max() > 1e-3


def test_spline_refuses_too_few_points():
    with pytest.raises(ValueError, match="K >= 5"):
        SplineEncoder(4, 10, [-1, 3])
    with pytest.raises(ValueError, match="'lam'"):
        SplineDecoder(6, 10, [-1, 3], lam=-1.0)
    dec = SplineDecoder(6, 8, [-1, 3], lam=0.0)
    available = torch.ones(1, 8, dtype=torch.bool)
    available[0, :4] = False
    with pytest.raises(ValueError, match="at least 5 answering"):
        dec(torch.zeros(1, 8, 3), available)


# -- patterns ----------------------------------------------------------------------------------------
def test_patterns_all_when_few():
    p = straggler_patterns(6, 2, 64)
    assert p.shape == (pattern_count(6, 2), 6) == (15, 6)
    assert bool(((~p).sum(1) == 2).all())
    assert len({tuple(r.tolist()) for r in p}) == 15


def test_patterns_sampled_when_many_are_seeded_and_distinct():
    a, b, c = (straggler_patterns(30, 5, 40, seed) for seed in (0, 0, 1))
    assert a.shape == (40, 30) and bool(((~a).sum(1) == 5).all())
    assert len({tuple(r.tolist()) for r in a}) == 40
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="0 <= S < N"):
        straggler_patterns(4, 4, 10)


# -- learned -----------------------------------------------------------------------------------------
def test_learned_coders_get_gradients_and_f_none():
    k, n = 3, 5
    f = Affine(4, 2).float()
    code = NWorkerCode(f, MLPEncoder(k, n, [-1, 4], hidden=16), MLPDecoder(k, n, [-1, 2], hidden=16), k, n, 1)
    rebuilt = code.forward_patterns(torch.randn(8, k, 4), straggler_patterns(n, 1, 10))
    rebuilt.pow(2).mean().backward()
    for name, p in itertools.chain(code.encoder.named_parameters(), code.decoder.named_parameters()):
        assert p.grad is not None, name
    assert all(p.grad is None and not p.requires_grad for p in f.parameters())


# -- config ------------------------------------------------------------------------------------------
BASE = {"num_epoch": 1, "k_vals": [4], "enc_dec_types": [["coders.nworker.BerrutEncoder",
                                                          "coders.nworker.BerrutDecoder"]],
        "datasets": ["mnist"], "models": ["base-mlp"], "losses": ["mse"]}


@pytest.mark.parametrize("extra,key", [
    ({"form": "nworker", "stragglers": [1]}, "n_workers"),
    ({"form": "nworker", "n_workers": [5], "stragglers": [5]}, "stragglers"),
    ({"form": "nworker", "n_workers": [5, 3], "stragglers": [0, 3]}, "stragglers"),
    ({"n_workers": [5]}, "n_workers"),
    ({"form": "nworkers", "n_workers": [5], "stragglers": [1]}, "form"),
    ({"form": "nworker", "n_workers": [5], "stragglers": [1], "max_patterns": 0}, "max_patterns"),
])
def test_config_refuses_bad_nworker_keys(extra, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate_dict({**BASE, **extra})


def test_config_accepts_nworker_form():
    cfg = validate_dict({**BASE, "form": "nworker", "n_workers": [5, 9], "stragglers": [0, 1]})
    assert cfg.form == "nworker" and cfg.max_patterns == 64


# -- train.py end to end -----------------------------------------------------------------------------
def nworker_config(digits_config, **extra):
    learned = [{"class": "coders.nworker.MLPEncoder", "args": {"hidden": 32}},
               {"class": "coders.nworker.MLPDecoder", "args": {"hidden": 32}}]
    return digits_config(form="nworker", k_vals=[3], n_workers=[5], stragglers=[1], enc_dec_types=[learned],
                         num_epoch=2, epoch_groups="disjoint", **extra)


def test_train_py_runs_and_resumes_an_nworker_code_bit_identically(digits_config, tmp_path, capsys):
    """Two epochs straight, and one epoch then --resume to two, write the same rows (seconds aside)."""
    from train.cli import run_all

    path = nworker_config(digits_config)
    straight = run_all(str(path), {"save_dir": str(tmp_path / "a")})[0]
    run_all(str(path), {"save_dir": str(tmp_path / "b"), "num_epoch": 1})
    one_run = next((tmp_path / "b").rglob("best.pt")).parent  # resumed from its run folder, as a systematic run
    resumed = run_all(str(one_run), {"num_epoch": 2}, resume=True)[0]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert [r["epoch"] for r in straight] == [0, 1, 2]
    assert drop(straight) == drop(resumed)
    out = capsys.readouterr().out
    assert "straggler patterns: 5 trained, 5 scored, of C(5, 1) = 5" in out
    folder = next((tmp_path / "a").rglob("best.pt")).parent
    assert folder.parts[-6:-3] == ("k3", "n5", "s1")
    saved = json.loads((folder / "config.json").read_text())
    assert saved["patterns_total"] == 5 and saved["form"] == "nworker"
    report = io.StringIO()
    assert report_main([str(tmp_path / "a"), "--no-plots"], out=report, err=io.StringIO()) == 0
    head, _, row = report.getvalue().splitlines()[:3]
    assert "| K | N | S |" in head and "all K answers" in head and "all-k" not in head
    assert "| 3 | 5 | 1 |" in row and "MLPEncoder-hidden32" in row


def test_train_py_refuses_a_spline_code_it_cannot_build(digits_config, capsys):
    from train.cli import main

    path = digits_config(form="nworker", k_vals=[3], n_workers=[5], stragglers=[1],
                         enc_dec_types=[["coders.spline.SplineEncoder", "coders.spline.SplineDecoder"]])
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "'enc_dec_types'" in err and "K >= 5" in err and "Traceback" not in err


def test_a_learned_nworker_code_beats_the_untrained_one_on_x_sin_x():
    """Sixty steps through F = x sin x (K = 5, N = 8, S = 1) cut the error of the rebuilt outputs over
    every straggler pattern well below the untrained code's (Berrut's, since the pair is residual)."""
    from base_models.functions import FunctionModel, x_sin_x

    torch.manual_seed(0)
    k, n = 5, 8
    f = FunctionModel(x_sin_x)
    code = NWorkerCode(f, MLPEncoder(k, n, [-1, 1], hidden=32), MLPDecoder(k, n, [-1, 1], hidden=32), k, n, 1)
    patterns = straggler_patterns(n, 1, 64)
    gen = torch.Generator().manual_seed(1)
    held_out = torch.rand(128, k, 1, generator=gen) * 6 - 3

    def error() -> float:
        with torch.no_grad():
            rebuilt = code.forward_patterns(held_out, patterns)
            return (rebuilt - f(held_out.flatten(0, 1)).view(128, k, 1)).pow(2).mean().item()

    untrained = error()
    opt = torch.optim.Adam([p for p in code.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(60):
        x = torch.rand(32, k, 1, generator=gen) * 6 - 3
        loss = (code.forward_patterns(x, patterns) - f(x.flatten(0, 1)).view(32, k, 1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert error() < 0.5 * untrained


# -- serving: the simulator ---------------------------------------------------------------------------
@pytest.mark.parametrize("slow,expect_ms", [([0, 2], [51.0, 51.0]), ([0], [1.0, 1.0])])
def test_simulated_nworker_answers_wait_for_the_k_th_of_k_plus_r_outputs(slow, expect_ms):
    """K = 2, r = S = 1, so N = 3: both answers arrive with the 2nd of the group's 3 coded outputs, never
    with a query's own output (there is none). Compute takes 1 ms; the instances in ``slow`` add 50 ms."""
    from serve.config import validate
    from serve.plan import Queries, build_plan
    from serve.sim import simulate

    cfg = validate({"instances": 2, "num_queries": 2, "engine": "sim", "plot": False, "group_timeout_ms": 1.0,
                    "service": {"dist": "constant", "ms": 1.0}, "strategies": ["coded", "nworker"],
                    "delays": [{"dist": "constant", "ms": 50.0, "instances": slow}]}, need_runs=False)
    queries = Queries(np.zeros(2), np.arange(2), np.zeros(2, dtype=int))
    plan = build_plan(cfg, "nworker", 2, 1, queries, cfg.delays[0])
    assert sorted(plan.instance.tolist()) == [0, 1, 2] and (plan.query == -1).all()  # three coded inputs, no raw one
    out = simulate(plan, cfg)
    assert (out.done - out.arrival) * 1000 == pytest.approx(expect_ms) and out.reconstructed.all()
    if slow == [0, 2]:  # the systematic code answers query 1 with its own output
        coded = simulate(build_plan(cfg, "coded", 2, 1, queries, cfg.delays[0]), cfg)
        assert (coded.done - coded.arrival)[1] * 1000 == pytest.approx(1.0)


class Recorder:
    """A driver that sends nothing and records what a policy machine decodes."""

    def __init__(self):
        self.sent, self.decoded = [], []

    def send(self, n, inst, delay, factor):
        self.sent.append(n)

    def answer_own(self, q, n):
        raise AssertionError("an N-worker query has no output of its own")

    def answer_decoded(self, g, queries, available):
        self.decoded.append((g, sorted(queries), list(available)))


def test_the_policy_machine_decodes_an_nworker_group_at_its_n_minus_s_th_output():
    """K = 2, N = 4, S = 1: a group's four coded inputs go out at its close, and its two answers are decoded
    at the third output (N - S, not K), from exactly the three in hand; later outputs answer nothing. A group
    closed with one query (blank padding) still needs three outputs: the blank is encoded, its output unknown."""
    from serve.config import validate
    from serve.plan import Queries, build_plan
    from serve.policy import PolicyMachine

    cfg = validate({"instances": 2, "num_queries": 3, "engine": "sim", "plot": False}, need_runs=False)
    plan = build_plan(cfg, "nworker", 2, 2, Queries(np.arange(3) * 1e-3, np.arange(3), np.zeros(3, dtype=int)),
                      cfg.delays[0], need=3)
    assert plan.members.tolist() == [[0, 1], [2, -1]]
    driver = Recorder()
    machine = PolicyMachine(plan, driver)
    for n in range(len(plan)):
        machine.due(n, plan.time[n])
    assert sorted(driver.sent) == list(range(8)) and (plan.query == -1).all()
    g0, g1 = np.nonzero(plan.group == 0)[0], np.nonzero(plan.group == 1)[0]
    for i, n in enumerate(g0[[3, 0, 2, 1]]):  # slot 3, then 0, 2, 1
        machine.output(int(n), 1.0 + i)
        assert len(driver.decoded) == (1 if i >= 2 else 0)
    assert driver.decoded == [(0, [0, 1], [True, False, True, True])]
    assert machine.done[:2].tolist() == [3.0, 3.0] and machine.reconstructed[:2].all()
    assert np.isinf(machine.done[2])  # group 1 has no output yet
    for i, n in enumerate(g1[:3]):
        machine.output(int(n), 10.0 + i)
        assert len(driver.decoded) == (2 if i == 2 else 1)
    assert driver.decoded[1] == (1, [2], [True, True, True, False]) and machine.done[2] == 12.0


def test_a_simulated_nworker_run_is_scored_by_its_own_decode(nworker_run_folder):
    """The simulator serves an N-worker run as Ray does: each group decoded by the code itself from its first
    N - S outputs (here always without instance 0, 50 ms late), and the served top-1 is that decode's."""
    from coders.code import load_code
    from serve.config import validate
    from serve.plan import build_plan, code_layout, make_queries
    from serve.sim import simulate

    cfg = validate({"runs": [nworker_run_folder], "instances": 2, "num_queries": 40, "engine": "sim", "plot": False,
                    "strategies": ["nworker"], "group_timeout_ms": 1000.0, "delays": [{"dist": "constant", "ms": 50.0,
                                                                                       "instances": [0]}]})
    loaded = load_code(nworker_run_folder)
    code, (x, y) = loaded.code, loaded.splits.split("test")
    k, r, need = code_layout(code)
    plan = build_plan(cfg, "nworker", k, r, make_queries(cfg, 100.0, y.numpy()), cfg.delays[0], need=need)
    out = simulate(plan, cfg, code=code, inputs=x)
    group_closed = np.repeat(plan.closed, 2)  # every group fills: 20 groups of two
    assert out.reconstructed.all() and (out.done - group_closed < 0.01).all()  # never the 50-ms straggler's wait
    with torch.no_grad():
        offline = code(x[torch.as_tensor(plan.queries.index)].view(20, 2, *x.shape[1:]),
                       torch.tensor([[False, True, True]] * 20))
    assert np.array_equal(out.predicted, offline.argmax(-1).flatten().numpy())


@pytest.mark.parametrize("strategies,run,key", [
    (["none", "nworker"], "systematic", "'strategies'.*systematic code.*\"form\": \"nworker\""),
    (["coded"], "nworker", "'strategies'.*\"coded\".*N-worker code"),
])
def test_serving_a_code_with_a_strategy_that_cannot_serve_it_exits_2(strategies, run, key, digits_run_folder,
                                                                     nworker_run_folder, tmp_path, capsys):
    """On Ray, "nworker" needs an N-worker run and "coded" a systematic one: refused before Ray starts."""
    import re

    from serve.cli import main as serve_main

    folder = {"systematic": digits_run_folder, "nworker": nworker_run_folder}[run]
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"runs": [folder], "strategies": strategies, "engine": "ray", "plot": False,
                                "out_dir": str(tmp_path / "out")}))
    assert serve_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(key, err) and "Fix:" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_nworker_is_refused_as_a_policy_row():
    from serve.config import validate

    with pytest.raises(ConfigError, match="'strategy'.*fixed layout only.*'strategies' instead"):
        validate({"instances": 2, "engine": "sim", "policies": [{"strategy": "nworker", "routing": "jsq"}]},
                 need_runs=False)
