"""coders/factored.py: one reader shared by the k positions, a position-specific combine, a renderer."""
from __future__ import annotations

import pytest
import torch

from coders.factored import FactoredEncoder

SMALL = {"hidden": 8, "embed": 5, "render": 7}


@pytest.mark.parametrize("k,r", [(2, 1), (4, 1), (8, 2)])
def test_shapes_and_every_parameter_learns(k, r):
    torch.manual_seed(0)
    enc = FactoredEncoder(k, r, [-1, 1, 3, 4], **SMALL)
    out = enc(torch.randn(6, k, 12))
    assert out.shape == (6, r, 12)
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_only_the_combine_layer_grows_with_k():
    """One reader for every position: going from k = 4 to k = 8 adds exactly four blocks of
    combine weights (embed x render each), nothing else (a reader per position would add four readers)."""
    def size(k):
        return sum(p.numel() for p in FactoredEncoder(k, 1, [-1, 1, 28, 28]).parameters())
    assert size(8) - size(4) == 4 * 64 * 512
    assert size(4) < 1_100_000  # MLPEncoder at k = 4 on 28 x 28: about 19.7 M


def test_one_reader_shared_and_the_positions_told_apart():
    """Permuting the inputs together with the combine layer's per-position blocks leaves the parity
    unchanged (so every position goes through the same reader), while permuting the inputs alone
    changes it (so the code knows which input sits where)."""
    torch.manual_seed(0)
    k, e = 4, SMALL["embed"]
    enc = FactoredEncoder(k, 1, [-1, 12], **SMALL).eval()
    x = torch.randn(5, k, 12)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        before = enc(x)
        moved = enc(x[:, perm])
        assert not torch.allclose(before, moved, atol=1e-4)
        blocks = enc.combine.weight.view(-1, k, e)
        enc.combine.weight.copy_(blocks[:, perm].reshape(-1, k * e))
        assert torch.allclose(enc(x[:, perm]), before, atol=1e-6)


@torch.no_grad()
def test_known_weights_encode_a_weighted_sum_exactly():
    """With the reader splitting each pixel into relu(v) and relu(-v), the combine layer weighing
    position i by i + 1 and the renderer recombining, the parity is sum_i (i + 1) x_i exactly; a wrong
    reshape of the batch, the positions or the output would break it."""
    torch.manual_seed(0)
    k, r, d = 3, 1, 12
    enc = FactoredEncoder(k, r, [-1, 1, 3, 4], hidden=2 * d, embed=2 * d, render=2 * d)
    eye = torch.eye(2 * d)
    for layer in (enc.reader[0], enc.reader[2], enc.combine, enc.render[1], enc.render[3]):
        layer.bias.zero_()
    enc.reader[0].weight.copy_(torch.cat([torch.eye(d), -torch.eye(d)]))
    enc.reader[2].weight.copy_(eye)
    enc.combine.weight.copy_(torch.cat([(i + 1) * eye for i in range(k)], 1))
    enc.render[1].weight.copy_(eye)
    enc.render[3].weight.copy_(torch.cat([torch.eye(d), -torch.eye(d)], 1))
    x = torch.randn(7, k, d)
    expected = sum((i + 1) * x[:, i] for i in range(k)).unsqueeze(1)
    assert torch.allclose(enc(x), expected, atol=1e-5)


@pytest.mark.parametrize("key", ["hidden", "embed", "render"])
def test_bad_widths_name_their_key(key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        FactoredEncoder(4, 1, [-1, 1, 28, 28], **{key: 0})
