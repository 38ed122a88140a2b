"""N-worker codes under perturbations: adversaries and the decoders that locate them, noisy outputs and the
spline's smoothing for them, probabilistic stragglers; their config keys and a run of each through train.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

from coders.adversary import LocatingBerrutDecoder, LocatingMLPDecoder, LocatingSplineDecoder
from coders.config import validate_dict
from coders.nworker import BerrutDecoder, BerrutEncoder, MLPDecoder, chebyshev_points, straggler_patterns
from coders.perturb import Perturbation, late_patterns, swap_classes, undecodable_probability
from coders.smoothing import NoiseSplineDecoder
from coders.spline import SplineDecoder, SplineEncoder
from util.errors import ConfigError


def affine_outputs(k, n, groups, d=3, out=4, seed=0):
    """Worker outputs of an affine F under Berrut's encoding: ``(groups, N, out)`` float64."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(d, out, generator=gen, dtype=torch.float64), torch.randn(out, generator=gen, dtype=torch.float64)
    x = torch.randn(groups, k, d, generator=gen, dtype=torch.float64)
    return BerrutEncoder(k, n, [d])(x) @ a + b


def patterns(n, s, groups, distinct=64):
    rows = straggler_patterns(n, s, distinct)
    return rows[torch.arange(groups) % len(rows)]


# -- adversaries -------------------------------------------------------------------------------------
@pytest.mark.parametrize("adversaries", [1, 2])
def test_the_berrut_locator_finds_planted_errors_on_an_affine_f_exactly(adversaries):
    """K = 4, N = 12, S = 1: the scaled outputs are a degree-3 polynomial, 11 answer, e_max = 2 <= (11 - 4) / 2;
    every corrupted worker is located, no good one, and the decode is Berrut's from the good workers."""
    k, n = 4, 12
    y = affine_outputs(k, n, 60)
    avail = patterns(n, 1, 60)
    bad, corrupted = Perturbation(adversaries, "gaussian", 100.0).apply(y, avail, torch.Generator().manual_seed(3))
    assert int(corrupted.sum()) == 60 * adversaries
    dec = LocatingBerrutDecoder(k, n, [4], e_max=2)
    out = dec(bad * avail[..., None], avail)
    assert torch.equal(dec.last_located, corrupted)
    good = avail & ~corrupted
    assert torch.allclose(out, BerrutDecoder(k, n, [4])(y * good[..., None], good), atol=1e-9)
    assert not torch.allclose(out, BerrutDecoder(k, n, [4])(bad * avail[..., None], avail), atol=1e-3)


def test_sign_flips_and_small_errors_are_located_too_on_an_affine_f():
    k, n = 3, 10
    y = affine_outputs(k, n, 40, seed=1)
    avail = torch.ones(40, n, dtype=torch.bool)
    for pert in (Perturbation(2, "sign"), Perturbation(2, "gaussian", 0.01)):
        bad, corrupted = pert.apply(y, avail, torch.Generator().manual_seed(0))
        dec = LocatingBerrutDecoder(k, n, [4], e_max=2)
        dec(bad, avail)
        assert torch.equal(dec.last_located, corrupted)


def test_robust_decoders_equal_the_plain_ones_without_adversaries():
    k, n = 5, 12
    avail = patterns(n, 2, 30, distinct=3)
    y = affine_outputs(k, n, 30) * avail[..., None]
    for robust, plain in ((LocatingBerrutDecoder(k, n, [4], e_max=2), BerrutDecoder(k, n, [4])),):
        assert torch.allclose(robust(y, avail), plain(y, avail), atol=1e-12)
        assert not robust.last_located.any()
    # the spline's misfit is nil for outputs on a line in z (no curvature), so nothing is dropped
    beta = chebyshev_points(n)
    gen = torch.Generator().manual_seed(0)
    line = (torch.randn(30, 1, 4, generator=gen, dtype=torch.float64)
            + torch.randn(30, 1, 4, generator=gen, dtype=torch.float64) * beta[None, :, None]) * avail[..., None]
    robust, plain = LocatingSplineDecoder(k, n, [4], e_max=2, lam=0.01), SplineDecoder(k, n, [4], lam=0.01)
    assert torch.allclose(robust(line, avail), plain(line, avail), atol=1e-10)
    assert not robust.last_located.any()
    # the learned decoder with the locator is its plain MLP (same weights) when nothing is located
    torch.manual_seed(0)
    learned = LocatingMLPDecoder(k, n, [-1, 4], hidden=8, e_max=2)
    twin = MLPDecoder(k, n, [-1, 4], hidden=8)
    for layer in twin.nn:
        if isinstance(layer, torch.nn.Linear):
            torch.nn.init.normal_(layer.weight)  # non-zero: the correction counts
    learned.nn.load_state_dict(twin.nn.state_dict())
    with torch.no_grad():
        assert torch.allclose(learned(y.float(), avail), twin(y.float(), avail), atol=1e-5)


