"""Seeded train / validation / test splits held as tensors."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from util.classpath import import_class
from util.errors import ConfigError

DATASET_ALIASES = {
    "digits": "datasets.sources.digits",
    "diabetes": "datasets.sources.diabetes",
    "mnist": "datasets.sources.mnist",
    "fashion-mnist": "datasets.sources.fashion_mnist",
    "cifar10": "datasets.sources.cifar10",
    "cifar100": "datasets.sources.cifar100",
}

# Datasets whose encoder inputs get random crop + flip during training.
AUGMENTED = {"cifar10", "cifar100"}


@dataclass
class Splits:
    """Train / validation / test tensors of one dataset.

    Images are float ``(N, C, H, W)``, labels int64 ``(N,)``; any other input
    shape ``(N, ...)`` serves a function F. A regression set (no classes) has
    ``num_classes = None`` and float targets ``(N,)`` or ``(N, m)``; a domain
    (datasets/domains.py) has no targets at all, labels ``(N, 0)``. ``train_idx`` and
    ``val_idx`` index the official training split, so tests can check that
    they are disjoint and seed-determined.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: Optional[int]
    train_idx: torch.Tensor
    val_idx: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def val_fingerprint(self) -> str:
        """A short hash of which training images are held out for validation (order-free)."""
        idx = self.val_idx.sort().values.to(torch.int64).cpu().numpy().tobytes()
        return hashlib.sha1(idx).hexdigest()[:16]

    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        return getattr(self, f"{which}_x"), getattr(self, f"{which}_y")


def resolve_data_dir(data_dir: Optional[str]) -> str:
    """Config value, else ``$LCC_DATA_DIR``, else ``./data``."""
    return data_dir or os.environ.get("LCC_DATA_DIR") or "./data"


def default_val_size(n_train: int) -> int:
    """5000 for a 60k-image training split, proportionally fewer for smaller ones."""
    return max(1, round(n_train / 12))


def split_train_val(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint ``(train_idx, val_idx)`` over ``range(n)`` drawn with ``seed``."""
    if not 0 < val_size < n:
        raise ConfigError(f"Config key 'val_size': must be between 1 and {n - 1} for this dataset; got {val_size}.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


_CACHE: dict = {}


def load_dataset(name: str, data_dir: Optional[str] = None, download: bool = True,
                 val_size: Optional[int] = None, seed: int = 0) -> Splits:
    """Load ``name`` and carve a validation split from its training split with ``seed``.

    Raw tensors are cached per process, so a sweep over k reads the files once.
    """
    root = resolve_data_dir(data_dir)
    key = (name, os.path.abspath(root))
    if key not in _CACHE:
        reader = import_class(name, "datasets", DATASET_ALIASES)
        _CACHE[key] = reader(root, download)
    tx, ty, ex, ey, num_classes = _CACHE[key]
    vs = default_val_size(len(tx)) if val_size is None else val_size
    tr, va = split_train_val(len(tx), vs, seed)
    # Copies (indexing copies train/val too), so a caller changing its tensors in place
    # cannot change what the next load_dataset call returns.
    return Splits(name, tx[tr], ty[tr], tx[va], ty[va], ex.clone(), ey.clone(), num_classes, tr, va)
