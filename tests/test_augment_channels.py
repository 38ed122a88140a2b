"""Batched augmentation, channel folding for multi-channel images, and user datasets by class path."""
import json

import torch
import torch.nn.functional as F

from train.augment import random_crop_flip
from train.cli import run_all
from coders.config import expand_runs, load_config
from train.engine import CodedRun


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    x = torch.randn(16, 3, 8, 8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        candidates = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates), i
    assert not torch.equal(out, x), "some image moved"


def test_random_crop_flip_follows_the_generator():
    x = torch.randn(8, 1, 6, 6)
    a = random_crop_flip(x, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, torch.Generator().manual_seed(3))
    c = random_crop_flip(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


RGB_MODULE = (
    "import torch\n"
    "def rgb(data_dir, download):\n"
    "    g = torch.Generator().manual_seed(0)\n"
    "    y = torch.randint(0, 4, (400,), generator=g)\n"
    "    x = torch.rand(400, 3, 8, 8, generator=g) * 0.2\n"
    "    x[torch.arange(400), y % 3] += 0.8  # the class shows in one colour channel\n"
    "    x[:, :, : 4] += (y >= 3).float().view(-1, 1, 1, 1) * 0.5\n"
    "    return x[:300], y[:300], x[300:], y[300:], 4\n"
)


def rgb_config(digits_config, tmp_path, **overrides):
    (tmp_path / "my_data.py").write_text(RGB_MODULE)
    return digits_config(datasets=["my_data.rgb"], **overrides)


def test_channels_are_encoded_across_the_k_inputs(digits_config, tmp_path):
    cfg = load_config(rgb_config(digits_config, tmp_path, enc_dec_types=[
        ["coders.summation.AdditionEncoder", "coders.summation.SubtractionDecoder"]]))
    run = CodedRun(cfg, expand_runs(cfg)[0])
    x = torch.randn(5, 2, 3, 8, 8)
    parities = run.encode(x)
    assert parities.shape == (5, 1, 3, 8, 8)
    assert torch.allclose(parities[:, 0], x.sum(1)), "channel c of the parity sums channel c of the inputs"


def test_conv_encoder_on_colour_images_with_augmentation_trains(digits_config, tmp_path):
    path = rgb_config(digits_config, tmp_path, models=["lenet5"], num_epoch=3, augment=True,
                      enc_dec_types=[["coders.conv.ConvEncoder", "coders.mlp.MLPDecoder"]])
    rows = run_all(str(path), {})[0]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["train_loss"] < rows[1]["train_loss"], "the code learns on augmented colour groups"
    saved = json.loads(next((tmp_path / "save").rglob("config.json")).read_text())
    assert saved["dataset"] == "my_data.rgb" and saved["augment"] is True
