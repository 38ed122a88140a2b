"""Hand-built codes: summation, image concatenation, linear MDS and Berrut."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from base_models.logistic import LogisticRegression
from coders.berrut import (BerrutDecoder, BerrutEncoder, berrut_interpolate, berrut_nodes,
                           berrut_weights)
from coders.image import ConcatenationEncoder, tile_grid, tile_slices
from coders.mds import MDSDecoder, MDSEncoder, coefficient_sums, mds_matrix
from coders.summation import AdditionEncoder, SubtractionDecoder
from coders.scenarios import enumerate_scenarios

B = 5
IMAGE_DIM = [-1, 1, 8, 8]
NUM_CLASSES = 10

LINEAR_CODES = (
    [pytest.param(AdditionEncoder, SubtractionDecoder, k, 1, id=f"summation-k{k}") for k in (2, 3, 4)]
    + [pytest.param(MDSEncoder, MDSDecoder, k, r, id=f"mds-k{k}-r{r}") for k in (2, 3, 4) for r in (1, 2, 3)]
)

ALL_CODES = LINEAR_CODES + [
    pytest.param(BerrutEncoder, BerrutDecoder, k, r, id=f"berrut-k{k}-r{r}") for k in (2, 4) for r in (1, 2)
] + [pytest.param(ConcatenationEncoder, SubtractionDecoder, k, 1, id=f"concat-k{k}") for k in (2, 4)]


def bias_factors(encoder: torch.nn.Module, ec_k: int, ec_r: int) -> torch.Tensor:
    """``(r,)``: how much of F's bias a linear parity model carries for each parity."""
    if isinstance(encoder, AdditionEncoder):
        return torch.full((ec_r,), float(ec_k))
    return coefficient_sums(ec_k, ec_r).float()


def random_linear_model(bias_factor: float = 1.0, weight: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None) -> LogisticRegression:
    model = LogisticRegression(in_shape=(1, 8, 8), num_classes=NUM_CLASSES)
    with torch.no_grad():
        if weight is not None:
            model.lin.weight.copy_(weight)
            model.lin.bias.copy_(bias * bias_factor)
    return model


def decode_every_scenario(decoder, outputs: torch.Tensor):
    """Yield ``(available (k+r,), decoded (B, k, n))`` for every scenario of ``decoder``."""
    k, r = decoder.ec_k, decoder.ec_r
    for available in enumerate_scenarios(k, r):
        masked = outputs * available.view(1, -1, 1).to(outputs.dtype)
        mask = available.unsqueeze(0).expand(outputs.shape[0], -1)
        yield available, decoder(masked, mask if decoder.needs_availability else None)


@pytest.mark.parametrize("encoder_cls, decoder_cls, ec_k, ec_r", ALL_CODES)
def test_shapes_and_no_parameters(encoder_cls, decoder_cls, ec_k, ec_r):
    encoder = encoder_cls(ec_k, ec_r, IMAGE_DIM)
    decoder = decoder_cls(ec_k, ec_r, [-1, NUM_CLASSES])
    assert encoder(torch.randn(B, ec_k, 64)).shape == (B, ec_r, 64)
    outputs = torch.randn(B, ec_k + ec_r, NUM_CLASSES)
    available = torch.ones(B, ec_k + ec_r, dtype=torch.bool)
    available[:, 0] = False
    available[:, ec_k + 1:] = False  # exactly r unavailable: data 0 and parities 1..r-1
    assert decoder(outputs, available).shape == (B, ec_k, NUM_CLASSES)
    assert decoder.combine_labels(torch.randn(B, ec_k, NUM_CLASSES)).shape == (B, ec_r, NUM_CLASSES)
    assert decoder.needs_availability
    assert list(encoder.parameters()) == [] and list(decoder.parameters()) == []
    assert encoder.state_dict() == {} and decoder.state_dict() == {}


