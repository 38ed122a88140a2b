"""N-worker codes as the literature runs them: placements, the factored decoders, the bounded pattern
cache, the patterns' seeds, and the refusals made before any work (docs/nworker.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.interpolate import make_smoothing_spline

from coders.berrut import berrut_interpolate
from coders.config import validate_dict
from coders.nworker import (BerrutDecoder, BerrutEncoder, MLPDecoder, MLPEncoder, chebyshev_points, patterns_used,
                            straggler_patterns)
from coders.spline import MIN_POINTS, SplineDecoder, SplineEncoder, smoother_matrix
from util.errors import ConfigError


BASE = {"form": "nworker", "num_epoch": 1, "k_vals": [4], "stragglers": [1], "datasets": ["mnist"],
        "models": ["base-mlp"], "losses": ["mse"],
        "enc_dec_types": [["coders.nworker.BerrutEncoder", "coders.nworker.BerrutDecoder"]]}


# -- placements ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 2, 5, 9, 12])
def test_each_placement_is_its_closed_form(m):
    i = np.arange(m)
    closed = {"chebyshev1": np.cos((2 * i + 1) * np.pi / (2 * m)),
              "approxifer": np.cos(i * np.pi / m),
              "chebyshev2": np.cos(i * np.pi / (m - 1)) if m > 1 else np.zeros(1),
              "uniform": np.linspace(-1, 1, m) if m > 1 else np.zeros(1)}
    for kind, want in closed.items():
        got = chebyshev_points(m, kind).numpy()
        assert np.allclose(got, np.sort(want), atol=1e-15), kind
    for alias, kind in (("first", "chebyshev1"), ("second", "chebyshev2"), ("approxifer-latency", "chebyshev2")):
        assert torch.equal(chebyshev_points(m, alias), chebyshev_points(m, kind))


@pytest.mark.parametrize("kind", ["chebyshev2", "second", "approxifer-latency"])
def test_latency_worker_points_hold_both_ends(kind):
    points = chebyshev_points(9, kind)
    assert points[0] == -1.0 and points[-1] == 1.0 and len(set(points.tolist())) == 9


def test_approxifer_worker_points_hold_one_but_not_minus_one():
    points = chebyshev_points(9, "approxifer")
    assert points[-1] == 1.0 and points.min() > -1.0
    assert math.isclose(points[0].item(), math.cos(8 * math.pi / 9), abs_tol=1e-15)


def test_data_and_worker_points_are_placed_separately_and_points_keeps_its_old_meaning():
    enc = BerrutEncoder(8, 9, [-1, 3], data_points="chebyshev1", worker_points="approxifer")
    dec = BerrutDecoder(8, 9, [-1, 3], worker_points="approxifer")
    assert torch.equal(dec.alpha, chebyshev_points(8, "chebyshev1"))
    assert torch.equal(dec.beta, chebyshev_points(9, "approxifer"))
    assert (enc.data_points, enc.worker_points) == (dec.data_points, dec.worker_points) == ("chebyshev1", "approxifer")
    old_berrut = BerrutDecoder(8, 9, [-1, 3], points="second")  # Berrut: the workers only
    assert torch.equal(old_berrut.alpha, chebyshev_points(8, "first"))
    assert torch.equal(old_berrut.beta, chebyshev_points(9, "second"))
    old_spline = SplineDecoder(6, 9, [-1, 3], lam=0.0, points="second")  # splines: data and workers
    assert np.array_equal(old_spline.alpha, chebyshev_points(6, "second").numpy())
    assert np.array_equal(old_spline.beta, chebyshev_points(9, "second").numpy())
    learned = MLPDecoder(3, 5, [-1, 2], hidden=4, worker_points="chebyshev2")
    assert torch.equal(learned.start.beta, chebyshev_points(5, "chebyshev2"))


@pytest.mark.parametrize("args,key", [({"worker_points": "chebyshev3"}, "worker_points"),
                                      ({"data_points": 1}, "data_points"), ({"points": "third"}, "points")])
def test_an_unknown_placement_is_refused_naming_its_key_and_the_choices(args, key):
    with pytest.raises(ValueError, match=f"'{key}' must be one of chebyshev1, chebyshev2, approxifer, uniform"):
        BerrutEncoder(4, 6, [-1, 3], **args)
    with pytest.raises(ValueError, match="not both"):
        SplineEncoder(6, 9, [-1, 3], points="first", worker_points="approxifer")


def test_train_py_refuses_a_bad_or_mismatched_placement_with_exit_2(digits_config, capsys):
    from train.cli import main

    def berrut(enc_args, dec_args):
        return [[{"class": "coders.nworker.BerrutEncoder", "args": enc_args},
                 {"class": "coders.nworker.BerrutDecoder", "args": dec_args}]]

    for enc_args, dec_args, words in (({"worker_points": "cheb"}, {}, ["'worker_points'", "approxifer"]),
                                      ({"worker_points": "approxifer"}, {}, ["places data and workers"])):
        path = digits_config(form="nworker", k_vals=[3], n_workers=[5], stragglers=[1],
                             enc_dec_types=berrut(enc_args, dec_args))
        assert main([str(path)]) == 2
        err = capsys.readouterr().err
        assert "'enc_dec_types'" in err and "Traceback" not in err and all(w in err for w in words), err


# -- the factored decoders -----------------------------------------------------------------------------
@pytest.mark.parametrize("k,n,data,workers", [(8, 9, "chebyshev1", "approxifer"), (3, 9, "chebyshev1", "chebyshev1"),
                                              (4, 7, "chebyshev1", "chebyshev2"), (5, 5, "uniform", "uniform")])
def test_factored_berrut_decoder_is_the_interpolant_through_the_answering_workers(k, n, data, workers):
    """Against coders/berrut.py's closed form, also where a data point is a worker's point (N = 3K: the
    interpolant passes through that worker's output when it answers)."""
    dec = BerrutDecoder(k, n, [-1, 4], data_points=data, worker_points=workers).double()
    gen = torch.Generator().manual_seed(0)
    outputs = torch.randn(6, n, 4, generator=gen, dtype=torch.float64)
    available = torch.rand(6, n, generator=gen) > 0.4
    available[:, 1] = True
    available[0] = True
    want = berrut_interpolate(outputs, dec.beta, dec.alpha, available)
    assert torch.allclose(dec(outputs * available[..., None], available), want, atol=1e-12)


@pytest.mark.parametrize("lam", [0.0, 1e-4, 0.3])
def test_spline_matrix_is_scipys_smoothing_spline_inside_and_outside_the_nodes(lam):
    nodes = np.sort(np.random.default_rng(0).uniform(-1, 1, 11))
    at = np.linspace(-1.2, 1.2, 17)
    want = make_smoothing_spline(nodes, np.eye(11), lam=lam)(at)
    assert np.allclose(smoother_matrix(nodes, at, lam), want, atol=1e-10)


def test_spline_decoder_accepts_exactly_its_minimum_number_of_answers():
    n = MIN_POINTS + 2
    dec = SplineDecoder(MIN_POINTS, n, [-1, 2], lam=0.0)
    available = torch.zeros(1, n, dtype=torch.bool)
    available[0, :MIN_POINTS] = True
    values = torch.randn(1, n, 2, dtype=torch.float64) * available[..., None]
    want = make_smoothing_spline(dec.beta[:MIN_POINTS], values[0, :MIN_POINTS].numpy(), lam=0.0)(dec.alpha)
    assert np.allclose(dec(values, available)[0].numpy(), want, atol=1e-10)
    available[0, 0] = False
    with pytest.raises(ValueError, match=f"at least {MIN_POINTS} answering"):
        dec(values, available)


def test_bounded_pattern_cache_evicts_the_least_recently_used():
    k, n = 5, 12
    entry = k * n * 8
    dec = SplineDecoder(k, n, [-1, 2], lam=0.0, cache_mb=2.5 * entry / 2 ** 20)  # room for two patterns
    rows = straggler_patterns(n, 2, 3, seed=0)
    outputs = torch.randn(1, n, 2, dtype=torch.float64)
    first = [dec(outputs * r[None, :, None], r[None]) for r in rows[:2]]
    dec(outputs * rows[0][None, :, None], rows[0][None])  # pattern 0 used again: pattern 1 is now the oldest
    dec(outputs * rows[2][None, :, None], rows[2][None])
    keys = [r.numpy().tobytes() for r in rows]
    assert dec.cache.keys() == [keys[0], keys[2]] and dec.cache.used == 2 * entry
    again = dec(outputs * rows[1][None, :, None], rows[1][None])  # rebuilt after eviction: the same decode
    assert torch.equal(again, first[1]) and dec.cache.keys() == [keys[2], keys[1]]
    none = SplineDecoder(k, n, [-1, 2], lam=0.0, cache_mb=0)
    assert torch.equal(none(outputs * rows[1][None, :, None], rows[1][None]), first[1]) and not len(none.cache)
    with pytest.raises(ValueError, match="'cache_mb'"):
        SplineDecoder(k, n, [-1, 2], lam=0.0, cache_mb=-1)



def test_the_byte_bounded_cache_evicts_the_least_recently_used_entry():
    from util.lru import ByteLRU

    cache, built = ByteLRU(3 * 800), []
    def entry(name):  # a 100-float64 array (800 bytes), built once per miss
        return lambda: built.append(name) or np.full(100, float(len(built)))

    for name in ("a", "b", "c"):
        cache.get(name, entry(name))
    assert cache.get("a", entry("a"))[0] == 1.0 and built == ["a", "b", "c"]  # a hit: nothing built
    cache.get("d", entry("d"))  # full: "b", used least recently, goes (not "a", the oldest built)
    assert cache.keys() == ["c", "a", "d"] and cache.used == 3 * 800
    cache.get("b", entry("b"))
    assert built == ["a", "b", "c", "d", "b"] and cache.keys() == ["a", "d", "b"]
    huge = cache.get("huge", lambda: np.zeros(1000))  # larger than the whole cache: handed back, not kept
    assert len(huge) == 1000 and cache.keys() == ["a", "d", "b"] and cache.used == 3 * 800
    with pytest.raises(ValueError, match="whole number of bytes"):
        ByteLRU(-1)


@pytest.mark.parametrize("make", ["locating-berrut", "locating-spline", "noise-spline"])
def test_the_decoders_pattern_caches_are_one_bounded_lru(make):
    from coders.adversary import LocatingBerrutDecoder, LocatingSplineDecoder
    from coders.smoothing import NoiseSplineDecoder
    from util.lru import ByteLRU

    k, n = 5, 10
    dec = {"locating-berrut": lambda: LocatingBerrutDecoder(k, n, [2], e_max=1),
           "locating-spline": lambda: LocatingSplineDecoder(k, n, [2], e_max=1),
           "noise-spline": lambda: NoiseSplineDecoder(k, n, [2], sigma=0.1)}[make]()
    assert isinstance(dec.cache, ByteLRU) and dec.cache.max_bytes > 0
    rows = straggler_patterns(n, 1, 3, seed=0)
    outputs = torch.randn(1, n, 2, dtype=torch.float64)
    first = dec(outputs * rows[0][None, :, None], rows[0][None])
    one = dec.cache.used
    dec.cache = ByteLRU(one)  # room for one pattern's entry
    for row in rows:
        dec(outputs * row[None, :, None], row[None])
    assert len(dec.cache) == 1 and dec.cache.used == one
    assert torch.equal(dec(outputs * rows[0][None, :, None], rows[0][None]), first)  # rebuilt: the same decode


@pytest.mark.parametrize("gather_bytes", [2 ** 24, 0])
def test_spline_decoder_groups_its_patterns_without_mixing_them(monkeypatch, gather_bytes):
    """Groups of a batch under different patterns get each their own pattern's matrix, whether the batch's
    matrices are gathered for one product (small batches) or applied pattern by pattern (large ones)."""
    import coders.spline

    monkeypatch.setattr(coders.spline, "GATHER_BYTES", gather_bytes)
    k, n = 5, 9
    dec = SplineDecoder(k, n, [-1, 3], lam=1e-3)
    available = straggler_patterns(n, 3, 4, seed=1).repeat(3, 1)[torch.randperm(12, generator=torch.Generator()
                                                                                 .manual_seed(0))]
    outputs = torch.randn(12, n, 3, dtype=torch.float64) * available[..., None]
    want = torch.stack([dec.pattern_matrix(a) @ o for a, o in zip(available, outputs)])
    assert torch.allclose(dec(outputs, available), want, atol=1e-12)


# -- patterns and their seeds --------------------------------------------------------------------------
def test_patterns_used_counts_without_the_full_binomial():
    assert patterns_used(9, 1, 64) == 9 and patterns_used(30, 5, 40) == 40 and patterns_used(6, 2, 64) == 15
    assert patterns_used(10 ** 9, 5 * 10 ** 8, 64) == 64 and patterns_used(5, 0, 64) == 1


def test_training_patterns_are_not_the_evaluation_patterns():
    """C(8, 2) = 28 patterns, 4 of them used: training draws with the run's training seed, evaluation with
    the config's seed + 1, so a code is never scored on exactly the patterns it trained on."""
    from train.nworker import NWorkerRun, expand_nworker_runs

    cfg = validate_dict({**BASE, "k_vals": [3], "n_workers": [8], "stragglers": [2], "max_patterns": 4, "seed": 3})
    train, evaluation = NWorkerRun.patterns(cfg, expand_nworker_runs(cfg)[0])
    assert torch.equal(train, straggler_patterns(8, 2, 4, seed=3))
    assert torch.equal(evaluation, straggler_patterns(8, 2, 4, seed=4))
    assert {tuple(r.tolist()) for r in train} != {tuple(r.tolist()) for r in evaluation}
    seeded = validate_dict({**BASE, "k_vals": [3], "n_workers": [8], "stragglers": [2], "max_patterns": 4,
                            "seed": 3, "seeds": [7]})
    assert torch.equal(NWorkerRun.patterns(seeded, expand_nworker_runs(seeded)[0])[0],
                       straggler_patterns(8, 2, 4, seed=7))  # a seeds sweep trains each run on its own draw


# -- refusals before any work --------------------------------------------------------------------------
def test_fewer_workers_than_inputs_is_refused_naming_n_workers():
    with pytest.raises(ConfigError, match=r"'n_workers'.*N >= K.*n_workers \[3\] with k_vals \[4\]"):
        validate_dict({**BASE, "n_workers": [3]})
    assert validate_dict({**BASE, "n_workers": [4]}).n_workers == [4]


def test_a_size_that_cannot_fit_is_refused_with_its_estimate_before_any_allocation(monkeypatch):
    import util.memory
    from train.nworker import probe_nworker_coders

    cfg = validate_dict({**BASE, "n_workers": [1_000_000_000]})
    with pytest.raises(ConfigError, match=r"'n_workers'.*N=1,000,000,000.*matrices .*GiB.*needs about .* of memory"):
        probe_nworker_coders(cfg)  # a (N, K) float64 matrix alone would be 32 GB: refused, not allocated
    small = validate_dict({**BASE, "n_workers": [9], "eval_batch_size": 64})
    probe_nworker_coders(small)
    monkeypatch.setattr(util.memory, "available_memory", lambda: 2 ** 20)  # a 1 MiB machine
    with pytest.raises(ConfigError, match=r"'n_workers'.*batches"):
        probe_nworker_coders(small)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_learned_nworker_coders_bad_width_is_refused_by_the_one_check(bad):
    # coders.nworker's learned pair uses coders.coder.check_size, as every other coder does
    from coders.nworker import MLPDecoder, MLPEncoder
    for cls in (MLPEncoder, MLPDecoder):
        with pytest.raises(ValueError, match=f"its 'hidden' must be a positive integer; got {bad!r}"):
            cls(2, 3, [-1, 4], hidden=bad)
