"""Image-specific encoder: shrink the k images and tile them into one.

The parity is one image of the original size holding a downsampled copy of
every input, so a parity model trained on it can output (approximately) the
sum of F's outputs on the k inputs; pair it with
:class:`coders.summation.SubtractionDecoder`.

Layout: a grid of ``cols = ceil(sqrt(k))`` columns and ``rows = ceil(k / cols)``
rows, filled row by row; unused tiles stay zero. k = 2 gives two H x W/2
tiles side by side, k = 3 and k = 4 give 2 x 2 quadrants. Every tile is
``H / rows`` by ``W / cols`` pixels, so H must be divisible by ``rows`` and W
by ``cols``.

Resizing takes the mean over each ``rows x cols`` block of pixels, which is
what ``interpolate(mode="area")`` computes for these integer shrink factors:
anti-aliased and without parameters.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from coders.coder import Encoder
from coders.summation import check_single_parity


def tile_grid(ec_k: int) -> tuple[int, int]:
    """``(rows, cols)`` of the grid holding k tiles."""
    cols = math.ceil(math.sqrt(ec_k))
    rows = math.ceil(ec_k / cols)
    return rows, cols


def tile_size(ec_k: int, height: int, width: int) -> tuple[int, int]:
    """``(tile_height, tile_width)``; ``ValueError`` if the grid does not divide the image."""
    rows, cols = tile_grid(ec_k)
    if height < rows or width < cols or height % rows or width % cols:
        raise ValueError(f"ConcatenationEncoder tiles k = {ec_k} images in a {rows} x {cols} grid, so it "
                         f"supports heights divisible by {rows} and widths divisible by {cols}; "
                         f"got {height} x {width}.")
    return height // rows, width // cols


def tile_slices(ec_k: int, height: int, width: int) -> list[tuple[slice, slice]]:
    """``(row_slice, col_slice)`` of the tile holding input i, for i in 0..k-1."""
    _, cols = tile_grid(ec_k)
    th, tw = tile_size(ec_k, height, width)
    return [(slice((i // cols) * th, (i // cols + 1) * th), slice((i % cols) * tw, (i % cols + 1) * tw))
            for i in range(ec_k)]


class ConcatenationEncoder(Encoder):
    """``(B, k, H*W) -> (B, 1, H*W)``: the k images, each shrunk to a tile, in one image."""

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int]):
        super().__init__(ec_k, ec_r, in_dim)
        check_single_parity(type(self).__name__, ec_k, ec_r)
        if len(self.in_dim) not in (3, 4):
            raise ValueError(f"ConcatenationEncoder supports image inputs [-1, C, H, W] only; "
                             f"got in_dim {self.in_dim}.")
        self.height, self.width = int(self.in_dim[-2]), int(self.in_dim[-1])
        self.rows, self.cols = tile_grid(ec_k)
        self.tile_height, self.tile_width = tile_size(ec_k, self.height, self.width)

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:
        b, k, _ = in_data.shape
        # The mean over each rows x cols block is what area interpolation computes for
        # whole-number shrink factors. Adding the rows x cols strided views runs several
        # times faster on CPU than a pooling call or a reduction over the tiny block dims.
        blocks = in_data.reshape(b, k, self.tile_height, self.rows, self.tile_width, self.cols)
        tiles = blocks[:, :, :, 0, :, 0].clone()
        for i in range(self.rows):
            for j in range(self.cols):
                if i or j:
                    tiles.add_(blocks[:, :, :, i, :, j])
        tiles.mul_(1.0 / (self.rows * self.cols))
        unused = self.rows * self.cols - k
        if unused:
            tiles = torch.cat([tiles, tiles.new_zeros(b, unused, self.tile_height, self.tile_width)], dim=1)
        # (B, rows, cols, th, tw) -> (B, rows, th, cols, tw) puts tile pixels in raster order.
        grid = tiles.view(b, self.rows, self.cols, self.tile_height, self.tile_width).permute(0, 1, 3, 2, 4)
        return grid.reshape(b, 1, self.height * self.width)