@pytest.mark.parametrize("encoder_cls, decoder_cls, ec_k, ec_r", LINEAR_CODES)
def test_linear_model_is_reconstructed_exactly(encoder_cls, decoder_cls, ec_k, ec_r):
    torch.manual_seed(0)
    base = random_linear_model()
    encoder = encoder_cls(ec_k, ec_r, IMAGE_DIM)
    decoder = decoder_cls(ec_k, ec_r, [-1, NUM_CLASSES])
    factors = bias_factors(encoder, ec_k, ec_r)
    parity_models = [random_linear_model(float(factors[j]), base.lin.weight, base.lin.bias) for j in range(ec_r)]

    x = torch.randn(B, ec_k, 64)
    parities = encoder(x)
    with torch.no_grad():
        data_out = base(x.reshape(B * ec_k, 1, 8, 8)).view(B, ec_k, NUM_CLASSES)
        parity_out = torch.stack([parity_models[j](parities[:, j].view(B, 1, 8, 8)) for j in range(ec_r)], dim=1)
    # The parity models compute exactly what combine_labels asks of them.
    torch.testing.assert_close(parity_out, decoder.combine_labels(data_out), atol=1e-4, rtol=0)

    outputs = torch.cat([data_out, parity_out], dim=1)
    scenarios = 0
    for available, decoded in decode_every_scenario(decoder, outputs):
        scenarios += 1
        missing = ~available[:ec_k]
        assert missing.any()
        torch.testing.assert_close(decoded[:, missing], data_out[:, missing], atol=1e-4, rtol=0)
        assert torch.equal(decoded[:, ~missing], data_out[:, ~missing])
    assert scenarios == math.comb(ec_k + ec_r, ec_r) - 1


@pytest.mark.parametrize("ec_k", [2, 3, 4])
def test_mds_with_one_parity_is_summation(ec_k):
    assert torch.equal(mds_matrix(ec_k, 1), torch.ones(1, ec_k, dtype=torch.float64))
    x = torch.randn(B, ec_k, 64)
    torch.testing.assert_close(MDSEncoder(ec_k, 1, IMAGE_DIM)(x), AdditionEncoder(ec_k, 1, IMAGE_DIM)(x))
    outputs = torch.randn(B, ec_k + 1, NUM_CLASSES)
    mds = list(decode_every_scenario(MDSDecoder(ec_k, 1, [-1, NUM_CLASSES]), outputs))
    summation = list(decode_every_scenario(SubtractionDecoder(ec_k, 1, [-1, NUM_CLASSES]), outputs))
    for (_, a), (_, b) in zip(mds, summation):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    data = torch.randn(B, ec_k, NUM_CLASSES)
    torch.testing.assert_close(MDSDecoder(ec_k, 1, [-1, NUM_CLASSES]).combine_labels(data),
                               SubtractionDecoder(ec_k, 1, [-1, NUM_CLASSES]).combine_labels(data))


@pytest.mark.parametrize("ec_k, ec_r", [(k, r) for k in range(1, 7) for r in range(1, 5)])
def test_mds_every_choice_of_k_outputs_is_invertible(ec_k, ec_r):
    generator = torch.cat([torch.eye(ec_k, dtype=torch.float64), mds_matrix(ec_k, ec_r)])
    for rows in itertools.combinations(range(ec_k + ec_r), ec_k):
        assert torch.linalg.cond(generator[list(rows)]) < 1e6
    torch.testing.assert_close(coefficient_sums(ec_k, ec_r), mds_matrix(ec_k, ec_r).sum(dim=1))


def test_subtraction_decoder_solves_by_hand():
    outputs = torch.tensor([[[1.0], [0.0], [4.0], [10.0]]])  # data 1, (missing), 4; parity 10
    available = torch.tensor([[True, False, True, True]])
    assert SubtractionDecoder(3, 1, [-1, 1])(outputs, available).flatten().tolist() == [1.0, 5.0, 4.0]


# ---------------------------------------------------------------- Berrut

@pytest.mark.parametrize("ec_k, ec_r", [(1, 1), (2, 1), (3, 2), (4, 3), (8, 2)])
def test_berrut_nodes_are_distinct_chebyshev_points(ec_k, ec_r):
    data_nodes, parity_nodes = berrut_nodes(ec_k, ec_r)
    nodes = torch.cat([data_nodes, parity_nodes])
    assert data_nodes.shape == (ec_k,) and parity_nodes.shape == (ec_r,)
    assert torch.all(data_nodes.diff() > 0) and torch.all(parity_nodes.diff() > 0)
    n = ec_k + ec_r
    chebyshev = torch.cos((2 * torch.arange(n, dtype=torch.float64) + 1) * math.pi / (2 * n))
    torch.testing.assert_close(nodes.sort().values, chebyshev.sort().values)


def test_berrut_weights_alternate_over_used_nodes_by_location():
    nodes = torch.tensor([0.5, -0.5, 0.0, 1.0])
    available = torch.tensor([True, True, False, True])
    # By location: -0.5 (+1), 0.0 (unused), 0.5 (-1), 1.0 (+1).
    assert berrut_weights(nodes, available).tolist() == [-1.0, 1.0, 0.0, 1.0]


