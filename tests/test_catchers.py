"""Direct catchers for one-line bugs a mutation run planted in the core (issue 13).

Each test pins one behaviour against an exact computation or against what a
probe records: a loss, coder or decoder written next to the config, as a user
would. ``python tests/mutants.py`` plants the bugs again and checks that these
tests turn red.
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from coders.berrut import BerrutDecoder, BerrutEncoder, berrut_nodes
from coders.image import ConcatenationEncoder
from train.cli import run_all
from coders.config import expand_runs, load_config
from train.engine import CodedRun
from train.losses import KLBase

MDS = "coders.mds.MDSEncoder"
NO_TRAINING = {"train_encoder": False, "train_decoder": False, "train_parity_model": False}


def make_run(path) -> CodedRun:
    cfg = load_config(path)
    return CodedRun(cfg, expand_runs(cfg)[0])


def write_probe(folder: Path, source: str) -> str:
    """Write ``source`` as a module beside the config under a fresh name (no clash in sys.modules)."""
    name = f"probe_{uuid.uuid4().hex[:12]}"
    (folder / f"{name}.py").write_text(source)
    return name


def probe(name: str):
    """The probe module the run imported (its module-level lists hold what it recorded)."""
    return sys.modules[name]


def run_folder(save_dir) -> Path:
    return next(Path(save_dir).rglob("current.pt")).parent


def epoch_of(path: Path) -> int:
    return torch.load(path, weights_only=True)["epoch"]


# ---------------------------------------------------------------- KL-Base direction

def test_kl_base_is_kl_of_f_outputs_against_the_reconstruction():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=torch.float64)  # softmax of F's outputs
    q = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]], dtype=torch.float64)    # softmax of the reconstructions
    # Logits are log-probabilities up to a constant per row, which softmax removes.
    got = KLBase()(q.log() + 3.0, p.log() - 1.5).item()
    # KL(p || q) = sum p log(p / q), averaged over rows, worked out by hand:
    # row 0: 0.7 ln 3.5 + 0.2 ln 0.4 + 0.1 ln(1/3) = 0.583815; row 1: 0.540272.
    assert got == pytest.approx((0.583815 + 0.540272) / 2, abs=1e-5)
    assert got == pytest.approx(F.kl_div(q.log(), p, reduction="batchmean").item(), rel=1e-12)
    reverse = F.kl_div(p.log(), q, reduction="batchmean").item()  # KL(q || p) = 0.478106
    assert abs(got - reverse) > 0.05, "the data tells the two directions apart"


def test_kl_loss_in_a_run_is_kl_base(digits_config):
    run = make_run(digits_config(losses=["kl"], num_epoch=0))
    gen = torch.Generator().manual_seed(0)
    recon, target = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen)
    expected = F.kl_div(F.log_softmax(recon, -1), F.softmax(target, -1), reduction="batchmean")
    torch.testing.assert_close(run.loss_fn(recon, target), expected)


# ---------------------------------------------------------------- augmentation

RECORDING_ENCODER = """
import torch
from torch import nn
from coders.mlp import MLPEncoder

SEEN = []      # encoder inputs of training steps
TARGETS = []   # loss targets of training steps


class RecordingEncoder(MLPEncoder):
    def forward(self, in_data):
        if torch.is_grad_enabled():  # evaluation runs without gradients
            SEEN.append(in_data.detach().clone())
        return super().forward(in_data)


class RecordingMSE(nn.MSELoss):
    def forward(self, recon, target):
        if torch.is_grad_enabled():
            TARGETS.append(target.detach().clone())
        return super().forward(recon, target)
