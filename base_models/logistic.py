import math

import torch
from torch import nn


class LogisticRegression(nn.Module):
    """One linear layer ``lin`` over the flattened input (reference keys ``lin.*``)."""

    def __init__(self, in_shape=(1, 28, 28), num_classes: int = 10):
        super().__init__()
        self.lin = nn.Linear(math.prod(in_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1))
