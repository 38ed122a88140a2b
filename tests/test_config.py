import json
from pathlib import Path

import pytest

from train.cli import main
from coders.config import expand_runs, load_config, validate_dict
from train.preflight import preflight
from util.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "conf").glob("*.json"))

BASE = {
    "num_epoch": 1, "k_vals": [2], "enc_dec_types": [["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]],
    "datasets": ["digits"], "models": ["base-mlp"], "losses": ["torch.nn.MSELoss"],
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    runs = expand_runs(cfg)
    assert runs
    preflight(cfg, runs)


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"digits_learned.json", "mnist_learned.json"} <= names


def test_readme_block_is_accepted_as_written():
    cfg = validate_dict({**BASE, "num_epoch": 500, "k_vals": [2, 3, 4], "datasets": ["mnist"],
                         "train_encoder": True, "train_parity_model": False, "train_decoder": True})
    assert [r.k for r in expand_runs(cfg)] == [2, 3, 4]
    assert cfg.batch_size == 64 and cfg.r_vals == [1]
    assert cfg.optimizer == {"class": "torch.optim.Adam", "args": {"lr": 1e-3, "weight_decay": 1e-5}}


def test_every_combination_runs_into_its_own_folder():
    cfg = validate_dict({**BASE, "k_vals": [2, 3], "r_vals": [1, 2], "losses": ["mse", "xent"]})
    runs = expand_runs(cfg)
    assert len(runs) == 8
    folders = {r.folder("save") for r in runs}
    assert len(folders) == 8
    assert Path("save/digits/base-mlp/k3/r2/xent/MLPEncoder/MLPDecoder") in folders


@pytest.mark.parametrize("bad,needle", [
    ({"num_epochs": 3}, "Did you mean 'num_epoch'"),
    ({"k_vals": 2}, "'k_vals' must be a list of integers"),
    ({"k_vals": [0]}, "'k_vals'"),
    ({"train_encoder": "yes"}, "'train_encoder' must be true or false"),
    ({"batch_size": 0}, "'batch_size'"),
    ({"enc_dec_types": [["coders.mlp.MLPEncoder"]]}, "[encoder, decoder] pairs"),
    ({"parity_model_init": "copy"}, "'parity_model_init'"),
    ({"optimizer": {"klass": "torch.optim.SGD"}}, "'optimizer'"),
    ({"seed": -1}, "'seed' must be an integer from 0"),
    ({"seed": 2 ** 64}, "'seed' must be an integer from 0"),
    ({"seeds": []}, "'seeds' must list distinct integers"),
    ({"seeds": [1, 1]}, "'seeds' must list distinct integers"),
    ({"seeds": [0, -2]}, "'seeds' must list distinct integers"),
    ({"seeds": 3}, "'seeds' must be a list of integers or null"),
    ({"save_dir": ""}, "'save_dir' must name a folder"),
    ({"base_model_dir": "  "}, "'base_model_dir' must name a folder"),
])
def test_bad_values_name_the_key(bad, needle):
    with pytest.raises(ConfigError) as err:
        validate_dict({**BASE, **bad})
    assert needle in str(err.value)


def test_missing_required_key():
    raw = dict(BASE)
    del raw["losses"]
    with pytest.raises(ConfigError, match="losses"):
        validate_dict(raw)


@pytest.mark.parametrize("bad,needle", [
    ({"enc_dec_types": [["coders.mlp.MLPEncodr", "coders.mlp.MLPDecoder"]]}, "Did you mean 'coders.mlp.MLPEncoder'"),
    ({"enc_dec_types": [["nosuchpkg.Enc", "coders.mlp.MLPDecoder"]]}, "could not import module 'nosuchpkg'"),
    ({"losses": ["torch.nn.MSELos"]}, "'losses'"),
    ({"models": ["resnet19"]}, "'models'"),
    ({"datasets": ["mnistt"]}, "'datasets'"),
    ({"optimizer": {"class": "torch.optim.Adam", "args": {"lrr": 0.1}}}, "'optimizer'"),
    ({"enc_dec_types": [["coders.summation.AdditionEncoder", "coders.summation.SubtractionDecoder"]],
      "r_vals": [2]}, "r=2"),
    ({"enc_dec_types": [["coders.image.ConcatenationEncoder", "coders.summation.SubtractionDecoder"]],
      "k_vals": [5]}, "k=5"),
    ({"base_model_file": "/nonexistent/model.pt"}, "'base_model_file'"),
    ({"enc_dec_types": [[{"class": "coders.mlp.MLPEncoder", "args": {"width": 3}}, "coders.mlp.MLPDecoder"]]},
     "'enc_dec_types'"),
    ({"models": [{"class": "base-mlp", "args": {"depth": 3}}]}, "'models'"),
    ({"losses": [{"class": "mse", "args": {"bogus": 1}}]}, "'losses'"),
    ({"losses": ["torch.nn.ReLU"]}, "torch.nn.ReLU is not usable as a loss"),
    ({"losses": [{"class": "mse", "args": {"reduction": "none"}}]}, "must return one differentiable number"),
])
def test_preflight_catches_problems_before_work(bad, needle):
    cfg = validate_dict({**BASE, **bad})
    with pytest.raises(ConfigError) as err:
        preflight(cfg, expand_runs(cfg))
    assert needle in str(err.value)


def test_cli_bad_config_exits_2_without_traceback(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**BASE, "k_val": [2]}))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'k_val'" in err and "Did you mean 'k_vals'" in err
    assert "Traceback" not in err


