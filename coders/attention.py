"""A decoder that reads the k + r outputs as a set of tokens through a small transformer.

Each output becomes one token: a linear embedding of its (zero-filled) n
values, plus a learned embedding of its position (data output 0..k-1 or
parity 0..r-1) and one of its availability. Self-attention then lets every
token gather what it needs from the others whatever the scenario, with the
same weights for every scenario, and a linear read-out of the first k tokens
gives the k reconstructions. A linear map of the zero-filled outputs is added
to that read-out: algebraic decoding (a missing output as the parity output
minus the others, exact for a linear F under an addition code) is one linear
map, which attention followed by layer norms can only approximate, so the
transformer is left to learn what is not linear.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from coders.coder import Decoder, check_size
from coders.masked import check_availability
from util.shapes import get_flattened_dim


class AttentionDecoder(Decoder):
    """Tokens of width ``width`` (default 64) through ``layers`` pre-norm transformer encoder layers
    (``heads`` heads, feed-forward 2 * width, no dropout), read out per data token, plus a linear map
    of all (k + r) * n zero-filled outputs; ``(B, k + r, n) -> (B, k, n)``."""

    needs_availability = True

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int], width: Optional[int] = None,
                 layers: int = 2, heads: int = 4):
        super().__init__(ec_k, ec_r, in_dim)
        n = get_flattened_dim(in_dim)
        d = check_size(width, 64, "width")
        check_size(layers, key="layers")
        check_size(heads, key="heads")
        if d % heads:
            raise ValueError(f"its 'width' ({d}) must be a multiple of 'heads' ({heads}).")
        m = ec_k + ec_r
        self.embed = nn.Linear(n, d)
        self.position = nn.Parameter(torch.randn(m, d) * 0.02)
        self.availability = nn.Embedding(2, d)
        block = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        # No padding mask (an unavailable token still carries its position and flag, and is the
        # one whose reconstruction is read out), so no nested tensors either.
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.readout = nn.Linear(d, n)
        self.linear = nn.Linear(m * n, ec_k * n)

    def forward(self, in_data: torch.Tensor, available: Optional[torch.Tensor] = None) -> torch.Tensor:
        available = check_availability(self, in_data, available)
        zeroed = in_data * available.unsqueeze(-1).to(in_data.dtype)
        tokens = self.embed(zeroed) + self.position + self.availability(available.long())
        direct = self.linear(zeroed.flatten(1)).view(zeroed.shape[0], self.ec_k, -1)
        return self.readout(self.norm(self.body(tokens)[:, :self.ec_k])) + direct
