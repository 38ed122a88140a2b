"""Fully connected learned encoder and decoder."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from coders.coder import Decoder, Encoder
from util.util import get_flattened_dim


class MLPEncoder(Encoder):
    """Linear(k*D, k*D) -> ReLU -> Linear(k*D, r*D) over the k inputs stacked."""

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int]):
        super().__init__(ec_k, ec_r, in_dim)
        d = get_flattened_dim(in_dim)
        self.nn = nn.Sequential(nn.Linear(ec_k * d, ec_k * d), nn.ReLU(), nn.Linear(ec_k * d, ec_r * d))

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:
        b, k, d = in_data.shape
        return self.nn(in_data.reshape(b, k * d)).view(b, self.ec_r, d)


class MLPDecoder(Decoder):
    """Three Linear layers with ReLUs: (k+r)n -> (k+r)n -> kn -> kn."""

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int]):
        super().__init__(ec_k, ec_r, in_dim)
        n = get_flattened_dim(in_dim)
        m = (ec_k + ec_r) * n
        self.nn = nn.Sequential(
            nn.Linear(m, m), nn.ReLU(),
            nn.Linear(m, ec_k * n), nn.ReLU(),
            nn.Linear(ec_k * n, ec_k * n),
        )

    def forward(self, in_data: torch.Tensor, available=None) -> torch.Tensor:
        b, m, n = in_data.shape
        return self.nn(in_data.reshape(b, m * n)).view(b, self.ec_k, n)
