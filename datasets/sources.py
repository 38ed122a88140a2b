"""Readers that turn each dataset's files into tensors.

Every reader has the signature ``(data_dir, download) -> (train_x, train_y,
test_x, test_y, num_classes)`` with images as float tensors ``(N, C, H, W)``
and labels as int64 tensors ``(N,)``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from util.errors import UserError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]


def _missing(name: str, folder: Path, files: list[str], download: bool, reason: str = "") -> UserError:
    how = (
        "the download failed" + (f" ({reason})" if reason else "")
        if download
        else "downloading is off (\"download\": false)"
    )
    return UserError(
        f"Dataset '{name}' not found: expected the files {', '.join(files)} in '{folder}', and {how}. "
        f"Fix: copy the files there, point the config key 'data_dir' (or the environment variable "
        f"LCC_DATA_DIR) at the folder that holds them, or set \"download\": true on a machine with internet."
    )


def _absent_folders(leaf: Path) -> list[Path]:
    """``leaf`` and the folders above it that do not exist yet, deepest first."""
    out = []
    for folder in [leaf, *leaf.parents]:
        if folder.exists():
            break
        out.append(folder)
    return out


def _remove_if_empty(folders: list[Path]) -> None:
    """Take back the folders a failed download made (deepest first), those it left empty only."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (something was written), or already gone
            return


def digits(data_dir: str, download: bool) -> Arrays:
    """scikit-learn's 1797 8x8 handwritten digits, scaled to [0, 1]; no files needed.

    The set has no official test split, so a fixed 20% (seeded with 0, never
    with the run's seed) is held out as test.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test], 10


def diabetes(data_dir: str, download: bool) -> Arrays:
    """scikit-learn's bundled diabetes regression set (442 patients, 10 features); no files needed.

    A regression set: float targets (disease progression after one year), so
    ``num_classes`` is None. Features and target are standardised with the
    training rows' mean and standard deviation; a fixed 20% (seeded with 0) is
    held out as test, as for ``digits``.
    """
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.float32)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(0), x[train].std(0)
    y_mean, y_std = y[train].mean(), y[train].std()
    x, y = (x - mean) / std, (y - y_mean) / y_std
    return x[train], y[train], x[test], y[test], None


def _torchvision_mnist(cls_name: str, folder_name: str, name: str, data_dir: str, download: bool) -> Arrays:
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    root = Path(data_dir)
    raw = root / folder_name / "raw"
    files = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    have = all((raw / f).exists() for f in files)
    if not have and not download:
        raise _missing(name, raw, files, download)
    made = _absent_folders(raw)
    try:
        train = cls(root=str(root), train=True, download=download and not have)
        test = cls(root=str(root), train=False, download=False)
    except (RuntimeError, OSError, ValueError, AssertionError) as exc:
        _remove_if_empty(made)  # a failed download leaves no empty data/MNIST/raw behind
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if have:
            raise UserError(
                f"Dataset '{name}': the files in '{raw}' could not be read ({reason}). Fix: delete them and "
                f"copy or download them again."
            ) from None
        raise _missing(name, raw, files, download, reason) from None

    def to_tensors(ds):
        return ds.data.unsqueeze(1).float().div_(255.0), ds.targets.long()

    tx, ty = to_tensors(train)
    ex, ey = to_tensors(test)
    return tx, ty, ex, ey, 10


def mnist(data_dir: str, download: bool) -> Arrays:
    """MNIST as plain [0, 1] tensors (the reference weights expect no normalisation)."""
    return _torchvision_mnist("MNIST", "MNIST", "mnist", data_dir, download)


def fashion_mnist(data_dir: str, download: bool) -> Arrays:
    """Fashion-MNIST as plain [0, 1] tensors."""
    return _torchvision_mnist("FashionMNIST", "FashionMNIST", "fashion-mnist", data_dir, download)


def _read_cifar_batches(folder: Path, names: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for n in names:
        with open(folder / n, "rb") as fh:
            entry = pickle.load(fh, encoding="bytes")
        if not isinstance(entry, dict):
            raise ValueError(f"{n} holds a {type(entry).__name__}, not a dict of b'data' and labels")
        xs.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry[label_key], dtype=np.int64))
        if len(xs[-1]) != len(ys[-1]):
            raise ValueError(f"{n} holds {len(xs[-1])} images but {len(ys[-1])} labels")
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _cifar(name: str, data_dir: str, download: bool, folder_name: str, train_files: list[str],
           test_files: list[str], label_key: bytes, tv_class: str, mean, std, num_classes: int) -> Arrays:
    # The python pickles are read directly rather than through torchvision's
    # classes, which insist on the official MD5s; only the download goes
    # through torchvision.
    folder = Path(data_dir) / folder_name
    files = train_files + test_files
    if not all((folder / f).exists() for f in files):
        if not download:
            raise _missing(name, folder, files, download)
        import torchvision.datasets as tvd

        made = _absent_folders(folder)
        try:
            getattr(tvd, tv_class)(root=str(data_dir), train=True, download=True)
        except (RuntimeError, OSError) as exc:
            _remove_if_empty(made)
            raise _missing(name, folder, files, download, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    try:
        tx, ty = _read_cifar_batches(folder, train_files, label_key)
        ex, ey = _read_cifar_batches(folder, test_files, label_key)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
        raise UserError(
            f"Dataset '{name}': the files in '{folder}' are not CIFAR python batches ({exc!r}). "
            f"Fix: replace them with the official 'python version' files, or delete them and download again."
        ) from None
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    norm = lambda x: (x.float().div_(255.0) - m) / s  # noqa: E731
    return norm(tx), ty, norm(ex), ey, num_classes


def cifar10(data_dir: str, download: bool) -> Arrays:
    """CIFAR-10, normalised with its per-channel mean and std."""
    return _cifar("cifar10", data_dir, download, "cifar-10-batches-py",
                  [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels",
                  "CIFAR10", CIFAR10_MEAN, CIFAR10_STD, 10)


def cifar100(data_dir: str, download: bool) -> Arrays:
    """CIFAR-100 (fine labels), normalised with its per-channel mean and std."""
    return _cifar("cifar100", data_dir, download, "cifar-100-python", ["train"], ["test"], b"fine_labels",
                  "CIFAR100", CIFAR100_MEAN, CIFAR100_STD, 100)
