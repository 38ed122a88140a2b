"""Datasets: seeded splits, tensor values, missing / corrupt files, data-dir resolution, CIFAR readers."""
from __future__ import annotations

import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets.splits as splits_mod
from datasets import load_dataset, resolve_data_dir
from datasets.sources import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from datasets.splits import default_val_size, split_train_val
from util.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
DIGITS_TOTAL, DIGITS_TEST = 1797, 359

MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
CIFAR100_FILES = ["train", "test"]

# name -> (folder under data_dir the error must name, files it must list)
MISSING = {
    "mnist": (Path("MNIST") / "raw", MNIST_FILES),
    "fashion-mnist": (Path("FashionMNIST") / "raw", MNIST_FILES),
    "cifar10": (Path("cifar-10-batches-py"), CIFAR10_FILES),
    "cifar100": (Path("cifar-100-python"), CIFAR100_FILES),
}


def pool(s) -> tuple[torch.Tensor, torch.Tensor]:
    """The official training split rebuilt from ``train`` and ``val`` through their indices."""
    n = len(s.train_idx) + len(s.val_idx)
    x = torch.empty((n, *s.train_x.shape[1:]), dtype=s.train_x.dtype)
    y = torch.full((n,), -1, dtype=torch.int64)
    x[s.train_idx], y[s.train_idx] = s.train_x, s.train_y
    x[s.val_idx], y[s.val_idx] = s.val_x, s.val_y
    return x, y


# ---------------------------------------------------------------- splits


def test_digits_sizes():
    s = load_dataset("digits", seed=0)
    n_train_pool = DIGITS_TOTAL - DIGITS_TEST
    assert len(s.test_x) == len(s.test_y) == DIGITS_TEST
    assert len(s.val_x) == len(s.val_y) == len(s.val_idx) == default_val_size(n_train_pool)
    assert len(s.train_x) + len(s.val_x) + len(s.test_x) == DIGITS_TOTAL
    assert s.input_shape == (1, 8, 8)
    assert s.num_classes == 10


def test_mnist_default_sizes(data_dir):
    s = load_dataset("mnist", str(data_dir), download=False)
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (55000, 5000, 10000)
    assert (len(s.train_y), len(s.val_y), len(s.test_y)) == (55000, 5000, 10000)
    assert default_val_size(60000) == 5000


@pytest.mark.parametrize("seed", [0, 1, 123])
def test_train_val_disjoint_and_cover_training_split(seed):
    s = load_dataset("digits", seed=seed)
    n = DIGITS_TOTAL - DIGITS_TEST
    tr, va = set(s.train_idx.tolist()), set(s.val_idx.tolist())
    assert len(tr) == len(s.train_idx) and len(va) == len(s.val_idx)  # no repeats
    assert not tr & va
    assert tr | va == set(range(n))
    # The tensors are the rows the indices name, so no test image slipped into train / val.
    x, y = pool(s)
    assert (y >= 0).all()
    x2, y2 = pool(load_dataset("digits", seed=seed + 1))
    assert torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.parametrize("n, val_size", [(10, 1), (10, 9), (1438, 120), (60000, 5000)])
def test_split_train_val_function(n, val_size):
    tr, va = split_train_val(n, val_size, seed=3)
    assert len(va) == val_size and len(tr) == n - val_size
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(n))


def test_same_seed_same_split_different_seed_different_split():
    a, b, c = (load_dataset("digits", seed=s) for s in (7, 7, 8))
    assert torch.equal(a.train_idx, b.train_idx) and torch.equal(a.val_idx, b.val_idx)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert not torch.equal(a.val_idx, c.val_idx)
    # The test split never depends on the run's seed.
    assert torch.equal(a.test_x, c.test_x) and torch.equal(a.test_y, c.test_y)


@pytest.mark.parametrize("val_size", [1, 50, 500])
def test_val_size_configurable(val_size):
    s = load_dataset("digits", val_size=val_size)
    assert len(s.val_x) == len(s.val_idx) == val_size
    assert len(s.train_x) == DIGITS_TOTAL - DIGITS_TEST - val_size


