"""Code forms (coders/form.py): one spec, one expander, one builder for every form, and each form answers
what used to be an ``== "nworker"`` branch; the old names of the N-worker spec, expander and builders work."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from coders.build import build_coders
from coders.config import validate_dict
from coders.form import FORMS, CodeForm, NWorkerSpec, RunSpec, expand_runs, form_named, form_of, form_of_record
from util.errors import ConfigError

COMMON = {"num_epoch": 1, "k_vals": [3], "datasets": ["digits"], "models": ["base-mlp"], "losses": ["mse"]}
SYSTEMATIC = {**COMMON, "r_vals": [1, 2], "enc_dec_types": [["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]]}
NWORKER = {**COMMON, "form": "nworker", "n_workers": [4, 6], "stragglers": [1],
           "enc_dec_types": [["coders.nworker.BerrutEncoder", "coders.nworker.BerrutDecoder"]]}


def test_one_expander_gives_each_form_its_runs_and_folders():
    sys_runs, nw_runs = expand_runs(validate_dict(SYSTEMATIC)), expand_runs(validate_dict(NWORKER))
    assert [(s.form, s.k, s.r) for s in sys_runs] == [("systematic", 3, 1), ("systematic", 3, 2)]
    assert [(s.form, s.n_workers, s.stragglers) for s in nw_runs] == [("nworker", 4, 1), ("nworker", 6, 1)]
    assert sys_runs[1].folder("save") == Path("save/digits/base-mlp/k3/r2/mse/MLPEncoder/MLPDecoder")
    assert nw_runs[1].folder("save") == Path("save/digits/base-mlp/k3/n6/s1/mse/BerrutEncoder/BerrutDecoder")
    assert nw_runs[0].describe() == "digits base-mlp K=3 N=4 S=1 BerrutEncoder/BerrutDecoder"
    assert sys_runs[0].describe() == "digits base-mlp k=3 r=1 mse MLPEncoder/MLPDecoder"
    with pytest.raises(AttributeError, match="n_workers, stragglers"):
        nw_runs[0].r  # an N-worker run has no r


def test_the_old_spec_names_make_the_one_spec():
    # RunSpec(dataset, model, k, r, loss, encoder, decoder, seed) as before; NWorkerSpec(.., K, N, S, ..) its N-worker
    old = RunSpec("digits", "base-mlp", 3, 2, "mse", "coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder", 7)
    assert (old.form, old.r, old.sizes) == ("systematic", 2, (2,))
    assert old.folder("s") == Path("s/digits/base-mlp/k3/r2/mse/MLPEncoder/MLPDecoder/seed7")
    nw = NWorkerSpec("digits", "base-mlp", 3, 6, 1, "mse", "coders.nworker.BerrutEncoder",
                     "coders.nworker.BerrutDecoder")
    assert nw == expand_runs(validate_dict(NWORKER))[1]
    from train.nworker import NWorkerSpec as from_train, expand_nworker_runs

    assert from_train is NWorkerSpec and expand_nworker_runs(validate_dict(NWORKER))[1] == nw
    with pytest.raises(ValueError, match="n_workers, stragglers"):
        RunSpec("digits", "base-mlp", 3, 2, "mse", "e", "d", form="nworker")  # one size for a form of two


def test_a_run_records_its_choices_as_its_config_json_always_held_them():
    # the keys and their order of config.json (resume compares the whole config with its checkpoint's)
    (spec, _) = expand_runs(validate_dict(SYSTEMATIC))
    assert list(spec.record()) == ["dataset", "model", "k", "r", "loss", "encoder", "decoder", "run_seed", "form"]
    nw = expand_runs(validate_dict({**NWORKER, "seeds": [5]}))[0]
    assert nw.record() == {"dataset": "digits", "model": "base-mlp", "k": 3, "n_workers": 4, "stragglers": 1,
                           "loss": "mse", "encoder": "coders.nworker.BerrutEncoder",
                           "decoder": "coders.nworker.BerrutDecoder", "run_seed": 5, "form": "nworker"}
    assert form_of_record(nw.record()) is FORMS["nworker"] and form_of_record({"k": 2}) is FORMS["systematic"]


def test_one_builder_builds_either_form_and_the_old_nworker_builders_agree():
    from coders.nworker import build_nworker_coders as by_sizes
    from train.nworker import build_nworker_coders as by_spec

    nw = expand_runs(validate_dict(NWORKER))[0]
    enc, dec = build_coders(nw, (1, 8, 8), 10)
    old_enc, old_dec = by_sizes(nw.encoder, nw.decoder, 3, 4, (1, 8, 8), 10)
    assert by_spec is build_coders
    x = torch.randn(2, 3, 64)
    assert torch.equal(enc(x), old_enc(x)) and enc(x).shape == (2, 4, 64)  # Berrut: no random weights
    out, avail = torch.randn(2, 4, 10), torch.tensor([[True, True, False, True]] * 2)
    assert torch.equal(dec(out, avail), old_dec(out, avail))
    sys_enc, sys_dec = build_coders(expand_runs(validate_dict(SYSTEMATIC))[1], (1, 8, 8), 10)
    assert sys_enc(torch.randn(2, 3, 64)).shape == (2, 2, 64)  # k = 3 data inputs -> r = 2 parities
    bad = {"class": "coders.nworker.BerrutEncoder", "args": {"nope": 1}}
    with pytest.raises(ConfigError, match="N-worker encoder BerrutEncoder-nope1 could not"):  # its form's builder
        build_coders(dataclasses.replace(nw, encoder=bad), (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="'enc_dec_types': encoder BerrutEncoder-nope1 could not"):
        build_coders(dataclasses.replace(expand_runs(validate_dict(SYSTEMATIC))[0], encoder=bad), (1, 8, 8), 10)


def test_each_form_knows_its_codes_layout_and_which_strategies_serve_it():
    from coders.nworker import BerrutDecoder, BerrutEncoder, NWorkerCode
    from coders.systematic import Code

    f = torch.nn.Linear(4, 3)
    nw = NWorkerCode(f, BerrutEncoder(3, 5, [-1, 4]), BerrutDecoder(3, 5, [-1, 3]), 3, 5, 1)
    sys_code = Code(f, torch.nn.Identity(), torch.nn.Identity(), None, 3, 2)
    assert form_of(nw) is FORMS["nworker"] and form_of(sys_code) is FORMS["systematic"]
    assert form_of(nw).layout(nw) == (3, 2, 4) and form_of(sys_code).layout(sys_code) == (3, 2, 3)
    assert form_of(nw).shape(3, 2, 4) == "K=3, N=5, S=1" and form_of(sys_code).shape(3, 2, 3) == "k=3, r=2"
    assert (FORMS["nworker"].all_coded, FORMS["systematic"].all_coded) == (True, False)
    assert not FORMS["nworker"].serves("coded") and FORMS["nworker"].serves("nworker")
    assert not FORMS["systematic"].serves("nworker") and FORMS["systematic"].serves("coded")
    assert all(form.serves("none") and form.serves("backup") for form in FORMS.values())
    nw.n_workers = 2  # N < K: serving cannot lay it out
    with pytest.raises(ConfigError, match="'runs'.*N = 2 < K"):
        form_of(nw).check_servable(nw, "r0")


def test_a_form_checks_its_keys_and_the_others_refuse_theirs():
    with pytest.raises(ConfigError, match="'n_workers' is read only by the N-worker form"):
        validate_dict({**SYSTEMATIC, "n_workers": [4]})
    with pytest.raises(ConfigError, match="'stragglers' must list at least one value"):
        validate_dict({**NWORKER, "stragglers": []})
    with pytest.raises(ConfigError, match="'form' must be one of 'systematic', 'nworker'"):
        validate_dict({**SYSTEMATIC, "form": "lagrange"})
    with pytest.raises(ConfigError, match="'k_vals', 'n_workers', 'stragglers' or 'seeds'"):
        validate_dict({**NWORKER, "n_workers": [4, 4]})  # two runs of one folder, named by the form's keys
    with pytest.raises(KeyError, match="the forms are systematic, nworker"):
        form_named("lagrange")


def test_a_third_form_is_one_class_in_the_registry(monkeypatch):
    class Wide(CodeForm):  # a systematic code whose folders say how wide: w<r>
        name, sizes, sweep_keys, folder_letters = "wide", ("r",), ("r_vals",), ("w",)

        def describe(self, spec):
            return f"k={spec.k} w={spec.r}"

    monkeypatch.setitem(FORMS, "wide", Wide())
    cfg = dataclasses.replace(validate_dict(SYSTEMATIC), form="wide")
    runs = expand_runs(cfg)
    assert [s.folder("x").parts[4] for s in runs] == ["w1", "w2"] and runs[0].describe().endswith("k=3 w=1")
    assert Wide().run_keys()["r"] == "r_vals" and Wide().label({"k": 3, "r": 1}) == "k=3 r=1"
    assert not FORMS["systematic"].serves("nworker")  # the registry's other forms still answer
