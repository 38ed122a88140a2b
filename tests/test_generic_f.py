"""Any F: functions named by class path, domains instead of datasets, error metrics, vector inputs."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import load_data, load_dataset
from datasets.domains import DomainSpec, sample_domain
from train.cli import main, run_all
from coders.code import Code
from train.metrics import Tally, error_metrics, output_variance
from util import report
from util.shapes import coder_in_dim

ROOT = Path(__file__).resolve().parents[1]

DOMAIN = {"sampler": "uniform", "shape": [1], "low": -3.0, "high": 3.0, "n_train": 512, "n_val": 128, "n_test": 128}


@pytest.fixture
def function_config(tmp_path):
    """Write a small x * sin(x) config with ``overrides`` (no dataset anywhere on disk) and return its path."""

    def make(**overrides) -> Path:
        cfg = {
            "num_epoch": 2,
            "k_vals": [2],
            "enc_dec_types": [[{"class": "coders.mlp.MLPEncoder", "args": {"hidden": 32}},
                               {"class": "coders.mlp.MLPDecoder", "args": {"hidden": 32}}]],
            "datasets": ["interval"],
            "domains": {"interval": DOMAIN},
            "models": ["base_models.functions.x_sin_x"],
            "losses": ["mse"],
            "batch_size": 32,
            "optimizer": {"class": "torch.optim.Adam", "args": {"lr": 0.003}},
            "data_dir": str(tmp_path / "no-data"),
            "download": False,
            "save_dir": str(tmp_path / "save"),
            "base_model_dir": str(tmp_path / "base"),
            "device": "cpu",
            "progress": False,
            "num_threads": 1,
        }
        cfg.update(overrides)
        path = tmp_path / "config.json"
        path.write_text(json.dumps(cfg))
        return path

    return make


def _numbers(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


# ---------------------------------------------------------------- metrics


def test_error_metrics_on_known_tensors():
    target = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
    rebuilt = torch.tensor([[1.0, 0.0], [4.0, -2.0]])
    # squared errors 0, 4, 1, 0: MSE 5/4; |target|^2 = 1 + 4 + 9 + 4 = 18; relative L2 sqrt(5/18)
    # variance over the two rows: coordinate 0 values 1, 3 -> 1; coordinate 1 values 2, -2 -> 4; mean 2.5
    assert output_variance(target) == pytest.approx(2.5)
    got = error_metrics(rebuilt, target, output_variance(target))
    assert got["mse"] == pytest.approx(1.25)
    assert got["rel_l2"] == pytest.approx(math.sqrt(5 / 18))
    assert got["nmse"] == pytest.approx(1.25 / 2.5)
    mean = target.mean(0, keepdim=True).expand_as(target)  # answering F's mean output scores NMSE 1
    assert error_metrics(mean, target, output_variance(target))["nmse"] == pytest.approx(1.0)


def test_tally_sums_the_errors_of_every_batch_and_prints_no_accuracy_without_classes():
    gen = torch.Generator().manual_seed(0)
    tally = Tally(classify=False)
    parts = [(torch.randn(m, 3, generator=gen), torch.randn(m, 3, generator=gen)) for m in (5, 11)]
    for rebuilt, target in parts:
        tally.add(rebuilt, target, None, torch.tensor(0.5))
    rebuilt, target = (torch.cat(t) for t in zip(*parts))
    res = tally.result("val", None, 2.0)
    expected = error_metrics(rebuilt, target, 2.0)
    for key in ("mse", "nmse", "rel_l2"):
        assert res[f"val_{key}"] == pytest.approx(expected[key], rel=1e-5)
    assert res["val_loss"] == pytest.approx(0.5)
    assert not any("acc" in key or "top5" in key for key in res)


# ---------------------------------------------------------------- domains


def test_domain_draws_are_seeded_disjoint_and_inside_the_box():
    spec = DomainSpec(**{**DOMAIN, "shape": [2], "low": [0, -1], "high": [1, 0]})
    a, b, c = (sample_domain("d", spec, seed) for seed in (3, 3, 4))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_x, b.test_x)
    assert not torch.equal(a.train_x, c.train_x)
    assert (len(a.train_x), len(a.val_x), len(a.test_x)) == (512, 128, 128)
    rows = torch.cat([a.train_x, a.val_x, a.test_x])
    assert len(torch.unique(rows, dim=0)) == len(rows), "a point shared by two draws"
    assert bool((rows[:, 0] >= 0).all() and (rows[:, 0] <= 1).all() and (rows[:, 1] >= -1).all()
                and (rows[:, 1] <= 0).all())
    assert a.num_classes is None and a.train_y.shape == (512, 0)


def test_file_and_dataset_samplers(tmp_path):
    data = np.random.default_rng(0).normal(size=(100, 2, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    s = sample_domain("f", DomainSpec(sampler="file", path=str(tmp_path / "x.npy"), n_val=10, n_test=20), seed=1)
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (70, 10, 20)
    rows = torch.cat([s.train_x, s.val_x, s.test_x])
    assert torch.equal(rows.flatten(1).sort(0).values, torch.from_numpy(data).flatten(1).sort(0).values)
    digits = load_dataset("digits", seed=2)
    d = load_data("pixels", seed=2, domains={"pixels": {"sampler": "dataset", "dataset": "digits"}})
    assert torch.equal(d.train_x, digits.train_x) and torch.equal(d.test_x, digits.test_x)
    assert d.num_classes is None and d.train_y.shape == (len(d.train_x), 0)


# ---------------------------------------------------------------- vector inputs through the code


def test_vector_inputs_are_encoded_as_they_are_and_other_shapes_by_channel():
    from coders.mlp import MLPDecoder, MLPEncoder
    from base_models.functions import FunctionModel, x_sin_x

    k, r, d = 3, 2, 5
    enc = MLPEncoder(k, r, coder_in_dim((d,)), hidden=16)
    code = Code(FunctionModel(x_sin_x), enc, MLPDecoder(k, r, [-1, d], hidden=16), None, k, r)
    x = torch.randn(4, k, d)
    assert torch.equal(code.encode(x), enc(x))  # (B, k, D) -> (B, r, D), no channel folding
    assert coder_in_dim((3, 8, 8)) == [-1, 3, 8, 8] and coder_in_dim((2, 4, 5)) == [-1, 2, 4, 5]
    assert coder_in_dim((2, 7)) == [-1, 2, 1, 7]
    enc2 = MLPEncoder(k, r, coder_in_dim((2, 7)), hidden=16)  # a (C, L) input: C channels of L values
    x2 = torch.randn(4, k, 2, 7)
    out = Code(FunctionModel(x_sin_x), enc2, MLPDecoder(k, r, [-1, 14], hidden=16), None, k, r).encode(x2)
    assert out.shape == (4, r, 2, 7)
    assert torch.equal(out[:, :, 1], enc2(x2[:, :, 1]))  # channel 1 encoded across the k inputs alone


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One x * sin(x) run of 3 epochs (no dataset on disk), and its printed lines."""
    tmp = tmp_path_factory.mktemp("xsinx")
    cfg = {"num_epoch": 3, "k_vals": [2],
           "enc_dec_types": [[{"class": "coders.mlp.MLPEncoder", "args": {"hidden": 32}},
                              {"class": "coders.mlp.MLPDecoder", "args": {"hidden": 32}}]],
           "datasets": ["interval"], "domains": {"interval": DOMAIN}, "models": ["base_models.functions.x_sin_x"],
           "losses": ["mse"], "batch_size": 32, "optimizer": {"class": "torch.optim.Adam", "args": {"lr": 0.003}},
           "data_dir": str(tmp / "no-data"), "download": False, "save_dir": str(tmp / "save"),
           "base_model_dir": str(tmp / "base"), "device": "cpu", "progress": False, "num_threads": 1}
    path = tmp / "c.json"
    path.write_text(json.dumps(cfg))
    out = io.StringIO()
    rows = run_all(str(path), {}, out=out)[0]
    return tmp, path, rows, out.getvalue()


