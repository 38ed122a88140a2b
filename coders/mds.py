"""A real-valued systematic linear MDS code for any k and r.

Parity j is ``sum_i A[j, i] X_i`` with ``A[j, i] = x_i ** j``: the first r rows
of a Vandermonde matrix on k distinct positive nodes x_i, the Chebyshev
points of [1/2, 3/2]. With positive, increasing nodes this matrix is totally
positive -- every square submatrix has a positive determinant -- so whichever
r of the k + r outputs are missing, the k available rows of the generator
``[I_k; A]`` form an invertible k x k system. Row 0 is all ones, so r = 1 is
the addition code. Nodes centred on 1 keep the coefficients close to 1 and the
decoding systems well conditioned (worst condition number about 30 for
k = 4, r = 2; it grows with k and r, as for any real MDS code).

With F linear (weights W, bias b) the parity model for parity j is F with
bias ``b * A[j].sum()`` (:func:`coefficient_sums`); otherwise it is trained
to output :meth:`MDSDecoder.combine_labels`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from coders.coder import Decoder, Encoder


def check_mds_sizes(name: str, ec_k: int, ec_r: int) -> None:
    """Raise ``ValueError`` unless ``k >= 1`` and ``r >= 1``."""
    if ec_k < 1 or ec_r < 1:
        raise ValueError(f"{name} supports any ec_k >= 1 and ec_r >= 1; got ec_k = {ec_k}, ec_r = {ec_r}.")


def mds_matrix(ec_k: int, ec_r: int) -> torch.Tensor:
    """The ``(r, k)`` float64 coefficient matrix A; every square submatrix is invertible."""
    check_mds_sizes("mds_matrix", ec_k, ec_r)
    i = torch.arange(ec_k, dtype=torch.float64)
    # Chebyshev points of the first kind on [1/2, 3/2], increasing.
    nodes = 1.0 - 0.5 * torch.cos((2 * i + 1) * math.pi / (2 * ec_k))
    powers = torch.arange(ec_r, dtype=torch.float64)
    return nodes.unsqueeze(0) ** powers.unsqueeze(1)


def coefficient_sums(ec_k: int, ec_r: int) -> torch.Tensor:
    """``(r,)`` float64: ``A[j].sum()``, the factor on F's bias in a linear parity model j."""
    return mds_matrix(ec_k, ec_r).sum(dim=1)


class MDSEncoder(Encoder):
    """``(B, k, D) -> (B, r, D)``: parity j is ``sum_i A[j, i] X_i``."""

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int]):
        super().__init__(ec_k, ec_r, in_dim)
        check_mds_sizes(type(self).__name__, ec_k, ec_r)
        self.register_buffer("matrix", mds_matrix(ec_k, ec_r).float(), persistent=False)

    @property
    def coefficient_sums(self) -> torch.Tensor:
        """``(r,)``: the sum of each parity's coefficients."""
        return self.matrix.sum(dim=1)

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.matrix.to(in_data.dtype), in_data)


class MDSDecoder(Decoder):
    """``(B, k + r, n) -> (B, k, n)``: solves the k x k linear system given by the
    first k available outputs of each row; available data outputs are returned
    unchanged.

    The system of row b is ``G[idx_b] X = Y[idx_b]`` with ``G = [I_k; A]`` and
    ``idx_b`` the first k available positions; data positions come first, so
    every available data output is one of the equations. It is solved in
    float64, one small system per row, batched.
    """

    needs_availability = True

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int]):
        super().__init__(ec_k, ec_r, in_dim)
        check_mds_sizes(type(self).__name__, ec_k, ec_r)
        matrix = mds_matrix(ec_k, ec_r)
        self.register_buffer("matrix", matrix.float(), persistent=False)
        generator = torch.cat([torch.eye(ec_k, dtype=torch.float64), matrix])
        self.register_buffer("generator", generator, persistent=False)  # (k + r, k)

    @property
    def coefficient_sums(self) -> torch.Tensor:
        """``(r,)``: the sum of each parity's coefficients."""
        return self.matrix.sum(dim=1)

    def forward(self, in_data: torch.Tensor, available: Optional[torch.Tensor] = None) -> torch.Tensor:
        if available is None:
            raise ValueError("MDSDecoder needs the (B, k + r) availability mask.")
        k, m = self.ec_k, self.ec_k + self.ec_r
        if bool((available.sum(dim=1) < k).any()):
            raise ValueError(f"MDSDecoder needs at least k = {k} available outputs in every row.")
        positions = torch.arange(m, device=available.device)
        # Available positions sort first, each group in position order.
        order = torch.argsort(positions + m * (~available).long(), dim=1)[:, :k]  # (B, k)
        systems = self.generator[order].double()  # (B, k, k); double() survives module.float()
        rhs = torch.gather(in_data, 1, order.unsqueeze(-1).expand(-1, -1, in_data.shape[-1]))
        solved = torch.linalg.solve(systems, rhs.double()).to(in_data.dtype)
        data = in_data[:, :k]
        return torch.where(available[:, :k, None], data, solved)

    def combine_labels(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(B, k, n) -> (B, r, n)``: parity model j should output ``sum_i A[j, i] F(X_i)``."""
        return torch.matmul(self.matrix.to(outputs.dtype), outputs)
