"""The MLP coders' widths: the default is the original architecture, 'hidden' changes it."""
import pytest

from coders.mlp import MLPDecoder, MLPEncoder
from tests.test_engine import make_run
from util.errors import ConfigError


def shapes(module):
    return [tuple(p.shape) for p in module.parameters()]


def test_default_widths_are_the_original_architecture():
    assert shapes(MLPEncoder(2, 1, [-1, 1, 28, 28])) == [(1568, 1568), (1568,), (784, 1568), (784,)]
    assert shapes(MLPDecoder(2, 1, [-1, 10])) == [(30, 30), (30,), (20, 30), (20,), (20, 20), (20,)]


def test_hidden_sets_the_widths_of_the_hidden_layers_only():
    assert shapes(MLPEncoder(2, 1, [-1, 1, 28, 28], hidden=100)) == [(100, 1568), (100,), (784, 100), (784,)]
    assert shapes(MLPDecoder(2, 1, [-1, 10], hidden=64)) == [(64, 30), (64,), (64, 64), (64,), (20, 64), (20,)]


@pytest.mark.parametrize("bad", [0, -3, 2.5, "wide", True])
def test_a_bad_width_is_a_config_error_naming_the_coder(digits_config, bad):
    pair = ["coders.mlp.MLPEncoder", {"class": "coders.mlp.MLPDecoder", "args": {"hidden": bad}}]
    with pytest.raises(ConfigError, match="MLPDecoder.*'hidden' must be a positive integer"):
        make_run(digits_config(enc_dec_types=[pair]))


def test_a_wide_decoder_trains_in_its_own_folder(digits_config):
    pair = ["coders.mlp.MLPEncoder", {"class": "coders.mlp.MLPDecoder", "args": {"hidden": 48}}]
    run = make_run(digits_config(num_epoch=1, enc_dec_types=[pair]))
    rows = run.fit()
    assert run.folder.name == "MLPDecoder-hidden48" and (run.folder / "best.pt").is_file()
    assert shapes(run.decoder)[0] == (48, 30) and rows[-1]["epoch"] == 1