def test_the_spline_locator_finds_gross_errors_on_a_smooth_f():
    k, n = 5, 16
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(40, k, 1, generator=gen, dtype=torch.float64) * 6 - 3
    y = SplineEncoder(k, n, [1])(x)
    y = y * torch.sin(y)
    avail = patterns(n, 1, 40, distinct=3)
    bad, corrupted = Perturbation(2).apply(y, avail, torch.Generator().manual_seed(1))
    dec = LocatingSplineDecoder(k, n, [1], e_max=2)
    dec(bad * avail[..., None], avail)
    assert (dec.last_located & corrupted).sum() >= 0.95 * corrupted.sum()
    assert (dec.last_located & ~corrupted).sum() <= 0.05 * corrupted.sum()


def test_corruption_is_seeded_and_hits_only_answering_workers():
    y = torch.randn(50, 9, 10, dtype=torch.float64)
    avail = patterns(9, 3, 50)
    pert = Perturbation(2, "gaussian", 100.0, noise=0.5)
    one = pert.apply(y, avail, torch.Generator().manual_seed(7))
    two = pert.apply(y, avail, torch.Generator().manual_seed(7))
    other = pert.apply(y, avail, torch.Generator().manual_seed(8))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert not torch.equal(one[1], other[1])
    assert (one[1].sum(1) == 2).all() and not (one[1] & ~avail).any()
    clean = (one[0] - y)[~one[1]]
    assert 0.4 < clean.std() < 0.6 and (one[0] - y)[one[1]].std() > 50


def test_a_class_swap_exchanges_the_top_class_with_the_target():
    out = torch.tensor([[0.1, 3.0, 0.5, 0.2]], dtype=torch.float64)
    assert swap_classes(out, 3).tolist() == [[0.1, 0.2, 0.5, 3.0]]
    assert swap_classes(out, None).tolist() == [[0.1, 0.5, 3.0, 0.2]]
    assert swap_classes(out, 1).tolist() == [[0.1, 0.5, 3.0, 0.2]]  # the top is the target: the next one


def test_the_locator_refuses_a_search_too_large():
    with pytest.raises(ValueError, match="max_sets"):
        LocatingBerrutDecoder(8, 200, [10], e_max=3)


# -- noise -------------------------------------------------------------------------------------------
def test_the_noise_spline_chooses_interpolation_without_noise_and_smooths_with_it():
    k, n = 5, 32
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(200, k, 1, generator=gen, dtype=torch.float64) * 6 - 3
    fx = x * torch.sin(x)
    coded = SplineEncoder(k, n, [1])(x)
    y = coded * torch.sin(coded)
    avail = torch.ones(200, n, dtype=torch.bool)
    plain = SplineDecoder(k, n, [1], lam=0.0)
    cp0 = NoiseSplineDecoder(k, n, [1], rule="cp", sigma=0.0)
    assert torch.allclose(cp0(y, avail), plain(y, avail), atol=1e-12) and (cp0.last_lam == 0).all()
    noisy, _ = Perturbation(noise=0.5).apply(y, avail, torch.Generator().manual_seed(1))
    err = lambda dec: ((dec(noisy, avail) - fx) ** 2).mean().item()  # noqa: E731
    cp, gcv = NoiseSplineDecoder(k, n, [1], sigma=0.5), NoiseSplineDecoder(k, n, [1], rule="gcv")
    assert err(cp) < 0.6 * err(plain) and err(gcv) < 0.8 * err(plain)
    assert (cp.last_lam > 0).float().mean() > 0.9


