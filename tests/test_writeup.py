"""The original write-ups' encoder and config, pasted as a user's own module beside a config, train.

The write-up shows an MLP encoder in a file of its own that imports
``coders.coder`` and ``util.util.get_flattened_dim``, and a config naming it in
``enc_dec_types`` next to the keys num_epoch, k_vals, datasets, models, losses,
train_encoder, train_parity_model and train_decoder. Its code lines stand
below unchanged (its comments left out); only the dataset, k and the epoch
count of the config are made small enough for a test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

WRITEUP_ENCODER = '''\
from torch import nn

from coders.coder import Encoder, Decoder
from util.util import get_flattened_dim


class MLPEncoder(Encoder):
    def __init__(self, ec_k, ec_r, in_dim):
        super().__init__(ec_k, ec_r, in_dim)
        self.inout_dim = get_flattened_dim(in_dim)
        self.nn = nn.Sequential(
            nn.Linear(in_features=ec_k * self.inout_dim,
                      out_features=ec_k * self.inout_dim),
            nn.ReLU(),
            nn.Linear(in_features=ec_k * self.inout_dim,
                      out_features=ec_r * self.inout_dim)
        )

    def forward(self, in_data):
        val = in_data.view(in_data.size(0), -1)
        out = self.nn(val)
        return out.view(out.size(0), self.ec_r, self.inout_dim)
'''


def test_the_writeups_encoder_module_trains_beside_its_config(digits_config, tmp_path):
    (tmp_path / "writeup_coders.py").write_text(WRITEUP_ENCODER)
    # The write-up's block of keys, with the encoder its snippet defines; the rest runs it small.
    path = digits_config(num_epoch=1, k_vals=[2], enc_dec_types=[["writeup_coders.MLPEncoder", "coders.mlp.MLPDecoder"]],
                         datasets=["digits"], models=["base-mlp"], losses=["torch.nn.MSELoss"], train_encoder=True,
                         train_parity_model=False, train_decoder=True, num_threads=1)
    proc = subprocess.run([sys.executable, "train.py", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (ckpt,) = (tmp_path / "save").rglob("current.pt")
    assert ckpt.parent.parts[-2:] == ("MLPEncoder", "MLPDecoder")
    assert json.loads((ckpt.parent / "config.json").read_text())["encoder"] == "writeup_coders.MLPEncoder"
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1
    d = 8 * 8  # digits: one 8x8 channel, as get_flattened_dim([-1, 1, 8, 8]) says
    assert state["encoder"]["nn.2.weight"].shape == (1 * d, 2 * d)
