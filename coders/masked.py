"""A fully connected decoder told which outputs are missing.

:class:`coders.mlp.MLPDecoder` sees the k + r outputs with the missing ones
set to zero and must infer from the zeros which ones they were. This decoder
is handed the availability mask as well (``needs_availability``), so one
network can learn a different rule for every scenario, and it zeroes the
unavailable outputs itself: what a missing output holds never reaches it.
Its default width (256) is also much wider than MLPDecoder's, whose layers
are (k + r) * n and k * n units (50 and 40 at k = 4 with ten classes).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from coders.coder import Decoder, check_size
from util.shapes import get_flattened_dim


def check_availability(decoder: Decoder, in_data: torch.Tensor, available: Optional[torch.Tensor]) -> torch.Tensor:
    """``available`` as a ``(B, k + r)`` boolean tensor; a ValueError naming the decoder when it is missing
    or of the wrong shape (the framework always passes it to a decoder with ``needs_availability``)."""
    name = type(decoder).__name__
    b, m = in_data.shape[:2]
    if available is None:
        raise ValueError(f"{name} needs the availability mask: call it as decoder(outputs, available) with a "
                         f"boolean (B, k + r) tensor (coders/coder.py, needs_availability).")
    if tuple(available.shape) != (b, m):
        raise ValueError(f"{name} got an availability mask of shape {tuple(available.shape)} for outputs of "
                         f"shape {tuple(in_data.shape)}; it must be ({b}, {m}).")
    return available.to(torch.bool)


class MaskedMLPDecoder(Decoder):
    """[(k + r) * n zero-filled outputs, (k + r) availability flags] -> ``depth`` hidden layers of
    ``hidden`` units with ReLUs -> k * n reconstructions."""

    needs_availability = True

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int], hidden: Optional[int] = None,
                 depth: int = 2):
        super().__init__(ec_k, ec_r, in_dim)
        n = get_flattened_dim(in_dim)
        h = check_size(hidden, 256)
        check_size(depth, key="depth")
        m = ec_k + ec_r
        layers, width = [], m * n + m
        for _ in range(depth):
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, ec_k * n))
        self.nn = nn.Sequential(*layers)

    def forward(self, in_data: torch.Tensor, available: Optional[torch.Tensor] = None) -> torch.Tensor:
        available = check_availability(self, in_data, available)
        b, m, n = in_data.shape
        flags = available.to(in_data.dtype)
        zeroed = in_data * flags.unsqueeze(-1)
        return self.nn(torch.cat([zeroed.reshape(b, m * n), flags], 1)).view(b, self.ec_k, n)