# -- probabilistic stragglers ------------------------------------------------------------------------
def test_probabilistic_patterns_follow_the_configured_p():
    """Each worker late with probability p, independently: per-worker rates and the count of late workers
    (a chi-square test against Binomial(N, p), fixed seed) match."""
    from scipy.stats import binom, chisquare

    n, p, rows = 10, 0.3, 20000
    pats = late_patterns(n, p, rows, torch.Generator().manual_seed(0))
    late = (~pats).double()
    sd = math.sqrt(p * (1 - p) / rows)
    assert ((late.mean(0) - p).abs() < 4 * sd).all()
    counts = torch.bincount(late.sum(1).long(), minlength=n + 1).double().numpy()
    expected = binom.pmf(range(n + 1), n, p) * rows
    keep = expected > 5
    observed = list(counts[keep]) + [counts[~keep].sum()]
    wanted = list(expected[keep]) + [rows - expected[keep].sum()]
    assert chisquare(observed, wanted).pvalue > 1e-3
    corr = torch.corrcoef(late.T)
    assert (corr - torch.eye(n)).abs().max() < 0.05  # independent workers
    # a p that is wrong by 0.02 is caught by the same test
    off = late_patterns(n, 0.32, rows, torch.Generator().manual_seed(0))
    assert ((~off).double().mean() - p).abs() > 4 * sd / math.sqrt(n)


def test_probabilistic_patterns_redraw_undecodable_rows():
    pats = late_patterns(8, 0.6, 5000, torch.Generator().manual_seed(1), min_answering=5)
    assert (pats.sum(1) >= 5).all()
    assert undecodable_probability(8, 0.6, 5) == pytest.approx(sum(
        math.comb(8, a) * 0.4 ** a * 0.6 ** (8 - a) for a in range(5)))
    with pytest.raises(ValueError, match="almost never"):
        late_patterns(8, 0.99, 10, torch.Generator(), min_answering=8)


# -- config and train.py -----------------------------------------------------------------------------
BASE = {"num_epoch": 1, "k_vals": [4], "enc_dec_types": [["coders.nworker.BerrutEncoder",
                                                          "coders.nworker.BerrutDecoder"]],
        "datasets": ["mnist"], "models": ["base-mlp"], "losses": ["mse"]}
NW = {"form": "nworker", "n_workers": [8], "stragglers": [1]}


