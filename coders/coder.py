"""The contract between the framework and every encoder and decoder.

Shapes, with B the number of groups in a batch, k = ``ec_k`` data inputs per
group and r = ``ec_r`` parities:

* An :class:`Encoder` receives ``(B, k, D)`` -- for images D = H*W, one
  channel at a time: the framework folds the channels of a C-channel image
  into the batch, so the encoder sees ``(B*C, k, H*W)`` and each channel is
  encoded across the k inputs -- and returns ``(B, r, D)``. A convolutional
  encoder may ``view`` its input as ``(B, k, H, W)``.
* A :class:`Decoder` receives ``(B, k + r, n)``: the k outputs of F on the
  data inputs, then the r outputs on the parities, with unavailable outputs
  set to zero; it returns ``(B, k, n)``, its reconstruction of every data
  output. Only the reconstructions of unavailable outputs are scored.

``in_dim`` is ``[-1, C, H, W]`` (or ``[-1, D]``) for an encoder and ``[-1, n]``
(F's output size) for a decoder; :func:`util.shapes.get_flattened_dim` turns
either into D or n.

A coder that cannot serve some k, r or input size raises ``ValueError`` from
its constructor with a sentence saying what it supports; the framework builds
every coder before training starts and turns that into a config error.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


class Encoder(nn.Module):
    """Maps k data inputs to r parity inputs: ``(B, k, D) -> (B, r, D)``."""

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int]):
        super().__init__()
        self.ec_k = ec_k
        self.ec_r = ec_r
        self.in_dim = list(in_dim)

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Decoder(nn.Module):
    """Maps k + r (partly zeroed) outputs to k reconstructions: ``(B, k+r, n) -> (B, k, n)``.

    Decoders that must know *which* outputs are unavailable (an algebraic
    decoder solving a linear system, say) set ``needs_availability = True``;
    the framework then calls ``forward(in_data, available)`` with a boolean
    ``(B, k + r)`` tensor, True where an output is available.

    A decoder meant for a trained parity model also defines
    ``combine_labels(outputs)``: given F's outputs on the k data inputs
    ``(B, k, n)`` it returns ``(B, r, n)``, what each parity model should output.
    """

    needs_availability: bool = False

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int]):
        super().__init__()
        self.ec_k = ec_k
        self.ec_r = ec_r
        self.in_dim = list(in_dim)

    def forward(self, in_data: torch.Tensor, available: Optional[torch.Tensor] = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def check_size(value, default: Optional[int] = None, key: str = "hidden") -> int:
    """A coder's size argument ``key`` (a width, or a number of layers or heads): ``default`` when ``value``
    is None and there is one; a ValueError naming ``key`` (shown as a config error naming the coder) unless it
    is a positive integer."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"its '{key}' must be a positive integer; got {value!r}.")
    return value