def test_berrut_interpolate_matches_the_formula():
    torch.manual_seed(3)
    nodes = torch.tensor([0.3, -0.8, 0.9, -0.1, 0.5], dtype=torch.float64)
    values = torch.randn(5, 1, dtype=torch.float64)
    at = torch.tensor([-0.95, -0.4, 0.0, 0.7, 1.0], dtype=torch.float64)
    ordered = sorted(range(5), key=lambda i: nodes[i].item())
    sign = {i: (-1) ** rank for rank, i in enumerate(ordered)}
    for p, z in enumerate(at.tolist()):
        numerator = sum(sign[i] * values[i, 0].item() / (z - nodes[i].item()) for i in range(5))
        denominator = sum(sign[i] / (z - nodes[i].item()) for i in range(5))
        got = berrut_interpolate(values, nodes, at)[p, 0].item()
        assert got == pytest.approx(numerator / denominator, abs=1e-12)


@pytest.mark.parametrize("ec_k, ec_r", [(2, 1), (4, 2), (5, 3)])
def test_berrut_passes_through_its_nodes(ec_k, ec_r):
    torch.manual_seed(1)
    data_nodes, parity_nodes = berrut_nodes(ec_k, ec_r)
    values = torch.randn(3, ec_k, 7)
    at = data_nodes.flip(0)
    assert torch.equal(berrut_interpolate(values, data_nodes, at), values.flip(1))

    # The decoder returns available outputs bit for bit and, for the outputs of
    # one interpolant, agrees with it at the parity nodes too.
    decoder = BerrutDecoder(ec_k, ec_r, [-1, 7])
    outputs = torch.cat([values, decoder.combine_labels(values)], dim=1)
    torch.testing.assert_close(decoder.combine_labels(values), BerrutEncoder(ec_k, ec_r, [-1, 7])(values))
    torch.testing.assert_close(decoder.combine_labels(values),
                               berrut_interpolate(values, data_nodes, parity_nodes).float())
    for available, decoded in decode_every_scenario(decoder, outputs):
        assert torch.equal(decoded[:, available[:ec_k]], values[:, available[:ec_k]])
        assert torch.isfinite(decoded).all()


@pytest.mark.parametrize("ec_k, ec_r", [(2, 1), (3, 2), (4, 1), (5, 3)])
def test_berrut_reproduces_a_constant_model(ec_k, ec_r):
    constant = torch.randn(NUM_CLASSES)
    encoder = BerrutEncoder(ec_k, ec_r, IMAGE_DIM)
    decoder = BerrutDecoder(ec_k, ec_r, [-1, NUM_CLASSES])
    parities = encoder(torch.randn(B, ec_k, 64))
    outputs = constant.expand(B, ec_k + parities.shape[1], NUM_CLASSES)  # F(anything) = constant
    for _, decoded in decode_every_scenario(decoder, outputs):
        torch.testing.assert_close(decoded, constant.expand(B, ec_k, NUM_CLASSES), atol=1e-6, rtol=0)


def berrut_max_error(ec_k: int, ec_r: int, function) -> float:
    """Worst reconstruction error over every scenario, F's output being ``function(node)``."""
    decoder = BerrutDecoder(ec_k, ec_r, [-1, 1])
    data_nodes, parity_nodes = berrut_nodes(ec_k, ec_r)
    available = enumerate_scenarios(ec_k, ec_r)  # all scenarios as one batch
    outputs = function(torch.cat([data_nodes, parity_nodes])).view(1, -1, 1) * available.unsqueeze(-1)
    error = (decoder(outputs, available) - function(data_nodes).view(1, -1, 1)).abs().squeeze(-1)
    return error[~available[:, :ec_k]].max().item()


# Berrut converges only like O(h): the peaked Runge function needs more nodes
# than exp before a missing node's neighbourhood is resolved.
def runge(z: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + 4 * z ** 2)


@pytest.mark.parametrize("function, coarse_k, fine_k, ec_r", [
    (torch.exp, 4, 16, 1), (torch.exp, 4, 16, 2), (torch.exp, 4, 16, 3), (runge, 4, 64, 1), (runge, 4, 64, 2),
], ids=["exp-r1", "exp-r2", "exp-r3", "runge-r1", "runge-r2"])
def test_berrut_error_shrinks_with_more_nodes(ec_r, function, coarse_k, fine_k):
    coarse, fine = berrut_max_error(coarse_k, ec_r, function), berrut_max_error(fine_k, ec_r, function)
    assert 0 < fine < coarse / 2


# ---------------------------------------------------------------- image concatenation