@pytest.mark.parametrize("extra,key", [
    ({"adversaries": 1}, "adversaries"),
    ({**NW, "adversaries": 7}, "adversaries"),
    ({**NW, "adversaries": -1}, "adversaries"),
    ({**NW, "adversary": "flip"}, "adversary"),
    ({**NW, "adversary_scale": -1.0}, "adversary_scale"),
    ({**NW, "adversary_target": 3}, "adversary_target"),
    ({**NW, "output_noise": -0.1}, "output_noise"),
    ({"output_noise": 0.1}, "output_noise"),
    ({**NW, "straggler_p": 1.0}, "straggler_p"),
    ({**NW, "straggler_p": 0.1}, "stragglers"),
    ({"straggler_p": 0.1}, "straggler_p"),
])
def test_config_refuses_bad_perturbation_keys(extra, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        validate_dict({**BASE, **extra})


def test_train_py_runs_codes_under_adversaries_and_random_stragglers(digits_config, tmp_path, capsys):
    from train.cli import run_all

    locate = [{"class": "coders.nworker.MLPEncoder", "args": {"hidden": 16}},
              {"class": "coders.adversary.LocatingMLPDecoder", "args": {"hidden": 16, "e_max": 1}}]
    path = digits_config(form="nworker", k_vals=[2], n_workers=[7], stragglers=[0], enc_dec_types=[locate],
                         num_epoch=1, epoch_groups="disjoint", adversaries=1, straggler_p=0.2, max_patterns=2)
    first = run_all(str(path), {"save_dir": str(tmp_path / "a")})[0]
    again = run_all(str(path), {"save_dir": str(tmp_path / "b")})[0]
    # the locator finds some of the scale-100 adversaries (a switched-off locator reports 0 every epoch)
    assert any(r["val_located"] > 0 for r in first) and all(0 <= r["val_located"] <= 1 for r in first)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(first) == drop(again)  # seeded: the same corruption, patterns and training
    saved = json.loads(next((tmp_path / "a").rglob("config.json")).read_text())
    assert saved["adversaries"] == 1 and saved["straggler_p"] == 0.2
    assert saved["undecodable_probability"] == pytest.approx(0.2 ** 7)
    out = capsys.readouterr().out
    assert "adversaries: 1 (gaussian, scale 100)" in out and "late with probability 0.2" in out


def test_the_robust_bench_refuses_an_unknown_figure(capsys):
    from bench.nworker_robust import main

    assert main(["xsinx-m"]) == 2
    err = capsys.readouterr().err
    assert "xsinx-m" in err and "xsinx-n" in err and "Traceback" not in err


# -- placement and the fewest answers of the robust and noise-aware decoders ---------------------------
@pytest.mark.parametrize("encoder, decoder, dec_args", [
    ("coders.nworker.BerrutEncoder", "coders.adversary.LocatingBerrutDecoder", {}),
    ("coders.nworker.MLPEncoder", "coders.adversary.LocatingMLPDecoder", {"hidden": 4}),
    ("coders.spline.SplineEncoder", "coders.adversary.LocatingSplineDecoder", {"lam": 0.0}),
    ("coders.spline.SplineEncoder", "coders.smoothing.NoiseSplineDecoder", {"sigma": 0.1}),
])
def test_the_robust_and_noise_aware_decoders_are_placed_and_a_mismatch_is_refused(encoder, decoder, dec_args):
    from coders.nworker import build_nworker_coders

    place = {"worker_points": "approxifer"}
    enc, dec = build_nworker_coders({"class": encoder, "args": place}, {"class": decoder, "args": {**dec_args, **place}},
                                    5, 9, [2], 3)
    assert (dec.data_points, dec.worker_points) == (enc.data_points, enc.worker_points) == ("chebyshev1", "approxifer")
    with pytest.raises(ConfigError, match="places data and workers at chebyshev1 / approxifer"):
        build_nworker_coders({"class": encoder, "args": place}, {"class": decoder, "args": dec_args}, 5, 9, [2], 3)


def test_a_placed_locator_and_noise_spline_decode_at_their_placement():
    """The locator's basis and Berrut's denominator follow the placement: small planted errors on an affine F encoded
    at ApproxIFER's worker points are all located (the default placement's basis misses them); the noise-aware
    spline without noise is the interpolating spline of the same placement."""
    k, n, place = 4, 12, {"worker_points": "approxifer"}
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    y = BerrutEncoder(k, n, [3], **place)(torch.randn(60, k, 3, generator=gen, dtype=torch.float64)) @ a + b
    avail = patterns(n, 1, 60)
    bad, corrupted = Perturbation(2, "gaussian", 0.01).apply(y, avail, torch.Generator().manual_seed(3))
    placed, unplaced = LocatingBerrutDecoder(k, n, [4], e_max=2, **place), LocatingBerrutDecoder(k, n, [4], e_max=2)
    out = placed(bad * avail[..., None], avail)
    assert torch.equal(placed.last_located, corrupted)
    good = avail & ~corrupted
    assert torch.allclose(out, BerrutDecoder(k, n, [4], **place)(y * good[..., None], good), atol=1e-9)
    unplaced(bad * avail[..., None], avail)
    assert not torch.equal(unplaced.last_located, corrupted)
    values = torch.randn(5, 9, 2, generator=gen, dtype=torch.float64)
    full = torch.ones(5, 9, dtype=torch.bool)
    noise = NoiseSplineDecoder(5, 9, [2], sigma=0.0, **place)
    assert torch.allclose(noise(values, full), SplineDecoder(5, 9, [2], lam=0.0, **place)(values, full), atol=1e-8)
    assert not torch.allclose(noise(values, full), SplineDecoder(5, 9, [2], lam=0.0)(values, full), atol=1e-3)


def test_each_decoder_declares_the_fewest_answers_it_decodes_from():
    from coders.perturb import min_answering
    from coders.spline import MIN_POINTS

    class Picky(SplineDecoder):  # a user's spline decoder needing more: its own declaration counts, not its class
        min_answering = 7

    assert min_answering(BerrutDecoder(4, 8, [2])) == min_answering(LocatingBerrutDecoder(4, 8, [2])) == 1
    assert min_answering(SplineDecoder(5, 8, [2], lam=0.0)) == MIN_POINTS
    assert min_answering(LocatingSplineDecoder(5, 8, [2])) == min_answering(NoiseSplineDecoder(5, 8, [2], sigma=0.1)) \
        == MIN_POINTS
    assert min_answering(Picky(5, 8, [2], lam=0.0)) == 7
    assert min_answering(torch.nn.Identity()) == 1  # a decoder that declares nothing decodes from one answer


def test_the_robust_bench_reuses_a_trained_run_only_at_the_same_epochs():
    from bench.nworker_robust import run_key

    pair, train = ["coders.nworker.MLPEncoder", "coders.nworker.MLPDecoder"], {"n_workers": [9], "adversaries": 1}
    assert run_key(pair, True, train, {}, 20) != run_key(pair, True, train, {}, 5)  # a learned code: retrained
    assert run_key(pair, True, train, {}, 20) != run_key(pair, True, {**train, "adversaries": 2}, {}, 20)
    fixed = ["coders.nworker.BerrutEncoder", "coders.adversary.LocatingBerrutDecoder"]
    assert run_key(fixed, False, train, {}, 20) == run_key(fixed, False, train, {}, 5)  # nothing trained: reused
