"""A trained code outside the trainer: coders/code.py's Code, loaded from a run folder."""
import json
from pathlib import Path

import pytest
import torch

from train.cli import run_all
from coders.code import load_code
from coders.config import expand_runs, load_config, load_run_folder
from train.engine import CodedRun, eval_groups
from train.metrics import Tally
from coders.scenarios import gather_unavailable, unavailable_data
from util.errors import UserError

CODES = {
    "learned": dict(enc_dec_types=[["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]]),
    "concat-parity-model": dict(enc_dec_types=[["coders.image.ConcatenationEncoder", "coders.summation.SubtractionDecoder"]],
                                train_encoder=False, train_decoder=False, train_parity_model=True),
    "mds-r2-parity-models": dict(enc_dec_types=[["coders.mds.MDSEncoder", "coders.mds.MDSDecoder"]], r_vals=[2],
                                 train_encoder=False, train_decoder=False, train_parity_model=True),
    "berrut-untrained": dict(enc_dec_types=[["coders.berrut.BerrutEncoder", "coders.berrut.BerrutDecoder"]],
                             k_vals=[3], r_vals=[2], num_epoch=0, train_encoder=False, train_decoder=False),
}


def trained_folder(digits_config, overrides) -> Path:
    path = digits_config(**{"num_epoch": 2, **overrides})
    run_all(str(path), {}, out=open("/dev/null", "w"))
    return next(Path(load_config(path).save_dir).rglob("best.pt")).parent


def best_row(folder: Path) -> dict:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return max(rows, key=lambda r: (r["val_recon_acc"], -r["epoch"]))


@pytest.mark.parametrize("name", CODES)
def test_loaded_code_reproduces_the_logged_test_accuracy(digits_config, name):
    folder = trained_folder(digits_config, CODES[name])
    loaded = load_code(folder)
    code, splits = loaded.code, loaded.splits
    x, y = splits.test_x, splits.test_y
    with torch.no_grad():
        fx = code.base(x)
        groups = eval_groups(len(x), code.k, "cpu")
        recon, _ = code.forward_groups(x[groups], fx[groups])
    unavailable = unavailable_data(code.scenarios, code.k)
    tally = Tally()
    tally.add(gather_unavailable(recon, unavailable), gather_unavailable(fx[groups], unavailable, shared=True),
              gather_unavailable(y[groups], unavailable, shared=True), torch.zeros(()))
    got = tally.result("test", 0.0)
    row = best_row(folder)
    assert loaded.epoch == row["epoch"]
    assert got["test_recon_acc"] == pytest.approx(row["test_recon_acc"], abs=1e-6)
    assert got["test_degraded_acc"] == pytest.approx(row["test_degraded_acc"], abs=1e-6)


def test_loaded_code_equals_the_trainers_code_at_its_best_checkpoint(digits_config):
    folder = trained_folder(digits_config, CODES["learned"])
    loaded = load_code(folder).code
    cfg, _ = load_run_folder(folder)
    run = CodedRun(cfg, expand_runs(cfg)[0], folder)
    run.load_state(folder / "best.pt")
    x = torch.rand(5, 2, 1, 8, 8)
    available = torch.tensor([[False, True, True]] * 5)
    assert torch.equal(loaded(x, available), run.code(x, available))


def test_forward_keeps_available_outputs_and_decodes_the_rest_from_zeroed_inputs(digits_config):
    code = load_code(trained_folder(digits_config, CODES["learned"])).code
    x = torch.rand(4, 2, 1, 8, 8)
    available = torch.tensor([[True, False, True], [False, True, True], [True, True, False], [False, True, True]])
    out = code(x, available)
    with torch.no_grad():
        fx = code.base(x.flatten(0, 1)).view(4, 2, -1)
        fp = code.parity_outputs(code.encode(x))
        outputs = torch.cat([fx, fp], 1)
        garbage = outputs + 1000.0 * ~available.unsqueeze(-1)  # what an unavailable slot holds must not matter
        recon = code.decode(garbage, available)
        by_hand = code.decoder(outputs * available.unsqueeze(-1))
    assert torch.equal(recon, by_hand)
    for b in range(4):
        for j in range(2):
            expected = fx[b, j] if available[b, j] else by_hand[b, j]
            assert torch.equal(out[b, j], expected)
    assert not torch.equal(by_hand[0, 1], fx[0, 1])  # the decoder's answer is a reconstruction, not F's


def test_a_folder_without_a_checkpoint_is_a_user_error(digits_config, tmp_path):
    folder = trained_folder(digits_config, CODES["learned"])
    (folder / "best.pt").unlink()
    with pytest.raises(UserError, match="best.pt"):
        load_code(folder)
    with pytest.raises(UserError, match="config.json"):
        load_code(tmp_path)


def test_a_code_is_not_served_around_another_f(digits_config, tmp_path):
    folder = trained_folder(digits_config, CODES["learned"])
    f_file = Path(json.loads((folder / "config.json").read_text())["base_model_dir"]) / "digits/base-mlp/model.pt"
    other = tmp_path / "other_f.pt"
    weights = torch.load(f_file, weights_only=True)
    torch.save({k: v + 0.01 for k, v in weights.items()}, other)
    config = json.loads((folder / "config.json").read_text())
    config["base_model_file"] = str(other)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="other weights of F"):
        load_code(folder)


def test_the_logged_all_k_accuracy_counts_every_answer_of_every_group(digits_config):
    folder = trained_folder(digits_config, CODES["berrut-untrained"])
    loaded = load_code(folder)
    code, (x, y) = loaded.code, loaded.splits.split("test")
    groups = eval_groups(len(x), code.k, "cpu")
    correct = total = 0
    with torch.no_grad():
        for available in code.scenarios:
            served = code(x[groups], available.expand(len(groups), -1))
            correct += int((served.argmax(-1) == y[groups]).sum())
            total += served.shape[0] * served.shape[1]
    assert best_row(folder)["test_group_acc"] == pytest.approx(correct / total, abs=1e-6)
