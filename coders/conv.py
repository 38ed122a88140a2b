"""Convolutional learned encoder with dilated convolutions."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from coders.coder import Encoder


class ConvEncoder(Encoder):
    """The k inputs as k channels of one image, through 3x3 convolutions with
    dilations 1, 1, 2, 4, 8, 1 (20*k channels, ReLU between) and a 1x1
    convolution to r channels: the parities.

    Dilation widens the receptive field to the whole image in a few layers
    without pooling, so every parity pixel can mix every input pixel.
    """

    dilations = (1, 1, 2, 4, 8, 1)

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int]):
        super().__init__(ec_k, ec_r, in_dim)
        if len(self.in_dim) != 4:
            raise ValueError(f"ConvEncoder needs image inputs [-1, C, H, W]; got in_dim {self.in_dim}. "
                             f"Use coders.mlp.MLPEncoder for flat inputs.")
        self.h, self.w = self.in_dim[2], self.in_dim[3]
        ch = 20 * ec_k
        layers, cin = [], ec_k
        for d in self.dilations:
            layers += [nn.Conv2d(cin, ch, 3, padding=d, dilation=d), nn.ReLU()]
            cin = ch
        layers.append(nn.Conv2d(ch, ec_r, 1))
        self.nn = nn.Sequential(*layers)

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:
        b = in_data.shape[0]
        out = self.nn(in_data.view(b, self.ec_k, self.h, self.w))
        return out.view(b, self.ec_r, self.h * self.w)