"""


def test_under_augmentation_the_targets_are_f_on_the_augmented_images(digits_config, tmp_path):
    mod = write_probe(tmp_path, RECORDING_ENCODER)
    run = make_run(digits_config(augment=True, num_epoch=1, batch_size=64,
                                 enc_dec_types=[[f"{mod}.RecordingEncoder", "coders.mlp.MLPDecoder"]],
                                 losses=[f"{mod}.RecordingMSE"]))
    run.fit()
    seen, targets = probe(mod).SEEN, probe(mod).TARGETS
    assert len(seen) == len(targets) > 5
    train_x = run.splits.split("train")[0].flatten(1)
    clean = {row.numpy().tobytes() for row in train_x}
    for x, target in list(zip(seen, targets))[:5]:
        images = x.reshape(-1, 1, 8, 8)  # (B * k, C, H, W): what the encoder was given
        moved = sum(row.numpy().tobytes() not in clean for row in images.flatten(1))
        assert moved > 0.8 * len(images), "the encoder saw augmented images"
        with torch.no_grad():
            f_aug = run.base(images)
        # every target row is F's output on one of the images the encoder saw (up to rounding:
        # F may have run on another batch); F on another image lies far away
        distance = torch.cdist(target, f_aug).min(dim=1).values
        assert distance.max() < 0.05, f"{int((distance >= 0.05).sum())} of {len(target)} targets are not F(augmented)"


# ---------------------------------------------------------------- resume and the best checkpoint

FROZEN_ADAM = {"class": "torch.optim.Adam", "args": {"lr": 0.0, "weight_decay": 0.0}}


def test_a_tie_for_the_best_validation_accuracy_goes_to_the_earlier_epoch(digits_config):
    path = digits_config(num_epoch=2, optimizer=FROZEN_ADAM)  # lr 0: every epoch scores the same
    rows = run_all(str(path), {})[0]
    assert len({r["val_recon_acc"] for r in rows}) == 1
    assert epoch_of(run_folder(load_config(path).save_dir) / "best.pt") == 0


def test_resume_remembers_the_best_validation_accuracy(digits_config):
    path = digits_config(num_epoch=2)
    rows = run_all(str(path), {})[0]
    best = min((r for r in rows), key=lambda r: (-r["val_recon_acc"], r["epoch"]))
    folder = run_folder(load_config(path).save_dir)
    assert epoch_of(folder / "best.pt") == best["epoch"]
    # One more epoch that cannot move the code: it only ties epoch 2, so best.pt must stay.
    rows = run_all(str(path), {"num_epoch": 3, "optimizer": FROZEN_ADAM}, resume=True)[0]
    assert rows[3]["val_recon_acc"] == rows[2]["val_recon_acc"] <= best["val_recon_acc"]
    assert epoch_of(folder / "best.pt") == best["epoch"]
    assert epoch_of(folder / "current.pt") == 3


DROPOUT_DECODER = """
import torch.nn.functional as F
from coders.mlp import MLPDecoder


class DropoutDecoder(MLPDecoder):
    # draws its masks from torch's global generator, as a user's nn.Dropout would
    def forward(self, in_data, available=None):
        return super().forward(F.dropout(in_data, 0.3, self.training))