def test_cli_invalid_json_and_missing_file(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text("{\"num_epoch\": 1,,}")
    assert main([str(path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main([str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_data_stops_the_sweep_before_the_first_run(tmp_path, capsys):
    path = tmp_path / "c.json"
    empty = tmp_path / "empty"
    empty.mkdir()
    path.write_text(json.dumps({**BASE, "datasets": ["digits", "mnist"], "data_dir": str(empty),
                                "download": False, "save_dir": str(tmp_path / "save")}))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert str(empty / "MNIST" / "raw") in err and "Traceback" not in err
    assert not (tmp_path / "save").exists(), "no run started"


def test_every_shipped_loss_passes_the_probe():
    cfg = validate_dict({**BASE, "losses": ["mse", "kl", "xent", "torch.nn.L1Loss", "torch.nn.NLLLoss",
                                            "torch.nn.SmoothL1Loss", "torch.nn.MultiMarginLoss"]})
    preflight(cfg, expand_runs(cfg))


def test_a_sum_code_with_more_inputs_than_training_images_is_refused(tmp_path, base_model_dir):
    from train.engine import CodedRun

    cfg = validate_dict({**BASE, "k_vals": [1400], "save_dir": str(tmp_path), "base_model_dir": str(base_model_dir),
                         "enc_dec_types": [["coders.summation.AdditionEncoder", "coders.summation.SubtractionDecoder"]],
                         "train_encoder": False, "train_decoder": False, "train_parity_model": True})
    with pytest.raises(ConfigError, match=r"k=1400 needs at least k training images.*digits has 1318"):
        CodedRun(cfg, expand_runs(cfg)[0])


def test_a_code_too_big_for_memory_is_refused_before_allocation(monkeypatch):
    import train.preflight as pf

    monkeypatch.setattr(pf, "memory_bytes", lambda: 10 * 2 ** 20)  # a 10 MiB machine
    small = validate_dict(BASE)  # k=2 on digits: about 17,000 coder parameters, 0.3 MB with Adam's state
    preflight(small, expand_runs(small))
    big = validate_dict({**BASE, "k_vals": [20]})  # 1.7 million parameters, 28 MB with Adam's state
    with pytest.raises(ConfigError, match=r"'k_vals': the run with k=20, r=1.*coder parameters.*needs about "
                                          r".*more than the 10.0 MiB this machine has available. Fix: lower k_vals"):
        preflight(big, expand_runs(big))


def test_a_folder_as_base_model_file_is_refused_up_front(tmp_path):
    (tmp_path / "mnist" / "base-mlp").mkdir(parents=True)  # the anchor folder passed instead of its model.t7
    cfg = validate_dict({**BASE, "base_model_file": str(tmp_path / "mnist")})
    with pytest.raises(ConfigError, match=r"'base_model_file'.*is a folder.*holds: base-mlp"):
        preflight(cfg, expand_runs(cfg))


def test_a_key_given_twice_is_refused_not_silently_overridden(tmp_path):
    path = tmp_path / "twice.json"
    path.write_text('{"num_epoch": 1, "num_epoch": 5}')
    with pytest.raises(ConfigError, match="'num_epoch' more than once"):
        load_config(path)
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps(BASE)[:-1] + ', "optimizer": {"class": "torch.optim.SGD", '
                      '"args": {"lr": 0.1, "lr": 0.2}}}')
    with pytest.raises(ConfigError, match="'lr' more than once"):
        load_config(nested)


def test_specs_differing_only_in_args_get_their_own_run_folders():
    from coders.config import expand_runs, validate_dict

    plain = ["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]
    wide = ["coders.mlp.MLPEncoder", {"class": "coders.mlp.MLPDecoder", "args": {"hidden": 256}}]
    cfg = validate_dict({"num_epoch": 1, "k_vals": [2], "enc_dec_types": [plain, wide], "datasets": ["digits"],
                         "models": ["base-mlp"], "losses": ["mse"]})
    folders = [spec.folder(cfg.save_dir) for spec in expand_runs(cfg)]
    assert folders[0].name == "MLPDecoder" and folders[1].name == "MLPDecoder-hidden256"


def test_a_run_listed_twice_is_refused_before_anything_runs():
    from coders.config import validate_dict

    pair = ["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]
    with pytest.raises(ConfigError, match="same run folder.*list each value once"):
        validate_dict({"num_epoch": 1, "k_vals": [2, 2], "enc_dec_types": [pair], "datasets": ["digits"],
                       "models": ["base-mlp"], "losses": ["mse"]})
