"""Berrut rational interpolation code (as in ApproxIFER), for any k and r.

Every one of the k + r positions owns a node on [-1, 1]: the k + r Chebyshev
points of the first kind, ``cos((2m + 1) pi / (2(k + r)))``, sorted
ascending. The r parity nodes are interleaved among the data nodes at sorted
indices ``(j + 1) * (k + r - 1) // (r + 1)``, spread evenly and away from the
ends; the other k nodes, ascending, are the data nodes (``berrut_nodes``).

The k data inputs are read as the values of a function at the data nodes;
parity j is Berrut's interpolant of them evaluated at parity node j. The
decoder takes the k available outputs, wherever they sit, as values at their
nodes and evaluates Berrut's interpolant at the missing data nodes.

Berrut's interpolant through nodes ``x_0 < ... < x_{m-1}`` with values f_i is

    r(z) = sum_i w_i f_i / (z - x_i)  /  sum_i w_i / (z - x_i),   w_i = (-1)^i,

which has no poles on the real line, passes through every (x_i, f_i),
reproduces constants exactly and converges as the nodes get denser. It is
linear in the values, so encoding and decoding are fixed matrices: no
parameters to train. For a non-linear F the parity models are trained to
output :meth:`BerrutDecoder.combine_labels`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from coders.coder import Decoder, Encoder


def check_berrut_sizes(name: str, ec_k: int, ec_r: int) -> None:
    """Raise ``ValueError`` unless ``k >= 1`` and ``r >= 1``."""
    if ec_k < 1 or ec_r < 1:
        raise ValueError(f"{name} supports any ec_k >= 1 and ec_r >= 1; got ec_k = {ec_k}, ec_r = {ec_r}.")


def berrut_nodes(ec_k: int, ec_r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data_nodes (k,), parity_nodes (r,))``, float64, each ascending."""
    check_berrut_sizes("berrut_nodes", ec_k, ec_r)
    n = ec_k + ec_r
    m = torch.arange(n, dtype=torch.float64)
    points = torch.cos((2 * m + 1) * math.pi / (2 * n)).flip(0)
    parity_index = [(j + 1) * (n - 1) // (ec_r + 1) for j in range(ec_r)]
    is_parity = torch.zeros(n, dtype=torch.bool)
    is_parity[parity_index] = True
    return points[~is_parity], points[is_parity]


def berrut_weights(nodes: torch.Tensor, available: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Berrut's weights ``(-1)^rank``, rank counting the used nodes by location.

    ``nodes`` is ``(m,)`` in any order; ``available`` (``(..., m)`` boolean,
    default all True) says which nodes the interpolant goes through. Returns
    ``(..., m)`` float64, zero at unused nodes.
    """
    if available is None:
        available = torch.ones(nodes.shape, dtype=torch.bool, device=nodes.device)
    by_location = torch.argsort(nodes)
    used = available[..., by_location].long()
    sign = 1 - 2 * ((used.cumsum(dim=-1) - 1) % 2)
    weights = torch.zeros(available.shape, dtype=torch.float64, device=nodes.device)
    weights[..., by_location] = (sign * used).double()
    return weights


def berrut_coefficients(nodes: torch.Tensor, at: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The interpolant as a matrix: ``(..., p, m)`` float64 with rows summing to 1.

    ``nodes`` ``(m,)``, evaluation points ``at`` ``(p,)``, ``weights`` ``(..., m)``
    from :func:`berrut_weights`. A point that coincides with a used node gets
    the one-hot row of that node, so the interpolant returns its value exactly.
    """
    diff = at.double().unsqueeze(-1) - nodes.double().unsqueeze(0)  # (p, m)
    weights = weights.unsqueeze(-2)  # (..., 1, m)
    hit = (diff == 0) & (weights != 0)  # (..., p, m)
    safe = torch.where(diff == 0, torch.ones_like(diff), diff)
    terms = torch.where(hit.any(dim=-1, keepdim=True), hit.double(), weights / safe)
    return terms / terms.sum(dim=-1, keepdim=True)


def berrut_interpolate(values: torch.Tensor, nodes: torch.Tensor, at: torch.Tensor,
                       available: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Berrut's interpolant through ``values`` at ``nodes``, evaluated at ``at``.

    ``values`` ``(..., m, n)``, ``nodes`` ``(m,)``, ``at`` ``(p,)``, optional
    ``available`` ``(..., m)`` (unavailable nodes are left out). Returns
    ``(..., p, n)`` in the dtype of ``values``.
    """
    coefficients = berrut_coefficients(nodes, at, berrut_weights(nodes, available))
    return torch.matmul(coefficients.to(values.dtype), values)


class BerrutEncoder(Encoder):
    """``(B, k, D) -> (B, r, D)``: parity j is the interpolant of the k inputs at parity node j."""

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int]):
        super().__init__(ec_k, ec_r, in_dim)
        check_berrut_sizes(type(self).__name__, ec_k, ec_r)
        data_nodes, parity_nodes = berrut_nodes(ec_k, ec_r)
        matrix = berrut_coefficients(data_nodes, parity_nodes, berrut_weights(data_nodes))
        self.register_buffer("matrix", matrix.float(), persistent=False)  # (r, k)

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.matrix.to(in_data.dtype), in_data)


class BerrutDecoder(Decoder):
    """``(B, k + r, n) -> (B, k, n)``: the interpolant through the available
    outputs, evaluated at the data nodes; available data outputs are returned
    unchanged.
    """

    needs_availability = True

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int]):
        super().__init__(ec_k, ec_r, in_dim)
        check_berrut_sizes(type(self).__name__, ec_k, ec_r)
        data_nodes, parity_nodes = berrut_nodes(ec_k, ec_r)
        self.register_buffer("data_nodes", data_nodes, persistent=False)
        self.register_buffer("nodes", torch.cat([data_nodes, parity_nodes]), persistent=False)  # by position
        encoding = berrut_coefficients(data_nodes, parity_nodes, berrut_weights(data_nodes))
        self.register_buffer("matrix", encoding.float(), persistent=False)  # (r, k)

    def forward(self, in_data: torch.Tensor, available: Optional[torch.Tensor] = None) -> torch.Tensor:
        if available is None:
            raise ValueError("BerrutDecoder needs the (B, k + r) availability mask.")
        if bool((~available.any(dim=1)).any()):
            raise ValueError("BerrutDecoder needs at least one available output in every row.")
        weights = berrut_weights(self.nodes, available)  # (B, k + r)
        coefficients = berrut_coefficients(self.nodes, self.data_nodes, weights)  # (B, k, k + r)
        decoded = torch.matmul(coefficients.to(in_data.dtype), in_data)
        return torch.where(available[:, :self.ec_k, None], in_data[:, :self.ec_k], decoded)

    def combine_labels(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(B, k, n) -> (B, r, n)``: the interpolant of F's outputs at the parity nodes."""
        return torch.matmul(self.matrix.to(outputs.dtype), outputs)
