import torch
from torch import nn


class LeNet5(nn.Module):
    """LeNet-5: two 5x5 convolutions with pooling, then 120-84-classes.

    The first convolution pads by 2 so 28x28 inputs see the classic 32x32
    receptive layout; an adaptive pool before the classifier lets any input
    size (8x8 digits, 32x32 CIFAR) reach the same 16x5x5 feature map.
    """

    def __init__(self, in_shape=(1, 28, 28), num_classes: int = 10):
        super().__init__()
        c = in_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2 if in_shape[1] < 16 else 0), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 25, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
