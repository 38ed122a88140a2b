"""The decoders told which outputs are missing (coders/masked.py, coders/attention.py), the
training-signal options of train/losses.py, and the k = 4 / 8 configs of conf/k48/."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coders.attention import AttentionDecoder
from coders.code import Code
from coders.config import expand_runs, load_config
from coders.masked import MaskedMLPDecoder
from coders.scenarios import enumerate_scenarios, unavailable_data, unavailable_pairs
from coders.summation import AdditionEncoder
from train.losses import KLBase, KLLabelMix, scenario_groups, weighted_by_scenario
from train.preflight import preflight, probe_loss
from util.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DECODERS = [MaskedMLPDecoder, AttentionDecoder]


@pytest.mark.parametrize("cls", DECODERS)
@pytest.mark.parametrize("k,r", [(2, 1), (4, 1), (8, 2)])
def test_shapes_and_every_parameter_learns(cls, k, r):
    torch.manual_seed(0)
    dec = cls(k, r, [-1, 10])
    available = enumerate_scenarios(k, r)
    out = dec(torch.randn(len(available), k + r, 10), available)
    assert out.shape == (len(available), k, 10)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())


@pytest.mark.parametrize("cls,key,bad", [(AttentionDecoder, "width", 0), (AttentionDecoder, "layers", 0),
                                         (AttentionDecoder, "heads", True), (MaskedMLPDecoder, "hidden", -4),
                                         (MaskedMLPDecoder, "depth", 1.5)])
def test_a_bad_size_names_its_own_key(cls, key, bad):
    # one check (coders.coder.check_size) for every coder's widths and counts, naming the key the user wrote
    with pytest.raises(ValueError, match=f"its '{key}' must be a positive integer; got {bad!r}"):
        cls(2, 1, [-1, 10], **{key: bad})


@pytest.mark.parametrize("cls", DECODERS)
def test_what_an_unavailable_output_holds_never_matters_but_the_mask_does(cls):
    torch.manual_seed(0)
    k, r = 4, 2
    dec = cls(k, r, [-1, 10]).eval()
    available = enumerate_scenarios(k, r)
    x = torch.randn(len(available), k + r, 10)
    garbage = torch.where(available[..., None], x, 1e3 * torch.randn_like(x))
    zeroed = x * available[..., None]
    with torch.no_grad():
        assert torch.equal(dec(garbage, available), dec(zeroed, available))
        # the mask is an input: the same zero-filled outputs read differently under another mask
        assert not torch.allclose(dec(zeroed, available), dec(zeroed, available.roll(1, 0)))
    with pytest.raises(ValueError, match="availability"):
        dec(x)
    with pytest.raises(ValueError, match="shape"):
        dec(x, available[:, :k])


def _subtraction_map(k: int, n: int) -> torch.Tensor:
    """``(k n, (k + 1) n)``: data output j rebuilt as the parity output minus the other data outputs."""
    sub = torch.zeros(k * n, (k + 1) * n)
    for j in range(k):
        for i in range(k):
            if i != j:
                sub[j * n:(j + 1) * n, i * n:(i + 1) * n] = -torch.eye(n)
        sub[j * n:(j + 1) * n, k * n:] = torch.eye(n)
    return sub


@torch.no_grad()
def _set_masked(dec: MaskedMLPDecoder, sub: torch.Tensor) -> None:
    """hidden = 2 (k+1) n, depth 2: the first layer splits each value v into relu(v) and relu(-v)
    (the availability flags get weight 0), the second passes them on, the last recombines them
    (v = relu(v) - relu(-v)) through the subtraction map."""
    m = sub.shape[1]
    lin = [mod for mod in dec.nn if isinstance(mod, nn.Linear)]
    for layer in lin:
        layer.bias.zero_()
    lin[0].weight.zero_()
    lin[0].weight[:m, :m] = torch.eye(m)
    lin[0].weight[m:, :m] = -torch.eye(m)
    lin[1].weight.copy_(torch.eye(2 * m))
    lin[2].weight.copy_(torch.cat([sub, -sub], 1))


@torch.no_grad()
def _set_attention(dec: AttentionDecoder, sub: torch.Tensor) -> None:
    """The transformer's read-out silenced, the linear path set to the subtraction map."""
    dec.readout.weight.zero_()
    dec.readout.bias.zero_()
    dec.linear.weight.copy_(sub)
    dec.linear.bias.zero_()


@pytest.mark.parametrize("cls,setter", [(MaskedMLPDecoder, _set_masked), (AttentionDecoder, _set_attention)])
def test_decoder_rebuilds_a_linear_f_exactly_through_the_code(cls, setter):
    """F linear and the parity the sum of the inputs: F(parity) - the other outputs is the missing one,
    which each decoder can represent. Through Code.forward_groups (every scenario, availability passed)
    the rebuilt outputs must then be exact; a wrong reshape, mask or token order would break it."""
    torch.manual_seed(0)
    k, n, d = 3, 5, 12
    args = {"hidden": 2 * (k + 1) * n, "depth": 2} if cls is MaskedMLPDecoder else {}
    dec = cls(k, 1, [-1, n], **args)
    setter(dec, _subtraction_map(k, n))
    f = nn.Sequential(nn.Flatten(), nn.Linear(d, n, bias=False))
    code = Code(f, AdditionEncoder(k, 1, [-1, 1, 3, 4]), dec, None, k, 1)
    x = torch.randn(6, k, 1, 3, 4)
    fx = f(x.flatten(0, 1)).view(6, k, n)
    recon, _ = code.forward_groups(x, fx)                       # (S, B, k, n)
    unavailable = unavailable_data(code.scenarios, k)
    for s in range(len(code.scenarios)):
        j = int(unavailable[s].nonzero()[0, 0])
        assert torch.allclose(recon[s, :, j], fx[:, j], atol=1e-5)
    # the weights are what makes it exact: a fresh decoder is far off
    fresh, _ = Code(f, AdditionEncoder(k, 1, [-1, 1, 3, 4]), cls(k, 1, [-1, n]), None, k, 1).forward_groups(x, fx)
    assert not torch.allclose(fresh[0, :, 0], fx[:, 0], atol=1e-1)