@pytest.mark.parametrize("ec_k, grid", [(1, (1, 1)), (2, (1, 2)), (3, (2, 2)), (4, (2, 2)), (5, (2, 3)), (9, (3, 3))])
def test_tile_grid(ec_k, grid):
    assert tile_grid(ec_k) == grid


def test_two_images_sit_side_by_side():
    assert tile_slices(2, 8, 8) == [(slice(0, 8), slice(0, 4)), (slice(0, 8), slice(4, 8))]
    assert tile_slices(4, 8, 8)[3] == (slice(4, 8), slice(4, 8))


@pytest.mark.parametrize("ec_k, in_dim", [(2, [-1, 1, 8, 8]), (3, [-1, 3, 8, 8]), (4, [-1, 1, 8, 8]),
                                          (4, [-1, 6, 6]), (6, [-1, 1, 4, 6])])
def test_concatenation_places_each_image_in_its_tile(ec_k, in_dim):
    torch.manual_seed(2)
    h, w = in_dim[-2], in_dim[-1]
    x = torch.randn(B, ec_k, h * w)
    parity = ConcatenationEncoder(ec_k, 1, in_dim)(x)
    assert parity.shape == (B, 1, h * w)
    parity = parity.view(B, h, w)
    rows, cols = tile_grid(ec_k)
    covered = torch.zeros(h, w, dtype=torch.bool)
    for i, (row_slice, col_slice) in enumerate(tile_slices(ec_k, h, w)):
        tile = parity[:, row_slice, col_slice]
        th, tw = tile.shape[1:]
        alone = F.interpolate(x[:, i].view(B, 1, h, w), size=(th, tw), mode="area").view(B, th, tw)
        torch.testing.assert_close(tile, alone, atol=1e-6, rtol=0)
        # 'area' with integer factors is the mean over each rows x cols block.
        block_mean = x[:, i].view(B, th, rows, tw, cols).mean(dim=(2, 4))
        torch.testing.assert_close(tile, block_mean, atol=1e-5, rtol=0)
        covered[row_slice, col_slice] = True
    assert torch.all(parity[:, ~covered] == 0)
    assert covered.sum() == ec_k * (h // rows) * (w // cols)


@pytest.mark.parametrize("ec_k, in_dim", [(5, [-1, 1, 8, 8]), (3, [-1, 1, 8, 7]), (2, [-1, 64]),
                                          (9, [-1, 1, 2, 2])])
def test_concatenation_rejects_impossible_sizes(ec_k, in_dim):
    with pytest.raises(ValueError, match="supports"):
        ConcatenationEncoder(ec_k, 1, in_dim)


# ---------------------------------------------------------------- constructors

@pytest.mark.parametrize("coder_cls, ec_k, ec_r", [
    (AdditionEncoder, 2, 2), (SubtractionDecoder, 3, 2), (AdditionEncoder, 0, 1),
    (ConcatenationEncoder, 2, 2), (MDSEncoder, 2, 0), (MDSDecoder, 0, 2),
    (BerrutEncoder, 3, 0), (BerrutDecoder, 0, 1),
])
def test_constructors_reject_bad_k_or_r(coder_cls, ec_k, ec_r):
    with pytest.raises(ValueError, match="supports"):
        coder_cls(ec_k, ec_r, IMAGE_DIM)


@pytest.mark.parametrize("decoder_cls", [SubtractionDecoder, MDSDecoder, BerrutDecoder])
def test_decoders_require_the_availability_mask(decoder_cls):
    with pytest.raises(ValueError, match="availability"):
        decoder_cls(2, 1, [-1, NUM_CLASSES])(torch.randn(B, 3, NUM_CLASSES))


@pytest.mark.parametrize("decoder_cls, ec_k, ec_r", [(SubtractionDecoder, 3, 1), (MDSDecoder, 3, 2), (BerrutDecoder, 3, 2)])
def test_gradients_reach_the_parity_outputs(decoder_cls, ec_k, ec_r):
    # A trained parity model learns through the decoder's reconstruction.
    outputs = torch.randn(B, ec_k + ec_r, NUM_CLASSES, requires_grad=True)
    available = torch.ones(B, ec_k + ec_r, dtype=torch.bool)
    available[:, :ec_r] = False
    decoded = decoder_cls(ec_k, ec_r, [-1, NUM_CLASSES])(outputs * available.unsqueeze(-1), available)
    (decoded[:, :ec_r] * torch.randn(B, ec_r, NUM_CLASSES)).sum().backward()
    assert outputs.grad[:, ec_k:].abs().sum(dim=-1).gt(0).all()
