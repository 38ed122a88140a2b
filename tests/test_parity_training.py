"""Parity models (paradigm 2) and training-free codes inside the trainer."""
import itertools

import pytest
import torch

from base_models.fit import build_base_model, default_path, load_state
from train.cli import run_all
from coders.config import expand_runs, load_config
from train.engine import CodedRun
from train.metrics import Tally

ADD = [["coders.summation.AdditionEncoder", "coders.summation.SubtractionDecoder"]]
CONCAT = [["coders.image.ConcatenationEncoder", "coders.summation.SubtractionDecoder"]]
BERRUT = [["coders.berrut.BerrutEncoder", "coders.berrut.BerrutDecoder"]]
PARITY_FLAGS = {"train_encoder": False, "train_decoder": False, "train_parity_model": True}


def make_run(path, **overrides) -> CodedRun:
    cfg = load_config(path, overrides)
    return CodedRun(cfg, expand_runs(cfg)[0])


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_untrained_parities_go_through_f_itself(digits_config, base_model_dir):
    run = make_run(digits_config(enc_dec_types=ADD, train_encoder=False, train_decoder=False))
    assert run.parity_models is None
    # F is the trained file's network, not a fresh one
    reference = load_state(build_base_model("base-mlp", run.splits), default_path("digits", "base-mlp", str(base_model_dir)))
    for key, value in reference.state_dict().items():
        assert torch.equal(value, run.base.state_dict()[key])
    x = run.data["val"][0][:8].view(4, 2, 1, 8, 8)
    with torch.no_grad():
        parities = run.encode(x)
        assert torch.allclose(run.parity_outputs(parities)[:, 0], reference(parities[:, 0]))


def test_trained_parity_model_learns_while_f_does_not_change(digits_config):
    run = make_run(digits_config(enc_dec_types=ADD, **PARITY_FLAGS))
    assert run.parity_models is not None and len(run.parity_models) == 1
    f_before, p_before = snapshot(run.base), snapshot(run.parity_models)
    run.train_mode(True)
    for i in range(3):
        run.step(torch.arange(i * 32, (i + 1) * 32).view(16, 2), Tally())
    assert all(torch.equal(v, run.base.state_dict()[k]) for k, v in f_before.items())
    changed = [k for k, v in p_before.items() if not torch.equal(v, run.parity_models.state_dict()[k])]
    assert changed == list(p_before), "every parity-model tensor was updated"
    # the parity model starts fresh by default, not as a copy of F
    assert not torch.equal(p_before["0.nn.0.weight"], f_before["nn.0.weight"])


def test_parity_model_can_start_from_f(digits_config):
    run = make_run(digits_config(enc_dec_types=ADD, parity_model_init="base", **PARITY_FLAGS))
    assert torch.equal(run.parity_models[0].nn[0].weight, run.base.nn[0].weight)
    assert run.parity_models[0].nn[0].weight.requires_grad and not run.base.nn[0].weight.requires_grad


def test_parity_loss_targets_combine_labels(digits_config):
    run = make_run(digits_config(enc_dec_types=ADD, **PARITY_FLAGS))
    assert run.parity_loss and not run.recon_loss
    fx = torch.randn(5, 2, 10)
    fp = fx.sum(1, keepdim=True)  # a perfect parity model
    recon = torch.randn(len(run.available), 5, 2, 10)
    y = torch.zeros(5, 2, dtype=torch.long)
    assert run.loss(*run.select_unavailable(recon, fx, y), fp, fx).item() == pytest.approx(0.0, abs=1e-10)
    assert run.loss(*run.select_unavailable(recon, fx, y), fp + 1.0, fx).item() == pytest.approx(1.0)


def test_mds_r2_uses_one_parity_model_per_parity(digits_config):
    run = make_run(digits_config(enc_dec_types=[["coders.mds.MDSEncoder", "coders.mds.MDSDecoder"]],
                                 r_vals=[2], **PARITY_FLAGS))
    assert len(run.parity_models) == 2
    rows = run.fit()
    assert rows[-1]["val_recon_acc"] > rows[0]["val_recon_acc"]


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)),
                         ids=lambda f: "E{}P{}D{}".format(*map(int, f)))
def test_any_combination_of_train_flags_runs(digits_config, flags):
    enc, par, dec = flags
    run = make_run(digits_config(train_encoder=enc, train_parity_model=par, train_decoder=dec, num_epoch=1))
    before = {"E": snapshot(run.encoder), "D": snapshot(run.decoder)}
    rows = run.fit()
    assert [r["epoch"] for r in rows] == ([0, 1] if any(flags) else [0])
    for name, flag, module in (("E", enc, run.encoder), ("D", dec, run.decoder)):
        moved = any(not torch.equal(v, module.state_dict()[k]) for k, v in before[name].items())
        assert moved == flag, f"{name} trained={moved}, flag={flag}"


# Digits test reconstruction is 98.6% at k = 2, r = 1 and 45.9% at k = 4, r = 2; parity nodes
# placed at the end of the interval instead of among the data nodes give 76.7% and 21.9%.
@pytest.mark.parametrize("ec_k, ec_r, least", [(2, 1, 0.95), (4, 2, 0.40)])
def test_berrut_needs_no_training(digits_config, ec_k, ec_r, least):
    rows = run_all(str(digits_config(enc_dec_types=BERRUT, num_epoch=0, train_encoder=False, train_decoder=False,
                                     k_vals=[ec_k], r_vals=[ec_r])), {})[0]
    assert len(rows) == 1 and rows[0]["epoch"] == 0
    assert rows[0]["test_recon_acc"] > least


def test_digits_addition_parity_model_beats_chance_by_far(digits_config):
    rows = run_all(str(digits_config(enc_dec_types=ADD, num_epoch=15, **PARITY_FLAGS)), {})[0]
    best = max(rows, key=lambda r: r["val_recon_acc"])
    assert best["test_recon_acc"] >= 0.8


def test_concatenation_parity_model_trains(digits_config):
    rows = run_all(str(digits_config(enc_dec_types=CONCAT, num_epoch=15, **PARITY_FLAGS)), {})[0]
    assert max(r["val_recon_acc"] for r in rows) > rows[0]["val_recon_acc"] + 0.3
