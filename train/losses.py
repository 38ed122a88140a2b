"""Losses and what each one is compared against.

A loss either scores reconstructions against F's outputs (``target_kind =
"base"``: MSE-Base, KL-Base) or against the true labels (``"label"``:
XENT-Label). Built-in torch classification losses are recognised; a user's
own loss class says which it is with a ``target_kind`` class attribute
(default ``"base"``).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

LOSS_ALIASES = {
    "mse": "torch.nn.MSELoss",
    "kl": "train.losses.KLBase",
    "xent": "torch.nn.CrossEntropyLoss",
}

LABEL_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MultiMarginLoss)


class KLBase(nn.Module):
    """KL(softmax(F's output) || softmax(reconstruction)), averaged over rows."""

    target_kind = "base"

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(recon, dim=-1), F.log_softmax(target, dim=-1),
                        reduction="batchmean", log_target=True)


def target_kind(loss: nn.Module) -> str:
    """``"label"`` when ``loss`` wants class indices, ``"base"`` when it wants F's outputs."""
    kind = getattr(loss, "target_kind", None)
    if kind is not None:
        return kind
    return "label" if isinstance(loss, LABEL_LOSSES) else "base"
