"""Datasets as in-memory tensors with seeded train / validation / test splits.

``load_dataset(name, ...)`` returns a :class:`datasets.splits.Splits`. Names:
``digits`` (scikit-learn's bundled 8x8 digits, offline), ``mnist``,
``fashion-mnist``, ``cifar10``, ``cifar100``; or a class path to a callable
``fn(data_dir, download) -> (train_x, train_y, test_x, test_y, num_classes)``.
``load_data(name, ..., domains)`` also draws the inputs of a domain
(datasets/domains.py) when ``name`` is one of the config's ``domains``.
"""
from datasets.splits import Splits, load_dataset, DATASET_ALIASES, resolve_data_dir
from datasets.domains import load_data

__all__ = ["Splits", "load_dataset", "load_data", "DATASET_ALIASES", "resolve_data_dir"]
