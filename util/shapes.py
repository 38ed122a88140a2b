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