# -- training signal (train/losses.py) ------------------------------------------------------------

def test_temperature_and_label_mix():
    torch.manual_seed(0)
    recon, fx, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(10, (6,))
    plain = F.kl_div(F.log_softmax(recon, -1), F.softmax(fx, -1), reduction="batchmean")
    assert torch.allclose(KLBase()(recon, fx), plain, atol=1e-6)
    t = 3.0
    soft = F.kl_div(F.log_softmax(recon / t, -1), F.softmax(fx / t, -1), reduction="batchmean") * t * t
    assert torch.allclose(KLBase(temperature=t)(recon, fx), soft, atol=1e-6)
    assert not torch.allclose(soft, plain)
    assert torch.allclose(KLLabelMix(label_weight=0.0)(recon, fx, y), plain, atol=1e-6)
    assert torch.allclose(KLLabelMix(label_weight=1.0)(recon, fx, y), F.cross_entropy(recon, y), atol=1e-6)
    mix = KLLabelMix(label_weight=0.25, temperature=t)(recon, fx, y)
    assert torch.allclose(mix, 0.75 * soft + 0.25 * F.cross_entropy(recon, y), atol=1e-6)
    probe_loss(KLLabelMix(), "kl-xent")  # the preflight calls it with both targets
    for bad in ({"temperature": 0}, {"label_weight": 1.5}):
        with pytest.raises(ValueError):
            KLLabelMix(**bad)


def test_scenario_power_weighs_scenarios_by_missing_data_outputs():
    k, r, b = 3, 2, 4
    unavailable = unavailable_data(enumerate_scenarios(k, r), k)
    pairs = unavailable_pairs(unavailable)
    u_of_pair = unavailable.sum(1)[pairs[0]].float()
    assert scenario_groups(unavailable, 1.0) is None
    torch.manual_seed(0)
    per_row = torch.rand(len(u_of_pair) * b)          # a row's loss, rows ordered (pair, group)
    u_of_row = u_of_pair.repeat_interleave(b)

    def mean_loss(rows):
        return per_row.mean() if rows is None else per_row[rows].mean()

    for p in (0.0, 2.0):
        w = u_of_row ** (p - 1)
        expected = (w * per_row).sum() / w.sum()
        got = weighted_by_scenario(mean_loss, len(per_row), len(u_of_pair), scenario_groups(unavailable, p))
        assert torch.allclose(got, expected, atol=1e-6)
    # p = 0: each scenario weighs alike, so a one-missing and a two-missing scenario carry equal mass
    groups = dict((int(u_of_pair[g[0]]), w) for g, w in scenario_groups(unavailable, 0.0))
    n_scen = {u: int((unavailable.sum(1) == u).sum()) for u in (1, 2)}
    assert groups[1] / n_scen[1] == pytest.approx(groups[2] / n_scen[2])


def test_engine_trains_with_the_label_mix_and_scenario_power(digits_config):
    """One short digits run with the new options goes through the real step and evaluation."""
    from train.cli import run_all

    path = digits_config(num_epoch=1, k_vals=[2], r_vals=[2], losses=["kl-xent"], scenario_power=2.0,
                         enc_dec_types=[["coders.mlp.MLPEncoder", "coders.masked.MaskedMLPDecoder"]])
    (rows,) = run_all(str(path), {})
    assert torch.isfinite(torch.tensor(rows[-1]["train_loss"]))
    assert rows[-1]["val_recon_acc"] > rows[0]["val_recon_acc"]
    with pytest.raises(ConfigError, match="scenario_power"):
        load_config(digits_config(scenario_power=100.0))


# -- the shipped configs ----------------------------------------------------------------------------

K48 = sorted((ROOT / "conf" / "k48").glob("*.json"))


def test_k48_configs_pass_the_whole_sweep_preflight(anchor_dir, monkeypatch):
    """Every config of conf/k48 passes train.preflight.preflight, as train.py runs it. The configs
    share their coder pairs, so each distinct pair, k and r is built and called once for all of them
    (preflight already does so within one sweep)."""
    import train.preflight as pf

    monkeypatch.chdir(ROOT)  # base_model_file is ../shared/anchor_models/..., relative to the checkout
    shared: set = set()
    probe = pf.probe_run_coders
    monkeypatch.setattr(pf, "probe_run_coders", lambda run, shape, n, probed: probe(run, shape, n, shared))
    assert len(K48) >= 10
    for path in K48:
        raw = json.loads(path.read_text())
        cfg = load_config(path)
        # Each config lists the seeds its rows were run on (0-2, or seed 0 alone where only it ran).
        assert cfg.seeds in ([0], [0, 1, 2]) and cfg.save_dir == f"results_k48/{path.stem}", path
        # F: the anchor weights, or one lcc trains itself under results_k48/ (LeNet-5, other F).
        if "base_model_file" in raw:
            assert Path(raw["base_model_file"]).is_file(), path
        else:
            assert cfg.base_model_dir.startswith("results_k48/"), path
        preflight(cfg, expand_runs(cfg))
    assert len(shared) >= 17  # nine coder pairs at k = 4 and eight at k = 8 were really probed
