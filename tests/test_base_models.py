"""Base models F: every registered architecture, the reference weights, and the base-model trainer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import base_models.fit as bt
from base_models import MODEL_ALIASES
from base_models.logistic import LogisticRegression
from base_models.mlp import BaseMLP
from datasets import load_dataset
from util.classpath import build
from util.errors import UserError

# dataset -> (input shape, classes)
SHAPES = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
}
CASES = [pytest.param(alias, ds, id=f"{alias}-{ds}") for alias in sorted(MODEL_ALIASES) for ds in SHAPES]
BATCH = 2


def make(alias: str, dataset: str) -> nn.Module:
    in_shape, classes = SHAPES[dataset]
    return build(alias, "models", aliases=MODEL_ALIASES, in_shape=in_shape, num_classes=classes)


def seeded_model_and_batch(alias: str, dataset: str) -> tuple[nn.Module, torch.Tensor, int]:
    """The architecture built from seed 0, a random batch of its input shape, and its class count."""
    torch.manual_seed(0)
    in_shape, classes = SHAPES[dataset]
    return make(alias, dataset), torch.rand(BATCH, *in_shape), classes


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture
def one_thread():
    """Tiny MLP steps run fastest on one thread; two threads on a busy two-core box spin ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- every architecture


@pytest.mark.parametrize("alias, dataset", CASES)
def test_forward_shape(alias, dataset):
    model, x, classes = seeded_model_and_batch(alias, dataset)
    out = model(x)
    assert out.shape == (BATCH, classes)
    assert torch.isfinite(out).all()
    model.eval()
    with torch.no_grad():
        one = model(x[:1])  # eval mode takes a batch of one (BatchNorm uses running stats)
    assert one.shape == (1, classes) and torch.isfinite(one).all()


@pytest.mark.parametrize("alias, dataset", CASES)
def test_backward_reaches_every_parameter(alias, dataset):
    model, x, classes = seeded_model_and_batch(alias, dataset)
    loss = nn.functional.cross_entropy(model(x), torch.arange(BATCH) % classes)
    loss.backward()
    named = list(model.named_parameters())
    assert named
    for name, p in named:
        assert p.grad is not None, f"{alias}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{alias}: {name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{alias}: {name} got an all-zero gradient"


# ---------------------------------------------------------------- reference weights


@pytest.mark.parametrize("cls, path", [
    (BaseMLP, "mnist/base-mlp/model.t7"),
    (BaseMLP, "fashion-mnist/base-mlp/model.t7"),
    (LogisticRegression, "mnist/logistic/model.t7"),
])
def test_reference_weights_load_strict(anchor_dir, cls, path):
    state = torch.load(anchor_dir / path, map_location="cpu", weights_only=True)
    model = cls(in_shape=(1, 28, 28), num_classes=10)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = bt.load_state(cls(in_shape=(1, 28, 28), num_classes=10), anchor_dir / path)
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_reference_base_mlp_mnist_accuracy(anchor_dir, data_dir):
    s = load_dataset("mnist", str(data_dir), download=False)
    model = bt.load_state(BaseMLP(in_shape=s.input_shape, num_classes=s.num_classes),
                          anchor_dir / "mnist" / "base-mlp" / "model.t7")
    correct = int((bt.predict(model, s.test_x).argmax(1) == s.test_y).sum())
    assert correct == 9793
    assert bt.accuracy(model, s.test_x, s.test_y) == pytest.approx(0.9793)


def _garbage(anchor_dir: Path, path: Path) -> None:
    path.write_bytes(b"definitely not a torch file" * 100)


def _truncated(anchor_dir: Path, path: Path) -> None:
    path.write_bytes((anchor_dir / "mnist/base-mlp/model.t7").read_bytes()[:4000])


def _logistic_into_mlp(anchor_dir: Path, path: Path) -> None:
    path.write_bytes((anchor_dir / "mnist/logistic/model.t7").read_bytes())


def _wrong_shape(anchor_dir: Path, path: Path) -> None:
    torch.save(BaseMLP(in_shape=(1, 8, 8)).state_dict(), path)


def _not_a_state_dict(anchor_dir: Path, path: Path) -> None:
    torch.save(torch.zeros(3), path)


