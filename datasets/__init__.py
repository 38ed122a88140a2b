"""Datasets as in-memory tensors with seeded train / validation / test splits.

``load_dataset(name, ...)`` returns a :class:`datasets.splits.Splits`. Names:
``digits`` (scikit-learn's bundled 8x8 digits, offline), ``mnist``,
``fashion-mnist``, ``cifar10``, ``cifar100``; or a class path to a callable
``fn(data_dir, download) -> (train_x, train_y, test_x, test_y, num_classes)``.
"""
from datasets.splits import Splits, load_dataset, DATASET_ALIASES, resolve_data_dir

__all__ = ["Splits", "load_dataset", "DATASET_ALIASES", "resolve_data_dir"]