"""


def _numbers(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_resume_restores_the_global_torch_generator(digits_config, tmp_path):
    mod = write_probe(tmp_path, DROPOUT_DECODER)
    coders = [["coders.mlp.MLPEncoder", f"{mod}.DropoutDecoder"]]
    full = run_all(str(digits_config(num_epoch=2, enc_dec_types=coders, save_dir=str(tmp_path / "a"))), {})[0]
    path = digits_config(num_epoch=1, enc_dec_types=coders, save_dir=str(tmp_path / "b"))
    run_all(str(path), {})
    resumed = run_all(str(path), {"num_epoch": 2}, resume=True)[0]
    assert _numbers(resumed) == _numbers(full)


def test_resume_carries_the_optimizer_moments_over_exactly(digits_config):
    path = digits_config(num_epoch=1)
    run_all(str(path), {})
    ckpt = run_folder(load_config(path).save_dir) / "current.pt"
    saved = torch.load(ckpt, weights_only=True)["optimizer"]
    lower = {"class": "torch.optim.Adam", "args": {"lr": 2.5e-4, "weight_decay": 0.0}}
    run = make_run(digits_config(num_epoch=2, optimizer=lower))
    run.load_state(ckpt)
    loaded = run.optimizer.state_dict()
    assert loaded["state"].keys() == saved["state"].keys() and saved["state"]
    for key, moments in saved["state"].items():
        for name, value in moments.items():
            assert torch.equal(loaded["state"][key][name], value), (key, name)
    assert all(g["lr"] == 2.5e-4 and g["weight_decay"] == 0.0 for g in run.optimizer.param_groups)
    # After one more epoch Adam has counted both epochs' steps.
    run_all(str(path), {"num_epoch": 2, "optimizer": lower}, resume=True)
    after = torch.load(ckpt, weights_only=True)["optimizer"]["state"]
    assert all(float(after[key]["step"]) == 2 * float(saved["state"][key]["step"]) for key in after)


# ---------------------------------------------------------------- Berrut

def chebyshev_sorted(n: int) -> list[float]:
    return sorted(math.cos((2 * m + 1) * math.pi / (2 * n)) for m in range(n))


def nodes_by_hand(k: int, r: int) -> tuple[list[float], list[float]]:
    """The layout the module documents: parities at sorted indices (j + 1)(k + r - 1) // (r + 1)."""
    points = chebyshev_sorted(k + r)
    parity_index = {(j + 1) * (k + r - 1) // (r + 1) for j in range(r)}
    return ([p for i, p in enumerate(points) if i not in parity_index],
            [p for i, p in enumerate(points) if i in parity_index])


def berrut_by_hand(nodes: list[float], values: list[list[float]], z: float) -> list[float]:
    """Berrut's interpolant sum w_i f_i / (z - x_i) / sum w_i / (z - x_i), w_i = (-1)^(rank of x_i)."""
    order = sorted(range(len(nodes)), key=lambda i: nodes[i])
    sign = {i: (-1) ** rank for rank, i in enumerate(order)}
    denominator = sum(sign[i] / (z - nodes[i]) for i in range(len(nodes)))
    return [sum(sign[i] * values[i][c] / (z - nodes[i]) for i in range(len(nodes))) / denominator
            for c in range(len(values[0]))]


@pytest.mark.parametrize("ec_k, ec_r", [(2, 1), (3, 1), (3, 2), (4, 2), (5, 3)])
def test_berrut_parity_nodes_sit_among_the_data_nodes(ec_k, ec_r):
    data_nodes, parity_nodes = berrut_nodes(ec_k, ec_r)
    want_data, want_parity = nodes_by_hand(ec_k, ec_r)
    assert data_nodes.tolist() == pytest.approx(want_data, abs=1e-12)
    assert parity_nodes.tolist() == pytest.approx(want_parity, abs=1e-12)
    assert data_nodes.min() < parity_nodes.min() and parity_nodes.max() < data_nodes.max()


def test_berrut_two_data_one_parity_is_the_mean():
    # Nodes -sqrt(3)/2, 0, sqrt(3)/2 with the parity in the middle: the interpolant there is the mean.
    x = torch.randn(4, 2, 64)
    torch.testing.assert_close(BerrutEncoder(2, 1, [-1, 64])(x), x.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("ec_k, ec_r", [(2, 1), (3, 2), (4, 2), (5, 3)])
def test_berrut_code_matches_the_closed_form_interpolant(ec_k, ec_r):
    gen = torch.Generator().manual_seed(ec_k * 10 + ec_r)
    n = 3
    data = torch.randn(ec_k, n, generator=gen, dtype=torch.float64)
    data_nodes, parity_nodes = nodes_by_hand(ec_k, ec_r)
    values = data.tolist()
    parities = [berrut_by_hand(data_nodes, values, z) for z in parity_nodes]
    encoded = BerrutEncoder(ec_k, ec_r, [-1, n])(data.float().unsqueeze(0))[0]
    torch.testing.assert_close(encoded.double(), torch.tensor(parities, dtype=torch.float64), atol=1e-5, rtol=0)

    decoder = BerrutDecoder(ec_k, ec_r, [-1, n])
    nodes = data_nodes + parity_nodes
    outputs = values + parities
    scenarios = 0
    for missing in itertools.combinations(range(ec_k + ec_r), ec_r):
        if min(missing) >= ec_k:
            continue  # only parities missing: nothing to decode
        scenarios += 1
        kept = [i for i in range(ec_k + ec_r) if i not in missing]
        available = torch.ones(1, ec_k + ec_r, dtype=torch.bool)
        available[0, list(missing)] = False
        given = torch.tensor(outputs, dtype=torch.float32).unsqueeze(0) * available.unsqueeze(-1)
        decoded = decoder(given, available)[0]
        for i in missing:
            if i < ec_k:
                want = berrut_by_hand([nodes[j] for j in kept], [outputs[j] for j in kept], data_nodes[i])
                torch.testing.assert_close(decoded[i].double(), torch.tensor(want, dtype=torch.float64),
                                           atol=1e-5, rtol=0)
    assert scenarios == math.comb(ec_k + ec_r, ec_r) - 1


# ---------------------------------------------------------------- what the decoder sees, what the loss sees

PASS_THROUGH = """
import torch
from torch import nn
from coders.coder import Decoder

CALLS = []    # (decoder input, availability mask) of evaluation steps
LOSSES = []   # (reconstruction, target) handed to the loss in evaluation


class PassThrough(Decoder):
    # returns its data inputs as they arrive: an unavailable output comes back as it was given
    needs_availability = True

    def __init__(self, ec_k, ec_r, in_dim):
        super().__init__(ec_k, ec_r, in_dim)
        self.unused = nn.Parameter(torch.zeros(()))  # something to train, so the loss is computed

    def forward(self, in_data, available=None):
        if not torch.is_grad_enabled():
            CALLS.append((in_data.clone(), available.clone()))
        return in_data[:, :self.ec_k] + 0 * self.unused


class RecordingMSE(nn.MSELoss):
    def forward(self, recon, target):
        if not torch.is_grad_enabled():
            LOSSES.append((recon.clone(), target.clone()))
        return super().forward(recon, target)
"""


@pytest.mark.parametrize("ec_k, ec_r", [(2, 2), (3, 2)])
def test_unavailable_outputs_reach_neither_the_decoder_nor_the_loss(digits_config, tmp_path, ec_k, ec_r):
    mod = write_probe(tmp_path, PASS_THROUGH)
    run = make_run(digits_config(k_vals=[ec_k], r_vals=[ec_r], num_epoch=0, train_encoder=False,
                                 enc_dec_types=[[MDS, f"{mod}.PassThrough"]], losses=[f"{mod}.RecordingMSE"]))
    probe(mod).CALLS.clear()  # the shape check on zeros when the run was built
    rows = run.fit()
    calls, losses = probe(mod).CALLS, probe(mod).LOSSES
    expected = {tuple(i not in missing for i in range(ec_k + ec_r))
                for missing in itertools.combinations(range(ec_k + ec_r), ec_r) if min(missing) < ec_k}
    data_missing = sum(row[:ec_k].count(False) for row in expected)  # reconstructions per group
    assert len(calls) == len(losses) >= 2  # at least one batch each of val and test
    for (dec_in, available), (recon, target) in zip(calls, losses):
        assert {tuple(row) for row in available.tolist()} == expected
        assert (available.sum(dim=1) == ec_k).all()
        assert (dec_in[~available] == 0).all(), "an unavailable output reached the decoder"
        assert (dec_in[available].abs().sum(dim=-1) > 0).all()
        groups = len(dec_in) // len(expected)
        assert len(recon) == len(target) == groups * data_missing
        assert (recon == 0).all(), "the loss saw a reconstruction of an available output"
        assert (target.abs().sum(dim=-1) > 0).all()
    assert rows[0]["val_recon_acc"] < 0.3  # zeros point at class 0 only


# ---------------------------------------------------------------- metrics end to end

RANKED_GUESS = """
import torch
from coders.coder import Decoder

ORDER = list(range(10))  # the test sets its own preference of classes


class RankedGuess(Decoder):
    # the same scores for every output: ORDER[0] first, ORDER[1] second, ...
    def forward(self, in_data, available=None):
        scores = torch.zeros(in_data.shape[-1], dtype=in_data.dtype)
        scores[ORDER] = torch.arange(len(ORDER), 0, -1, dtype=in_data.dtype)
        return scores.expand(in_data.shape[0], self.ec_k, -1).clone()
"""


def test_accuracies_of_a_run_count_f_and_label_targets_in_the_top_1_and_top_5(digits_config, tmp_path):
    mod = write_probe(tmp_path, RANKED_GUESS)
    k = 3
    run = make_run(digits_config(k_vals=[k], r_vals=[2], num_epoch=0, **NO_TRAINING,
                                 enc_dec_types=[[MDS, f"{mod}.RankedGuess"]]))
    _, y, fx = run.data["val"]
    # Each group of the split (the last one wraps around) has every position reconstructed
    # in as many scenarios as any other, so the accuracies are shares over these images.
    idx = torch.arange(math.ceil(len(y) / k) * k) % len(y)
    by_f, by_label = fx.argmax(1)[idx], y[idx]
    share = lambda t, classes: (torch.isin(t, torch.tensor(classes))).double().mean().item()  # noqa: E731
    gap = lambda classes: abs(share(by_f, classes) - share(by_label, classes))  # noqa: E731
    # A first class, and four more, on which F's argmax and the labels disagree, so every figure differs.
    first = max(range(10), key=lambda c: gap([c]))
    rest = max(itertools.combinations([c for c in range(10) if c != first], 4), key=lambda c: gap([first, *c]))
    order = [first, *rest] + [c for c in range(10) if c != first and c not in rest]
    probe(mod).ORDER[:] = order
    want = {"val_recon_acc": share(by_f, order[:1]), "val_recon_top5": share(by_f, order[:5]),
            "val_degraded_acc": share(by_label, order[:1]), "val_degraded_top5": share(by_label, order[:5])}
    assert len(set(want.values())) == 4, want
    row = run.fit()[0]
    for key, value in want.items():
        assert row[key] == pytest.approx(value, abs=1e-9), key


# ---------------------------------------------------------------- image concatenation, by hand

def test_concatenation_tiles_by_hand():
    # k = 2: two half-width tiles side by side, each pixel the mean of two neighbours in a row.
    first = torch.tensor([[1.0, 3.0, 5.0, 7.0], [2.0, 4.0, 6.0, 8.0]])
    second = -first
    parity = ConcatenationEncoder(2, 1, [-1, 1, 2, 4])(torch.stack([first, second]).view(1, 2, 8))
    assert parity.view(2, 4).tolist() == [[2.0, 6.0, -2.0, -6.0], [3.0, 7.0, -3.0, -7.0]]
    # k = 3 and 4: quadrants filled row by row (top left, top right, bottom left, bottom right).
    for ec_k in (3, 4):
        images = torch.stack([torch.full((4, 4), float(i + 1)) for i in range(ec_k)]).view(1, ec_k, 16)
        fourth = 4.0 if ec_k == 4 else 0.0
        want = [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0], [3.0, 3.0, fourth, fourth], [3.0, 3.0, fourth, fourth]]
        assert ConcatenationEncoder(ec_k, 1, [-1, 1, 4, 4])(images).view(4, 4).tolist() == want


# ---------------------------------------------------------------- what an epoch is

@pytest.mark.parametrize("epoch_groups", ["images", "disjoint"])
def test_an_epoch_draws_each_training_image_k_times_or_once(digits_config, tmp_path, epoch_groups):
    mod = write_probe(tmp_path, RECORDING_ENCODER)
    k = 3
    run = make_run(digits_config(k_vals=[k], num_epoch=1, batch_size=128, epoch_groups=epoch_groups,
                                 enc_dec_types=[[f"{mod}.RecordingEncoder", "coders.mlp.MLPDecoder"]]))
    run.fit()
    train_x = run.splits.split("train")[0].flatten(1)
    n = len(train_x)
    copies = Counter(row.numpy().tobytes() for row in train_x)  # digits holds a few duplicate images
    seen = torch.cat(probe(mod).SEEN)  # (groups, k, H * W)
    passes = k if epoch_groups == "images" else 1
    assert seen.shape == (passes * (n // k), k, train_x.shape[1])
    counts = Counter(row.numpy().tobytes() for row in seen.flatten(0, 1))
    assert set(counts) <= set(copies), "every image is a training image"
    assert all(counts[key] <= passes * copies[key] for key in counts), "an image sits in at most one group per pass"