@pytest.mark.parametrize("spoil", [_garbage, _truncated, _logistic_into_mlp, _wrong_shape, _not_a_state_dict],
                         ids=lambda f: f.__name__.lstrip("_"))
def test_bad_weights_file_is_user_error(anchor_dir, tmp_path, spoil):
    path = tmp_path / "weights.pt"
    spoil(anchor_dir, path)
    with pytest.raises(UserError) as info:
        bt.load_state(BaseMLP(in_shape=(1, 28, 28), num_classes=10), path)
    assert str(path) in str(info.value)
    assert "Fix" in str(info.value)


# ---------------------------------------------------------------- trainer


def test_train_on_digits_reaches_90_percent(digits, one_thread):
    torch.manual_seed(0)
    model = bt.build_base_model("base-mlp", digits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, metrics = bt.train_base_model(model, digits, epochs=20, device="cpu", progress=False)
    acc = bt.accuracy(model, digits.test_x, digits.test_y)
    assert acc >= 0.90
    assert metrics["test_acc"] == pytest.approx(acc)
    assert metrics["val_acc"] == pytest.approx(bt.accuracy(model, digits.val_x, digits.val_y))
    assert 1 <= metrics["best_epoch"] <= 20 and metrics["epochs"] == 20
    assert not model.training
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_or_train_writes_then_reuses(digits, tmp_path, monkeypatch, one_thread):
    root = tmp_path / "models"
    model = bt.load_or_train("base-mlp", digits, root=str(root), device="cpu", epochs=3, progress=False)
    weights = root / "digits" / "base-mlp" / "model.pt"
    metrics_file = weights.with_name("metrics.json")
    assert weights.is_file() and metrics_file.is_file()
    metrics = json.loads(metrics_file.read_text())
    assert metrics["dataset"] == "digits" and metrics["epochs"] == 3
    assert {"train_acc", "val_acc", "test_acc", "best_epoch"} <= set(metrics)
    assert metrics["test_acc"] == pytest.approx(bt.accuracy(model, digits.test_x, digits.test_y))
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    stamp = weights.stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("load_or_train retrained although the weights file exists")

    monkeypatch.setattr(bt, "train_base_model", must_not_train)
    again = bt.load_or_train("base-mlp", digits, root=str(root), device="cpu", epochs=3, progress=False)
    assert weights.stat().st_mtime_ns == stamp
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_training_f_is_reproducible_from_the_seed(digits, tmp_path, one_thread):
    def trained(root, seed):
        torch.manual_seed(1234 + seed * 7 + len(str(root)))  # whatever the global RNG held before
        return bt.load_or_train("base-mlp", digits, root=str(root), device="cpu", epochs=2, seed=seed,
                                progress=False).state_dict()

    a, b = trained(tmp_path / "a", 0), trained(tmp_path / "bb", 0)
    c = trained(tmp_path / "c", 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_f_from_another_split_warns_once_loaded(digits, tmp_path, capsys, one_thread):
    root = str(tmp_path / "models")
    bt.load_or_train("base-mlp", digits, root=root, device="cpu", epochs=1, seed=0, progress=False)
    metrics = json.loads((tmp_path / "models" / "digits" / "base-mlp" / "metrics.json").read_text())
    assert metrics["val_split"] == digits.val_fingerprint() and metrics["seed"] == 0
    capsys.readouterr()

    bt.load_or_train("base-mlp", digits, root=root, device="cpu", seed=0, progress=False)
    assert "Warning" not in capsys.readouterr().err  # the split F was trained on

    other = load_dataset("digits", seed=1)
    assert other.val_fingerprint() != digits.val_fingerprint()
    bt.load_or_train("base-mlp", other, root=root, device="cpu", seed=1, progress=False)
    err = capsys.readouterr().err
    assert "Warning" in err and "seed 0" in err and "seed 1" in err and "Fix:" in err


def test_load_or_train_explicit_missing_path_is_user_error(digits, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match="base_model_file") as info:
        bt.load_or_train("base-mlp", digits, path=str(missing), root=str(tmp_path), progress=False)
    assert str(missing) in str(info.value)
    assert not any(tmp_path.iterdir())


def test_cli_trains_writes_and_reuses(tmp_path, capsys, one_thread):
    root = tmp_path / "models"
    argv = ["--dataset", "digits", "--model", "base-mlp", "--root", str(root), "--epochs", "2",
            "--device", "cpu"]
    assert bt.main(argv) == 0
    weights = root / "digits" / "base-mlp" / "model.pt"
    assert weights.is_file() and weights.with_name("metrics.json").is_file()
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[0])["epochs"] == 2
    assert str(weights) in out
    stamp = weights.stat().st_mtime_ns
    assert bt.main(argv) == 0
    assert "reusing" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp


def test_cli_val_size_sets_the_split_f_is_trained_on(tmp_path, capsys, one_thread):
    root = tmp_path / "models"
    argv = ["--dataset", "digits", "--root", str(root), "--epochs", "1", "--device", "cpu", "--seed", "3",
            "--val-size", "200"]
    assert bt.main(argv) == 0
    metrics = json.loads((root / "digits" / "base-mlp" / "metrics.json").read_text())
    assert metrics["val_size"] == 200 and metrics["seed"] == 3
    assert metrics["val_split"] == load_dataset("digits", val_size=200, seed=3).val_fingerprint()
    with pytest.raises(SystemExit) as info:  # argparse refuses an empty validation split
        bt.main(argv[:-1] + ["0"])
    assert info.value.code == 2 and "--val-size" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--dataset", "digitz"), ("--model", "base-mpl")])
def test_cli_unknown_name_exits_2(tmp_path, capsys, flag, value):
    argv = ["--dataset", "digits", "--model", "base-mlp", "--root", str(tmp_path), "--epochs", "1"]
    argv[argv.index(flag) + 1] = value
    assert bt.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and value in err
    assert not any(tmp_path.iterdir())


def test_training_f_removes_a_killed_writers_temporary_files(digits, tmp_path, one_thread, capsys):
    root = tmp_path / "models"
    folder = root / "digits" / "base-mlp"
    folder.mkdir(parents=True)
    left = [folder / "model.pt.a1b2c3.tmp", folder / "metrics.json.d4e5f6.tmp"]
    for tmp in left:
        tmp.write_bytes(b"half a file")
    bt.load_or_train("base-mlp", digits, root=str(root), device="cpu", epochs=1, progress=False)
    assert (folder / "model.pt").is_file() and not any(tmp.exists() for tmp in left)
    assert f"removed 2 temporary file(s) left in '{folder}'" in capsys.readouterr().err


def test_a_second_writer_of_f_waits_then_loads_what_the_first_wrote(digits, tmp_path, monkeypatch, one_thread):
    import threading

    from util.lock import FolderLock

    root = tmp_path / "models"
    weights = root / "digits" / "base-mlp" / "model.pt"
    first = bt.load_or_train("base-mlp", digits, root=str(tmp_path / "elsewhere"), device="cpu", epochs=1,
                             progress=False)
    weights.parent.mkdir(parents=True)
    lock = FolderLock(weights.parent).acquire("base model folder")  # the first writer, mid-training

    def finish():
        bt.save_base_model(first, {"dataset": "digits"}, weights)
        lock.release()

    timer = threading.Timer(1.5, finish)
    timer.start()
    monkeypatch.setattr(bt, "train_base_model", lambda *a, **k: pytest.fail("trained F a second time"))
    got = bt.load_or_train("base-mlp", digits, root=str(root), device="cpu", epochs=1, progress=False)
    timer.join()
    assert all(torch.equal(got.state_dict()[k], v) for k, v in first.state_dict().items())


def test_base_models_fit_refuses_a_folder_another_process_writes(digits, tmp_path, capsys):
    from util.lock import FolderLock

    folder = tmp_path / "models" / "digits" / "base-mlp"
    folder.mkdir(parents=True)
    with FolderLock(folder).acquire("base model folder"):
        code = bt.main(["--dataset", "digits", "--root", str(tmp_path / "models"), "--epochs", "1", "--force"])
    assert code == 2
    err = capsys.readouterr().err
    assert "base model folder" in err and str(folder) in err and "one writer" in err
    assert not (folder / "model.pt").exists()
