"""Losses and what each one is compared against.

A loss either scores reconstructions against F's outputs (``target_kind =
"base"``: MSE-Base, KL-Base) or against the true labels (``"label"``:
XENT-Label), or against both (``"both"``: called as ``loss(recon, outputs of
F, labels)``, such as :class:`KLLabelMix`). Built-in torch classification
losses are recognised; a user's own loss class says which it is with a
``target_kind`` class attribute (default ``"base"``).

:func:`scenario_groups` and :func:`weighted_by_scenario` weigh the scenarios
of a step against each other (the config key ``scenario_power``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn
import torch.nn.functional as F

LOSS_ALIASES = {
    "mse": "torch.nn.MSELoss",
    "kl": "train.losses.KLBase",
    "xent": "torch.nn.CrossEntropyLoss",
    "kl-xent": "train.losses.KLLabelMix",
}

TARGET_KINDS = ("base", "label", "both")

LABEL_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MultiMarginLoss)


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"its 'temperature' must be a positive number; got {temperature!r}.")
    return float(temperature)


def kl_base(recon: torch.Tensor, target: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(target / T) || softmax(recon / T)) * T^2, averaged over rows. The T^2 keeps the
    gradient's size independent of T (as in distillation), so one learning rate serves every T."""
    t = temperature
    kl = F.kl_div(F.log_softmax(recon / t, dim=-1), F.log_softmax(target / t, dim=-1),
                  reduction="batchmean", log_target=True)
    return kl * (t * t) if t != 1.0 else kl


class KLBase(nn.Module):
    """KL(softmax(F's output / T) || softmax(reconstruction / T)) * T^2, averaged over rows.

    ``temperature`` T (default 1, the plain KL-Base) above 1 softens F's distribution, so the
    ranks of F's unlikely classes -- what F's outputs say beyond the top class -- weigh more."""

    target_kind = "base"

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return kl_base(recon, target, self.temperature)


class KLLabelMix(nn.Module):
    """(1 - w) * KLBase(T) against F's outputs + w * cross-entropy against the true labels.

    ``label_weight`` w (default 0.5) in [0, 1]: 0 is KLBase, 1 is XENT-Label."""

    target_kind = "both"

    def __init__(self, label_weight: float = 0.5, temperature: float = 1.0):
        super().__init__()
        if isinstance(label_weight, bool) or not isinstance(label_weight, (int, float)) \
                or not 0.0 <= label_weight <= 1.0:
            raise ValueError(f"its 'label_weight' must be a number from 0 to 1; got {label_weight!r}.")
        self.label_weight = float(label_weight)
        self.temperature = check_temperature(temperature)

    def forward(self, recon: torch.Tensor, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = self.label_weight
        return (1.0 - w) * kl_base(recon, outputs, self.temperature) + w * F.cross_entropy(recon, labels)


def target_kind(loss: nn.Module) -> str:
    """``"label"`` when ``loss`` wants class indices, ``"base"`` when it wants F's outputs."""
    kind = getattr(loss, "target_kind", None)
    if kind is not None:
        return kind
    return "label" if isinstance(loss, LABEL_LOSSES) else "base"


def scenario_groups(unavailable: torch.Tensor, power: float) -> Optional[list[tuple[torch.Tensor, float]]]:
    """How the config key ``scenario_power`` p weighs the loss over the unavailable pairs of
    ``unavailable`` ``(S, k)`` (pairs in :func:`coders.scenarios.unavailable_pairs` order).

    A scenario with u data outputs missing weighs u**p: each of its u pairs u**(p - 1). p = 1
    weighs every missing data output alike (a plain mean over the pairs, the default; returns
    None), p = 0 every scenario alike, p = 2 the scenarios with more data outputs missing up.
    Returns ``[(pair indices, weight), ...]``, one entry per distinct u, the weights summing to 1.
    At r = 1 every scenario misses one data output, so every p gives the plain mean.
    """
    if power == 1.0:
        return None
    counts = unavailable.sum(1)                     # u of every scenario
    per_pair = counts[unavailable.nonzero(as_tuple=True)[0]]   # u of every pair
    groups = []
    for u in sorted(set(per_pair.tolist())):
        pairs = (per_pair == u).nonzero(as_tuple=True)[0]
        groups.append((pairs, len(pairs) * float(u) ** (power - 1.0)))
    total = sum(w for _, w in groups)
    return [(pairs, w / total) for pairs, w in groups]


def weighted_by_scenario(loss: Callable[[torch.Tensor], torch.Tensor], n_rows: int, n_pairs: int,
                         groups: Optional[list[tuple[torch.Tensor, float]]]) -> torch.Tensor:
    """The loss over ``n_rows`` selected rows, ordered (pair, group) as
    :func:`coders.scenarios.gather_pairs` leaves them, weighed by ``groups`` (see
    :func:`scenario_groups`). ``loss(rows)`` scores the rows with the given indices (None: all),
    and must be a mean over them."""
    if groups is None or len(groups) == 1:
        return loss(None)
    per_pair = n_rows // n_pairs
    offsets = torch.arange(per_pair)
    total = None
    for pairs, weight in groups:
        rows = (pairs.cpu()[:, None] * per_pair + offsets).flatten()
        term = weight * loss(rows)
        total = term if total is None else total + term
    return total
