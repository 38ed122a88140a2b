import math

import torch
from torch import nn


class BaseMLP(nn.Module):
    """The 784-200-100-10 ReLU MLP (input size follows the dataset).

    Parameter names ``nn.0/2/4.*`` match the reference weights, which load as they are.
    """

    def __init__(self, in_shape=(1, 28, 28), num_classes: int = 10):
        super().__init__()
        d = math.prod(in_shape)
        self.nn = nn.Sequential(
            nn.Linear(d, 200), nn.ReLU(),
            nn.Linear(200, 100), nn.ReLU(),
            nn.Linear(100, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nn(x.flatten(1))
