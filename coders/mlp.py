"""Fully connected learned encoder and decoder."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from coders.coder import Decoder, Encoder, check_size
from util.shapes import get_flattened_dim


class MLPEncoder(Encoder):
    """Linear(k*D, h) -> ReLU -> Linear(h, r*D) over the k inputs stacked; h = ``hidden``,
    by default k*D (the original write-ups' encoder)."""

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int], hidden: Optional[int] = None):
        super().__init__(ec_k, ec_r, in_dim)
        d = get_flattened_dim(in_dim)
        h = check_size(hidden, ec_k * d)
        self.nn = nn.Sequential(nn.Linear(ec_k * d, h), nn.ReLU(), nn.Linear(h, ec_r * d))

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:
        b, k, d = in_data.shape
        return self.nn(in_data.reshape(b, k * d)).view(b, self.ec_r, d)


class MLPDecoder(Decoder):
    """Three Linear layers with ReLUs: (k+r)n -> h1 -> h2 -> kn. By default h1 = (k+r)n and
    h2 = kn (the original write-ups' decoder); ``hidden`` sets both to one width, which matters
    when F has few outputs (n = 10 leaves the default decoder 30 and 20 units at k = 2)."""

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int], hidden: Optional[int] = None):
        super().__init__(ec_k, ec_r, in_dim)
        n = get_flattened_dim(in_dim)
        m = (ec_k + ec_r) * n
        h1, h2 = (m, ec_k * n) if hidden is None else (check_size(hidden, m),) * 2
        self.nn = nn.Sequential(
            nn.Linear(m, h1), nn.ReLU(),
            nn.Linear(h1, h2), nn.ReLU(),
            nn.Linear(h2, ec_k * n),
        )

    def forward(self, in_data: torch.Tensor, available=None) -> torch.Tensor:
        b, m, n = in_data.shape
        return self.nn(in_data.reshape(b, m * n)).view(b, self.ec_k, n)
