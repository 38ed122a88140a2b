"""Sizes of the tensors that coders see."""
from __future__ import annotations

from typing import Sequence


def get_flattened_dim(in_dim: Sequence[int]) -> int:
    """H*W for an image size ``[-1, C, H, W]`` (one channel), or D for ``[-1, D]``.

    Encoders see one channel at a time, so the channel count is left out.
    """
    dims = list(in_dim)
    if len(dims) == 4:
        return int(dims[2] * dims[3])
    if len(dims) == 2:
        return int(dims[1])
    if len(dims) == 3:  # [-1, H, W]
        return int(dims[1] * dims[2])
    raise ValueError(f"in_dim must be [-1, C, H, W] or [-1, D]; got {dims}")


def coder_in_dim(in_shape) -> list[int]:
    """The ``in_dim`` an encoder is built with for inputs of shape ``in_shape``: ``[-1, D]`` for a
    vector ``(D,)``, ``[-1, C, H, W]`` for an image, ``[-1, C, 1, prod(rest)]`` for any other
    ``(C, *rest)`` (C channels, each a row of values), matching how :meth:`coders.code.Code.encode` folds the
    channels into the encoder's batch."""
    shape = [int(d) for d in in_shape]
    if len(shape) == 1:
        return [-1, shape[0]]
    if len(shape) == 3:
        return [-1, *shape]
    rest = 1
    for d in shape[1:]:
        rest *= d
    return [-1, shape[0], 1, rest]
