"""The shipped CIFAR-10 configs end to end on a miniature CIFAR-10 written by the test (no GPU, no download)."""
import json
import math
from pathlib import Path

import pytest

from test_datasets import write_cifar
from train.cli import run_all

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def miniature(tmp_path_factory):
    """One miniature CIFAR-10 and one F folder for both configs: the first trains the ResNet-18 F (one epoch),
    the second finds it there, as a sweep's second run does."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root / "data", "cifar10")
    return root


@pytest.mark.parametrize("config", ["cifar10_learned.json", "cifar10_concat.json"])
def test_cifar10_config_runs_on_miniature_cifar(tmp_path, miniature, config):
    cfg = json.loads((ROOT / "conf" / config).read_text())
    cfg.update(num_epoch=1, k_vals=[2], data_dir=str(miniature / "data"), download=False, val_size=10,
               batch_size=8, base_model_epochs=1, base_model_dir=str(miniature / "f"),
               save_dir=str(tmp_path / "save"), device="cpu", progress=False)
    path = tmp_path / config
    path.write_text(json.dumps(cfg))
    rows = run_all(str(path), {})[0]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert math.isfinite(rows[1]["train_loss"]) and 0 <= rows[1]["val_recon_acc"] <= 1
    assert (miniature / "f" / "cifar10" / "resnet18" / "model.pt").is_file()
    saved = json.loads(next((tmp_path / "save").rglob("config.json")).read_text())
    assert saved["augment"] is True and saved["dataset"] == "cifar10", "CIFAR is augmented by default"