def test_a_function_on_a_domain_trains_end_to_end_with_no_dataset_on_disk(trained):
    tmp, _, rows, printed = trained
    assert not (tmp / "no-data").exists() and not (tmp / "base").exists()  # nothing read, no F weights
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        assert {"val_mse", "val_nmse", "val_rel_l2", "test_mse", "test_nmse", "test_rel_l2"} <= set(row)
        assert not any("acc" in key or "top5" in key for key in row)
    assert rows[-1]["val_mse"] < 0.8 * rows[0]["val_mse"], "training did not lower the error of rebuilt outputs"
    folder = next((tmp / "save").rglob("metrics.csv")).parent
    assert folder.relative_to(tmp / "save").parts[:2] == ("interval", "x_sin_x")
    header = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "val_nmse" in header and not any("acc" in c for c in header)
    epoch_lines = [ln for ln in printed.splitlines() if ln.startswith("epoch ")]
    assert len(epoch_lines) == 4 and all("nmse" in ln and "%" not in ln for ln in epoch_lines)
    assert json.loads((folder / "config.json").read_text())["task"] == "regression"


def test_report_prints_error_columns_and_no_accuracy_for_a_function(trained):
    tmp, _, rows, _ = trained
    out, err = io.StringIO(), io.StringIO()
    assert report.main([str(tmp / "save"), "--plots", str(tmp / "plots")], out=out, err=err) == 0, err.getvalue()
    table = out.getvalue()
    head = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert {"test MSE", "test NMSE", "test rel. L2"} <= set(head)
    assert not any("acc" in c for c in head)
    cells = dict(zip(head, (c.strip() for c in table.splitlines()[2].strip("|").split("|"))))
    best = min(rows, key=lambda r: (r["val_mse"], r["epoch"]))
    assert cells["best epoch"] == str(best["epoch"])
    assert cells["test NMSE"] == f"{best['test_nmse']:.4g}"
    assert len(list((tmp / "plots").glob("*.png"))) == 1