@pytest.mark.parametrize("val_size", [0, -1, DIGITS_TOTAL - DIGITS_TEST, 10**6])
def test_bad_val_size_is_config_error(val_size):
    with pytest.raises(ConfigError, match="val_size") as info:
        load_dataset("digits", val_size=val_size)
    assert isinstance(info.value, UserError)
    assert str(val_size) in str(info.value)


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("name, folder, first_label, pixel_sum", [
    ("mnist", "MNIST", 5, 1567298545),
    ("fashion-mnist", "FashionMNIST", 9, 3431114169),
])
def test_mnist_like_values(data_dir, name, folder, first_label, pixel_sum):
    import torchvision.datasets as tvd

    s = load_dataset(name, str(data_dir), download=False)
    for which in ("train", "val", "test"):
        x, y = s.split(which)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 28, 28) and x.shape[0] == y.shape[0]
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.min() == 0 and y.max() == 9
    assert s.num_classes == 10
    # Index 0 of the official training split (the first record of the raw file) is a 5 for MNIST.
    official = getattr(tvd, {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[name])(
        root=str(data_dir), train=True, download=False)
    assert int(official.targets[0]) == first_label
    assert torch.equal(s.train_y, official.targets[s.train_idx])
    assert torch.equal(s.val_y, official.targets[s.val_idx])
    labels = torch.full((60000,), -1, dtype=torch.int64)
    labels[s.train_idx], labels[s.val_idx] = s.train_y, s.val_y
    assert int(labels[0]) == first_label
    # Raw pixels come through unnormalised (v / 255), in file order: the sum over both parts is the
    # sum of the raw training file.
    total = sum(t.mul(255).round().sum(dtype=torch.float64).item() for t in (s.train_x, s.val_x))
    assert total == pixel_sum
    assert torch.equal(s.val_x[:50].mul(255).round().to(torch.uint8), official.data[s.val_idx[:50]].unsqueeze(1))


def test_digits_values():
    s = load_dataset("digits")
    for which in ("train", "val", "test"):
        x, y = s.split(which)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert set(y.tolist()) == set(range(10))
    assert s.train_x.max() == 1.0  # scaled by 16, the digits' maximum, not by 255


# ---------------------------------------------------------------- missing data


@pytest.fixture
def fresh_cache(monkeypatch):
    """An empty dataset cache for the test, so no earlier load hides a missing file."""
    monkeypatch.setattr(splits_mod, "_CACHE", {})


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_files_name_folder_and_files(tmp_path, fresh_cache, name):
    folder, files = MISSING[name]
    with pytest.raises(UserError) as info:
        load_dataset(name, str(tmp_path), download=False)
    msg = str(info.value)
    assert str(tmp_path / folder) in msg
    for f in files:
        assert f in msg
    assert "download" in msg and "LCC_DATA_DIR" in msg
    assert not any(tmp_path.iterdir()), "download=False must not create anything"


def test_missing_cifar_with_failed_download(tmp_path, fresh_cache, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(UserError, match="download failed") as info:
        load_dataset("cifar10", str(tmp_path), download=True)
    assert "network is unreachable" in str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)


def test_cli_missing_data_exits_2_without_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "base_models.fit", "--dataset", "mnist", "--data-dir", str(empty),
         "--no-download", "--root", str(tmp_path / "models")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert str(empty / "MNIST" / "raw") in proc.stderr
    assert "train-images-idx3-ubyte" in proc.stderr
    assert not (tmp_path / "models").exists()


# ---------------------------------------------------------------- data dir resolution


def test_resolve_data_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("LCC_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path / "cfg")) == str(tmp_path / "cfg")
    assert resolve_data_dir(None) == str(tmp_path / "env")
    monkeypatch.delenv("LCC_DATA_DIR")
    assert resolve_data_dir(None) == "./data"


@pytest.fixture
def recording_reader(monkeypatch, fresh_cache):
    """A reader importable as ``lcc_test_source.read`` that records the folder it was given."""
    seen: list[str] = []

    def read(data_dir, download):
        seen.append(data_dir)
        x = torch.zeros(24, 1, 2, 2)
        return x, torch.arange(24) % 3, x[:4], torch.arange(4) % 3, 3

    module = types.ModuleType("lcc_test_source")
    module.read = read
    monkeypatch.setitem(sys.modules, "lcc_test_source", module)
    return seen


@pytest.mark.parametrize("config, env, expected", [
    ("cfg", "env", "cfg"),
    (None, "env", "env"),
    (None, None, "./data"),
])
def test_load_dataset_data_dir_resolution(recording_reader, monkeypatch, tmp_path, config, env, expected):
    if env is None:
        monkeypatch.delenv("LCC_DATA_DIR", raising=False)
    else:
        monkeypatch.setenv("LCC_DATA_DIR", str(tmp_path / env))
    s = load_dataset("lcc_test_source.read", None if config is None else str(tmp_path / config))
    assert recording_reader == [expected if expected == "./data" else str(tmp_path / expected)]
    assert s.num_classes == 3 and len(s.train_x) + len(s.val_x) == 24


def test_missing_mnist_error_names_env_dir(monkeypatch, tmp_path, fresh_cache):
    monkeypatch.setenv("LCC_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError) as info:
        load_dataset("mnist", None, download=False)
    assert str(tmp_path / "MNIST" / "raw") in str(info.value)


# ---------------------------------------------------------------- CIFAR from small files of the real format

N_PER_BATCH, N_TEST = 20, 10

CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], label_key=b"labels", classes=10, mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], label_key=b"fine_labels",
                     classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD),
}


def cifar_entry(name: str, n: int, rng: np.random.Generator, label_key: bytes, classes: int) -> dict:
    entry = {
        b"batch_label": name.encode(),
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, classes, size=n).tolist(),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        entry[b"coarse_labels"] = rng.integers(0, 20, size=n).tolist()
    return entry


