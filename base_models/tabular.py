import math

import torch
from torch import nn


class TabularMLP(nn.Module):
    """A regression network for tabular rows: D -> 64 -> 64 -> m with ReLUs, ``(B, D) -> (B, m)``.

    ``num_classes`` is the number of outputs m (the target width; 1 for one target per row,
    as on the ``diabetes`` set). Trained with MSE by ``base_models.fit`` on a regression set.
    """

    def __init__(self, in_shape=(10,), num_classes: int = 1, hidden: int = 64):
        super().__init__()
        self.nn = nn.Sequential(
            nn.Linear(math.prod(in_shape), hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nn(x.flatten(1))
