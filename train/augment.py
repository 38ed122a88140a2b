"""Batched CIFAR-style augmentation: random crop after padding, random horizontal flip."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Augment every image of ``x`` ``(N, C, H, W)`` independently, without a Python loop.

    Each image is zero-padded by ``pad``, cropped back to ``H x W`` at a random
    offset and mirrored with probability 1/2. ``gen`` (a CPU generator) makes
    the draws reproducible and part of the checkpointed state.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])           # (N, H)
    cols = torch.arange(w, device=x.device)[None, :].expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]        # (N, W)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