def write_cifar(root: Path, name: str, seed: int = 0) -> tuple[dict, dict]:
    """Write a miniature CIFAR set in the python-pickle layout; return the train and test entries by file."""
    spec = CIFAR[name]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per_train = N_PER_BATCH * 5 // len(spec["train"])
    written = {}
    for f in spec["train"] + spec["test"]:
        n = per_train if f in spec["train"] else N_TEST
        written[f] = cifar_entry(f, n, rng, spec["label_key"], spec["classes"])
        with open(folder / f, "wb") as fh:
            pickle.dump(written[f], fh, protocol=2)
    return {f: written[f] for f in spec["train"]}, {f: written[f] for f in spec["test"]}


def normalised(raw: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(raw.reshape(-1, 3, 32, 32)).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_from_real_format(tmp_path, fresh_cache, name):
    spec = CIFAR[name]
    train, test = write_cifar(tmp_path, name)
    n_train = N_PER_BATCH * 5
    s = load_dataset(name, str(tmp_path), download=False, seed=0)

    assert s.num_classes == spec["classes"]
    assert s.input_shape == (3, 32, 32)
    assert s.train_x.dtype == torch.float32 and s.train_y.dtype == torch.int64
    assert len(s.val_x) == default_val_size(n_train) and len(s.train_x) == n_train - len(s.val_x)
    assert s.test_x.shape == (N_TEST, 3, 32, 32) and s.test_y.shape == (N_TEST,)

    # Validation is carved from train: both together are the training batches in file order.
    raw_train = np.concatenate([e[b"data"] for e in train.values()])
    labels_train = torch.tensor(sum((e[spec["label_key"]] for e in train.values()), []))
    x, y = pool(s)
    assert torch.equal(y, labels_train)
    assert torch.allclose(x, normalised(raw_train, spec["mean"], spec["std"]), atol=1e-6)
    assert not set(s.train_idx.tolist()) & set(s.val_idx.tolist())
    (test_entry,) = test.values()
    assert torch.equal(s.test_y, torch.tensor(test_entry[spec["label_key"]]))
    assert torch.allclose(s.test_x, normalised(test_entry[b"data"], spec["mean"], spec["std"]), atol=1e-6)

    # One pixel by hand: row n, flat index c*1024 + h*32 + w is channel c at (h, w).
    n, c, h, w = 3, 2, 5, 17
    v = int(test_entry[b"data"][n, c * 1024 + h * 32 + w])
    expected = (v / 255 - spec["mean"][c]) / spec["std"][c]
    assert s.test_x[n, c, h, w].item() == pytest.approx(expected, abs=1e-5)


def test_cifar_known_pixel_values(tmp_path, fresh_cache):
    spec = CIFAR["cifar10"]
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / spec["folder"] / "test_batch"
    entry = pickle.loads(path.read_bytes(), encoding="bytes")
    entry[b"data"][0, :] = 0
    entry[b"data"][0, 0] = 255          # red at (0, 0)
    entry[b"data"][0, 1024 + 33] = 128  # green at (1, 1)
    path.write_bytes(pickle.dumps(entry, protocol=2))
    s = load_dataset("cifar10", str(tmp_path), download=False)
    m, sd = spec["mean"], spec["std"]
    assert s.test_x[0, 0, 0, 0].item() == pytest.approx((1.0 - m[0]) / sd[0], abs=1e-5)
    assert s.test_x[0, 1, 1, 1].item() == pytest.approx((128 / 255 - m[1]) / sd[1], abs=1e-5)
    assert s.test_x[0, 2, 0, 0].item() == pytest.approx(-m[2] / sd[2], abs=1e-5)


def _garbage(entry: dict) -> bytes:
    return b"this is not a CIFAR batch" * 10


def _truncated(entry: dict) -> bytes:
    return pickle.dumps(entry, protocol=2)[:500]


def _no_data_key(entry: dict) -> bytes:
    return pickle.dumps({k: v for k, v in entry.items() if k != b"data"}, protocol=2)


def _wrong_image_size(entry: dict) -> bytes:
    return pickle.dumps({**entry, b"data": entry[b"data"][:, :3000]}, protocol=2)


def _str_keys(entry: dict) -> bytes:
    return pickle.dumps({k.decode(): v for k, v in entry.items()}, protocol=2)


def _empty(entry: dict) -> bytes:
    return b""


def _not_a_dict(entry: dict) -> bytes:
    return pickle.dumps([entry[b"data"]], protocol=2)


def _label_count_mismatch(entry: dict) -> bytes:
    return pickle.dumps({**entry, b"labels": entry[b"labels"][:-1]}, protocol=2)


@pytest.mark.parametrize("corrupt", [
    _garbage, _truncated, _no_data_key, _wrong_image_size, _str_keys, _empty,
    _not_a_dict, _label_count_mismatch,
], ids=lambda f: f.__name__.lstrip("_"))
def test_corrupt_cifar_batch_is_user_error(tmp_path, fresh_cache, corrupt):
    write_cifar(tmp_path, "cifar10")
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(corrupt(pickle.loads(bad.read_bytes(), encoding="bytes")))
    with pytest.raises(UserError) as info:
        load_dataset("cifar10", str(tmp_path), download=False)
    msg = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "cifar10" in msg and "Fix" in msg