def test_f_stays_frozen_and_the_encoder_learns_through_it(tmp_path):
    """A regression network F (trained on first use on the bundled diabetes set) keeps its weights."""
    from coders.config import expand_runs, load_config
    from train.engine import CodedRun

    path = tmp_path / "c.json"
    path.write_text(json.dumps({
        "num_epoch": 1, "k_vals": [2], "enc_dec_types": [["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]],
        "datasets": ["diabetes"], "models": ["base_models.tabular.TabularMLP"], "losses": ["mse"],
        "base_model_epochs": 3,
        "save_dir": str(tmp_path / "save"), "base_model_dir": str(tmp_path / "base"), "device": "cpu",
        "progress": False}))
    cfg = load_config(path)
    run = CodedRun(cfg, expand_runs(cfg)[0])
    assert run.task == "regression" and run.n_out == 1 and run.in_shape == (10,)
    before = {k: v.clone() for k, v in run.base.state_dict().items()}
    run.train_mode(True)
    run.step(torch.arange(32).view(16, 2), Tally(classify=False))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in run.encoder.parameters())
    run.fit(overwrite=True)
    assert all(not p.requires_grad and p.grad is None for p in run.base.parameters())
    saved = torch.load(tmp_path / "base" / "diabetes" / "TabularMLP" / "model.pt")
    for key, value in run.base.state_dict().items():
        assert torch.equal(value, before[key]) and torch.equal(value, saved[key]), key
    assert not run.base.training


def test_resume_reproduces_an_uninterrupted_run(function_config, tmp_path):
    full = run_all(str(function_config(num_epoch=3, save_dir=str(tmp_path / "a"))), {}, out=io.StringIO())[0]
    path = function_config(num_epoch=1, save_dir=str(tmp_path / "b"))
    run_all(str(path), {}, out=io.StringIO())
    resumed = run_all(str(path), {"num_epoch": 3}, resume=True, out=io.StringIO())[0]
    assert _numbers(resumed) == _numbers(full)


def test_a_killed_process_resumes_to_the_same_numbers(function_config, killed_and_resumed):
    full, resumed = killed_and_resumed(function_config, num_epoch=5)
    assert [r["epoch"] for r in resumed] == list(range(6))
    assert resumed == full


# ---------------------------------------------------------------- bad input: exit 2, one paragraph, no work

BAD_FUNCS = '''
import torch


def batch_sum(x):
    return x.sum()


def log_of(x):
    return torch.log(x)
'''


@pytest.mark.parametrize("change, needles", [
    ({"domains": {"interval": {**DOMAIN, "sampler": "unifrom"}}}, ["'domains'", "unknown sampler", "uniform"]),
    ({"domains": {"interval": {**DOMAIN, "shape": [0]}}}, ["'domains'", "'shape'"]),
    ({"domains": {"interval": {**DOMAIN, "shape": "1"}}}, ["'shape'", "list"]),
    ({"domains": {"interval": {**DOMAIN, "low": [0, 1]}}}, ["'domains'", "'low'", "broadcast"]),
    ({"domains": {"interval": {"sampler": "file", "path": "nowhere/x.npy"}}}, ["'domains'", "nowhere/x.npy",
                                                                              "does not exist"]),
    ({"domains": {"interval": {"sampler": "file", "path": "FILE", "shape": [2]}}}, ["'domains'", "'shape'", "[1]"]),
    ({"domains": {"interval": {**DOMAIN, "mean": 1.0}}}, ["'domains'", "does not read 'mean'"]),
    ({"models": ["my_funcs.batch_sum"]}, ["'models'", "batch_sum", "shape"]),
    ({"models": ["my_funcs.log_of"]}, ["'models'", "log_of", "NaN or infinite", "'domains'"]),
    ({"losses": ["xent"]}, ["'losses'", "class labels"]),
    ({"task": "classification"}, ["'task'", "interval"]),
    ({"train_parity_model": True}, ["'parity_model'", "no parameters"]),
])
def test_a_bad_domain_or_function_exits_2_naming_the_key_before_any_work(function_config, tmp_path, capsys,
                                                                        change, needles):
    (tmp_path / "my_funcs.py").write_text(BAD_FUNCS)
    np.save(tmp_path / "ones.npy", np.ones((40, 1), dtype=np.float32))
    text = json.dumps(change).replace('"FILE"', json.dumps(str(tmp_path / "ones.npy")))
    path = function_config(**json.loads(text))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    message = err.strip()
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in err, err
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / "save").exists(), "work started"


def test_generic_speed_benchmark_prints_seconds_per_epoch_and_the_load(function_config, capsys):
    from bench import generic_speed

    assert generic_speed.main([str(function_config()), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "load average" in out and "cores" in out
    row = next(ln for ln in out.splitlines() if ln.startswith(str(function_config())[:20]))
    cells = row.split()
    assert cells[1] == "x_sin_x" and int(cells[-4]) == 512  # k = 2 shuffles of the 512 inputs, 256 groups each
    assert float(cells[-3]) > 0 and float(cells[-2]) > 0
