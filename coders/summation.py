"""The simplest code for r = 1: the parity is the sum of the k inputs.

With F linear, F(X_1 + ... + X_k) = F(X_1) + ... + F(X_k) (up to F's bias),
so one missing data output is the parity output minus the available data
outputs. For a non-linear F a trained parity model F_P is asked to output the
sum of F's outputs (:meth:`SubtractionDecoder.combine_labels`) instead.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from coders.coder import Decoder, Encoder


def check_single_parity(name: str, ec_k: int, ec_r: int) -> None:
    """Raise ``ValueError`` unless ``k >= 1`` and ``r == 1``, naming the coder ``name``."""
    if ec_r != 1 or ec_k < 1:
        raise ValueError(f"{name} supports exactly one parity (ec_r = 1) and ec_k >= 1; "
                         f"got ec_k = {ec_k}, ec_r = {ec_r}.")


class AdditionEncoder(Encoder):
    """``(B, k, D) -> (B, 1, D)``: the parity is the element-wise sum of the k inputs."""

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int]):
        super().__init__(ec_k, ec_r, in_dim)
        check_single_parity(type(self).__name__, ec_k, ec_r)

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:
        return in_data.sum(dim=1, keepdim=True)


class SubtractionDecoder(Decoder):
    """``(B, k + 1, n) -> (B, k, n)``: a missing data output is the parity output
    minus the sum of the available data outputs.

    Unavailable outputs arrive zeroed, so "parity minus the sum of all data
    outputs" already equals the missing one; the availability mask is only
    used to return available data outputs bit for bit unchanged (and to leave
    them alone when it is the parity that is missing).
    """

    needs_availability = True

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int]):
        super().__init__(ec_k, ec_r, in_dim)
        check_single_parity(type(self).__name__, ec_k, ec_r)

    def forward(self, in_data: torch.Tensor, available: Optional[torch.Tensor] = None) -> torch.Tensor:
        if available is None:
            raise ValueError("SubtractionDecoder needs the (B, k + 1) availability mask.")
        data = in_data[:, :self.ec_k]
        missing = in_data[:, self.ec_k:] - data.sum(dim=1, keepdim=True)  # (B, 1, n)
        return torch.where(available[:, :self.ec_k, None], data, missing)

    def combine_labels(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(B, k, n) -> (B, 1, n)``: the parity model should output the sum of F's outputs."""
        return outputs.sum(dim=1, keepdim=True)
