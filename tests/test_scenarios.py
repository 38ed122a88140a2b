import math

import pytest
import torch

from coders.scenarios import apply_scenarios, enumerate_scenarios, gather_unavailable, unavailable_data

KR = [(k, r) for k in range(2, 6) for r in range(1, 4)]


@pytest.mark.parametrize("k,r", KR)
def test_scenario_count_and_shape(k, r):
    avail = enumerate_scenarios(k, r)
    assert avail.shape == (math.comb(k + r, r) - 1, k + r)
    assert (avail.sum(1) == k).all(), "every scenario has exactly r unavailable outputs"
    assert len({tuple(row.tolist()) for row in avail}) == len(avail), "no duplicates"


@pytest.mark.parametrize("k,r", KR)
def test_no_parity_only_scenario(k, r):
    avail = enumerate_scenarios(k, r)
    # every scenario leaves at least one data output to reconstruct
    assert unavailable_data(avail, k).any(1).all()


@pytest.mark.parametrize("k,r", [(2, 1), (3, 2), (4, 3)])
def test_masks_zero_exactly_the_unavailable_positions(k, r):
    b, n = 3, 5
    outputs = torch.randn(b, k + r, n) + 10.0  # no accidental zeros
    avail = enumerate_scenarios(k, r)
    masked = apply_scenarios(outputs, avail).view(len(avail), b, k + r, n)
    for s, row in enumerate(avail):
        for pos in range(k + r):
            if row[pos]:
                assert torch.equal(masked[s, :, pos], outputs[:, pos])
            else:
                assert (masked[s, :, pos] == 0).all()


def test_gather_picks_only_unavailable_data_outputs():
    k, r, b, n = 3, 2, 4, 6
    avail = enumerate_scenarios(k, r)
    un = unavailable_data(avail, k)
    s = len(avail)
    recon = torch.randn(s, b, k, n)
    picked = gather_unavailable(recon, un)
    assert picked.shape == (int(un.sum()) * b, n)
    # shared values are broadcast over scenarios in the same order
    fx = torch.randn(b, k, n)
    shared = gather_unavailable(fx, un, shared=True)
    expected = gather_unavailable(fx.unsqueeze(0).expand(s, b, k, n), un)
    assert torch.equal(shared, expected)
