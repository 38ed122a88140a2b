"""An encoder that reads each input with one shared network, then renders the parities.

:class:`coders.mlp.MLPEncoder` maps the k inputs stacked (k * D values) through
one hidden layer k * D wide: its weights grow as k^2 D^2 (20 M at k = 4 on
28 x 28 images, 44 M at k = 8), and it learns k separate ways of reading a
digit, one per input position. This encoder factors the job in three:

1. **read**: one network shared by every position maps each input to an
   embedding (D -> ``hidden`` -> ``embed``, ReLUs), so a digit is read the
   same way wherever it sits in the group and the reader learns from k
   times as many examples;
2. **combine**: the k embeddings are concatenated in position order and
   mapped by one linear layer to ``render`` units, i.e. a separate weight
   matrix for each position, so the parity can depend on which input holds
   which digit (a code must: the decoder rebuilds a *particular* output);
3. **render**: an MLP (``render`` -> ``render`` -> r * D, ReLUs) draws the r
   parity images.

At k = 4 on MNIST with the defaults it has about 1 M weights, and only the
combine layer grows with k (k * ``embed`` * ``render``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from coders.coder import Encoder, check_size
from util.shapes import get_flattened_dim


class FactoredEncoder(Encoder):
    """Shared reader D -> ``hidden`` (256) -> ``embed`` (64) applied to each input; the k embeddings
    concatenated -> ``render`` (512) -> ``render`` -> r * D; ReLU after every layer but the last.
    ``(B, k, D) -> (B, r, D)``."""

    def __init__(self, ec_k: int, ec_r: int, in_dim: Sequence[int], hidden: Optional[int] = None,
                 embed: Optional[int] = None, render: Optional[int] = None):
        super().__init__(ec_k, ec_r, in_dim)
        d = get_flattened_dim(in_dim)
        h = check_size(hidden, 256, "hidden")
        e = check_size(embed, 64, "embed")
        g = check_size(render, 512, "render")
        self.reader = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, e), nn.ReLU())
        self.combine = nn.Linear(ec_k * e, g)
        self.render = nn.Sequential(nn.ReLU(), nn.Linear(g, g), nn.ReLU(), nn.Linear(g, ec_r * d))

    def forward(self, in_data: torch.Tensor) -> torch.Tensor:
        b, k, d = in_data.shape
        embeddings = self.reader(in_data.reshape(b * k, d))      # the same weights for every position
        mixed = self.combine(embeddings.view(b, -1))             # position i meets its own block of weights
        return self.render(mixed).view(b, self.ec_r, d)

