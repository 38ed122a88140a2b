"""Unavailability scenarios: which of the k + r outputs are missing.

Positions ``0..k-1`` are the data outputs, ``k..k+r-1`` the parity outputs.
A scenario makes r positions unavailable; the one scenario in which only
parities are unavailable needs no decoding and is left out, which leaves
C(k+r, r) - 1 scenarios.
"""
from __future__ import annotations

import itertools

import torch


def enumerate_scenarios(ec_k: int, ec_r: int) -> torch.Tensor:
    """Boolean ``(S, k + r)`` tensor, True where an output is *available*.

    Rows follow ``itertools.combinations`` order of the unavailable positions.
    """
    n = ec_k + ec_r
    parity_only = tuple(range(ec_k, n))
    rows = []
    for missing in itertools.combinations(range(n), ec_r):
        if missing == parity_only:
            continue
        row = torch.ones(n, dtype=torch.bool)
        row[list(missing)] = False
        rows.append(row)
    return torch.stack(rows)


def unavailable_data(available: torch.Tensor, ec_k: int) -> torch.Tensor:
    """``(S, k)`` boolean: True where a *data* output is unavailable (must be reconstructed)."""
    return ~available[:, :ec_k]


def apply_scenarios(outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Decoder inputs for every scenario at once.

    ``outputs`` is ``(B, k + r, n)``; ``available`` is ``(S, k + r)``. Returns
    ``(S * B, k + r, n)``, scenario-major, with unavailable outputs zeroed.
    """
    b, m, n = outputs.shape
    s = available.shape[0]
    masked = outputs.unsqueeze(0) * available.view(s, 1, m, 1).to(outputs.dtype)
    return masked.reshape(s * b, m, n)


def unavailable_pairs(unavailable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scenario, position)`` index pairs of the True entries of ``unavailable`` ``(S, k)``.

    Computed once per run: integer gathers, unlike boolean masks, never make a
    GPU wait for the host.
    """
    return unavailable.nonzero(as_tuple=True)


def gather_pairs(values: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor], shared: bool = False) -> torch.Tensor:
    """Pick the entries of unavailable data outputs, ordered (pair, group).

    ``values`` is ``(S, B, k, ...)``, one slice per scenario, or with
    ``shared=True`` ``(B, k, ...)`` used by every scenario (F's outputs,
    labels). Returns ``(U * B, ...)`` for the U pairs: exactly the outputs that
    must be reconstructed. Losses and accuracies only ever see these entries.
    """
    s_idx, j_idx = pairs
    if shared:
        picked = values[:, j_idx].transpose(0, 1)      # (U, B, ...)
    else:
        picked = values[s_idx, :, j_idx]               # (U, B, ...)
    return picked.reshape(-1, *values.shape[(2 if shared else 3):])


def gather_unavailable(values: torch.Tensor, unavailable: torch.Tensor, shared: bool = False) -> torch.Tensor:
    """:func:`gather_pairs` for a boolean ``(S, k)`` mask of unavailable data outputs."""
    return gather_pairs(values, unavailable_pairs(unavailable), shared)
