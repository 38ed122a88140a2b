"""Nothing lost, nothing misleading: kills, concurrent writers and changed inputs, as a user meets them."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from train.cli import main, run_all
from util.lock import FolderLock, holder
from train.metrics import MetricsLog
from util.report import read_rows, summarize_run

ROOT = Path(__file__).resolve().parents[1]
RUN = "digits/base-mlp/k2/r1/MSELoss/MLPEncoder/MLPDecoder"

# Runs train.py's main in a fresh process and SIGKILLs it at its KILL_AT-th file-system write
# (open for writing, rename, delete) touching a metrics file: a kill at an exact point of the
# rewrite, whatever the implementation, with no hook in lcc itself.
KILLER = """
import os, signal, sys
kill_at, argv = int(sys.argv[1]), sys.argv[2:]
count = 0

def hook(event, args):
    global count
    if event == "open":
        path, mode, flags = args
        writes = any(c in (mode or "") for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR))
    elif event in ("os.rename", "os.remove"):
        path, writes = args[0], True
    else:
        return
    if writes and os.path.basename(str(path)).startswith("metrics."):
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

from train.cli import main
sys.addaudithook(hook)
sys.exit(main(argv))
"""


def _folder(cfg_path: Path) -> Path:
    return Path(json.loads(cfg_path.read_text())["save_dir"]) / RUN


def _numbers(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _csv_epochs(folder: Path) -> list[int]:
    lines = (folder / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,"), "the CSV keeps its header"
    return [int(line.split(",")[0]) for line in lines[1:]]


def test_a_resume_killed_while_rewriting_the_metrics_keeps_the_history(digits_config, tmp_path):
    whole = run_all(str(digits_config(num_epoch=2, save_dir=str(tmp_path / "whole"))), {})[0]
    path = digits_config(num_epoch=1)
    run_all(str(path), {})
    folder = _folder(path)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    # 1: the first write of the rewrite; 3: after one of the two files was rewritten, before the other.
    for kill_at in (1, 3):
        proc = subprocess.run([sys.executable, str(script), str(kill_at), str(path), "--resume", "--set",
                               "num_epoch=2", "--set", "num_threads=1"], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert [r["epoch"] for r in MetricsLog(folder).rows()] == [0, 1], f"killed at write {kill_at}"
        assert _csv_epochs(folder) == [0, 1]
    resumed = run_all(str(path), {"num_epoch": 2}, resume=True)[0]
    assert _numbers(resumed) == _numbers(whole)
    assert _csv_epochs(folder) == [0, 1, 2]
    assert not list(folder.glob("*.tmp")), "the next start removes what the killed writes left"


def test_a_metrics_file_cut_mid_line_is_read_up_to_its_last_whole_row(digits_config):
    path = digits_config(num_epoch=1)
    run_all(str(path), {})
    folder = _folder(path)
    with open(folder / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "val_recon_a')  # what a kill in the middle of an append leaves
    assert [r["epoch"] for r in MetricsLog(folder).rows()] == [0, 1]
    assert [r["epoch"] for r in read_rows(folder / "metrics.jsonl")] == [0, 1]
    assert summarize_run(folder)["epochs_run"] == 1
    rows = run_all(str(path), {"num_epoch": 2}, resume=True)[0]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_results_files_get_ordinary_permissions_and_stale_temporaries_go(digits_config, base_model_dir):
    path = digits_config(num_epoch=1)
    run_all(str(path), {})
    folder = _folder(path)
    umask = os.umask(0o022)
    os.umask(umask)
    for f in (folder / "current.pt", folder / "best.pt", folder / "config.json",
              base_model_dir / "digits/base-mlp/model.pt"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    left = folder / "current.pt.k3j_x8.tmp"
    left.write_bytes(b"half a checkpoint")
    run_all(str(path), {"num_epoch": 2}, resume=True)
    assert not left.exists()


def _wait_for_rows(log: Path, proc: subprocess.Popen, n: int) -> None:
    deadline = time.time() + 300
    while len(MetricsLog(log.parent).rows()) < n:
        assert proc.poll() is None, "the first writer stopped early"
        assert time.time() < deadline, "the first writer made no progress"
        time.sleep(0.05)


def test_a_run_folder_has_one_writer(digits_config, capsys):
    path = digits_config(num_epoch=400, num_threads=1)  # the first writer still runs when the others start
    folder = _folder(path)
    first = subprocess.Popen([sys.executable, "train.py", str(path)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_rows(folder / "metrics.jsonl", first, 1)
        for flags in (["--resume"], []):
            # A second writer (train.py's own entry point, in this process: the lock is the other process's)
            # refuses at once. One that waited for the lock would go on once the watchdog kills the first writer
            # after 120 s, and train: a failure, not a hang.
            capsys.readouterr()
            watchdog = threading.Timer(120, first.kill)
            watchdog.start()
            try:
                code = main([str(path), *flags])
            finally:
                watchdog.cancel()
            assert code == 2, (flags, capsys.readouterr().err[-2000:])
            err = capsys.readouterr().err
            assert f"in use by process {first.pid}" in err and "Traceback" not in err
        assert holder(folder) is not None
        assert "being written now" in run_all(str(path), {}, list_only=True)[0]
    finally:
        first.kill()  # SIGKILL: the kernel frees the lock however the holder dies
        first.wait()
    assert holder(folder) is None
    done = [r["epoch"] for r in MetricsLog(folder).rows()]
    rows = run_all(str(path), {"num_epoch": max(done) + 1, "num_threads": None}, resume=True)[0]
    assert [r["epoch"] for r in rows] == list(range(max(done) + 2)), "every epoch once: nobody interleaved"


def test_two_fresh_starts_at_once_only_one_trains(digits_config):
    path = digits_config(num_epoch=1, num_threads=1)
    procs = [subprocess.Popen([sys.executable, "train.py", str(path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(), p.stderr.read()) for p in procs)
    assert [code for code, _ in results] == [0, 2], results[1][1][-2000:]
    assert "Traceback" not in results[1][1]
    assert [r["epoch"] for r in MetricsLog(_folder(path)).rows()] == [0, 1]


def test_the_lock_names_its_holder_and_frees_on_release(tmp_path):
    lock = FolderLock(tmp_path / "run").acquire()
    assert f"process {os.getpid()}" in holder(tmp_path / "run")
    lock.release()
    assert holder(tmp_path / "run") is None
    with FolderLock(tmp_path / "run"):
        pass


def test_resume_refuses_a_swapped_f_or_other_data(digits_config, base_model_dir, tmp_path, capsys):
    run_all(str(digits_config(num_epoch=0, save_dir=str(tmp_path / "f"))), {})  # F exists from here on
    weights = tmp_path / "f.pt"
    weights.write_bytes((base_model_dir / "digits/base-mlp/model.pt").read_bytes())
    path = digits_config(num_epoch=1, base_model_file=str(weights))
    run_all(str(path), {})
    folder = _folder(path)
    before = (folder / "metrics.jsonl").read_text()

    state = torch.load(weights, weights_only=True)
    torch.save({k: v.flip(0) for k, v in state.items()}, weights)  # "retrained" in place
    capsys.readouterr()
    assert main([str(path), "--resume", "--set", "num_epoch=2"]) == 2
    err = capsys.readouterr().err
    assert "F's weights are not the ones the run started with" in err and str(weights.resolve()) in err
    assert "'base_model_file'" in err
    torch.save(state, weights)

    assert main([str(path), "--resume", "--set", "num_epoch=2", "--set", "val_size=200"]) == 2
    err = capsys.readouterr().err
    assert "'val_size' was null (the default), now 200" in err and "F's weights" not in err
    assert (folder / "metrics.jsonl").read_text() == before, "a refused resume writes nothing"

    # The same weights under another name, and another spelling of data_dir: the same run, so it goes on.
    moved = tmp_path / "elsewhere" / "f.pt"
    moved.parent.mkdir()
    weights.rename(moved)
    assert main([str(path), "--resume", "--set", "num_epoch=2", "--set", f"base_model_file=\"{moved}\"",
                 "--set", f"data_dir=\"{tmp_path}/x/../data\""]) == 0
    assert [r["epoch"] for r in MetricsLog(folder).rows()] == [0, 1, 2]


def test_resume_and_overwrite_together_are_refused(digits_config, capsys):
    assert main([str(digits_config()), "--resume", "--overwrite"]) == 2
    assert "pass one of the two" in capsys.readouterr().err


# -- every user error is exit 2, a paragraph, and comes before any run trains ---------------------------------------
ENCODER = "from coders.mlp import MLPEncoder\nclass Enc(MLPEncoder):\n"
DATASET = ("import torch\nfrom datasets.sources import digits as _digits\n"
           "def data(data_dir, download):\n    tx, ty, ex, ey, n = _digits(data_dir, download)\n")
MLP = [["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]]


@pytest.mark.parametrize("module, overrides, needles", [
    ("def broken(:\n", {"enc_dec_types": [["user_mod.Enc", "coders.mlp.MLPDecoder"]]},
     ["'enc_dec_types'", "SyntaxError", "user_mod.py"]),
    ("raise RuntimeError('no licence server')\n", {"losses": ["user_mod.Loss"]},
     ["'losses'", "RuntimeError: no licence server"]),
    (ENCODER + "    def forward(self, x):\n        if self.training:\n            return self.missing(x)\n"
     "        return super().forward(x)\n", {"enc_dec_types": MLP + [["user_mod.Enc", "coders.mlp.MLPDecoder"]]},
     ["'enc_dec_types'", "in training mode: AttributeError", "AttributeError"]),
    (ENCODER + "    def forward(self, x):\n        return super().forward(x)[:2]\n",
     {"enc_dec_types": MLP + [["user_mod.Enc", "coders.mlp.MLPDecoder"]]},
     ["'enc_dec_types'", "Enc returned (2, 1, 64)", "(3, 1, 64)"]),
    ("import torch\nclass Loss(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
     "        raise KeyError('weights')\n", {"losses": ["user_mod.Loss"]}, ["'losses'", "KeyError"]),
    ("import torch\nclass F(torch.nn.Module):\n    def __init__(self, in_shape, num_classes):\n        super().__init__()\n"
     "    def forward(self, x):\n        return x.nope()\n", {"models": ["user_mod.F"]}, ["'models'", "AttributeError"]),
    (DATASET + "    return tx, ty, ex, ey\n", {"datasets": ["user_mod.data"]}, ["'datasets'", "ValueError"]),
    (DATASET + "    return (tx * 255).to(torch.uint8), ty, ex, ey, n\n", {"datasets": ["user_mod.data"]},
     ["'datasets'", "torch.uint8"]),
    (DATASET + "    return tx, ty + 1, ex, ey, n\n", {"datasets": ["user_mod.data"]}, ["'datasets'", "labels from 1 to 10"]),
    ("", {"optimizer": "torch.optim.LBFGS"}, ["'optimizer'", "LBFGS"]),
    ("", {"optimizer": "torch.optim.SparseAdam"}, ["'optimizer'", "SparseAdam"]),
    ("", {"device": "meta"}, ["'device'", "meta"]),
    ("", {"device": "mps"}, ["'device'", "mps"]),
    ("", {"num_threads": 100000}, ["'num_threads'"]),
    ("", {"k_vals": [20], "r_vals": [20]}, ["C(40, 20) - 1 = 137,846,528,819", "GiB"]),
    ("", {"save_dir": "FILE"}, ["'save_dir'", "is a file"]),
    ("", {"base_model_dir": "FILE/sub"}, ["'base_model_dir'", "is a file"]),
])
def test_a_bad_component_or_setting_is_exit_2_before_anything_runs(digits_config, tmp_path, capsys, monkeypatch,
                                                                    module, overrides, needles):
    import datasets.splits

    monkeypatch.setattr(datasets.splits, "_CACHE", {})  # each case's user_mod.data is another function
    (tmp_path / "user_mod.py").write_text(module)
    (tmp_path / "FILE").write_text("not a folder")
    overrides = {k: (str(tmp_path / v) if k.endswith("_dir") else v) for k, v in overrides.items()}
    path = digits_config(**overrides)
    sys.modules.pop("user_mod", None)
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one paragraph, no traceback
    for needle in needles:
        assert needle in err
    assert not (tmp_path / "save").exists(), "nothing ran"


def test_f_giving_nan_is_named_as_the_cause(digits_config, base_model_dir, tmp_path, capsys):
    run_all(str(digits_config(num_epoch=0, save_dir=str(tmp_path / "f"))), {})  # F exists from here on
    state = torch.load(base_model_dir / "digits/base-mlp/model.pt", weights_only=True)
    weights = tmp_path / "nan.pt"
    torch.save({k: torch.full_like(v, float("nan")) for k, v in state.items()}, weights)
    assert main([str(digits_config(base_model_file=str(weights)))]) == 2
    err = capsys.readouterr().err
    assert "F (" in err and "NaN" in err and str(weights) in err and "learning rate" not in err
    assert not (tmp_path / "save").exists()


# -- the other commands ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, named", [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--device", "meta"], "--device"),
    (["--root", str(Path(__file__).resolve().parents[1] / "README.md")], "--root"),
])
def test_base_model_trainer_refuses_bad_flags_before_training(flags, named, capsys):
    from base_models.fit import main as train_f

    try:
        code = train_f(["--dataset", "digits", "--force", "--epochs", "1", *flags])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err


def test_report_refuses_an_out_folder_and_a_plots_file(tmp_path):
    import io

    from util.report import main as report

    err = io.StringIO()
    assert report([str(tmp_path), "--out", str(tmp_path)], out=io.StringIO(), err=err) == 2
    assert "--out" in err.getvalue() and "is a folder" in err.getvalue()
    (tmp_path / "file").write_text("x")
    err = io.StringIO()
    assert report([str(tmp_path), "--plots", str(tmp_path / "file")], out=io.StringIO(), err=err) == 2
    assert "--plots" in err.getvalue()


def test_speed_benchmark_names_its_flags_and_checks_paths_first(tmp_path, capsys):
    from bench.speed import main as speed

    assert speed(["--quick", "--base-model-file", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert "--base-model-file" in err and "Config key" not in err
    assert speed(["--quick", "--device", "meta"]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "Config key" not in err


def test_an_explicit_weights_file_that_is_not_weights_is_named_without_suggesting_deletion(digits_config, tmp_path,
                                                                                         capsys):
    from train.cli import main as train_main

    bogus = tmp_path / "weights.pt"
    bogus.write_text("not a state dict")
    assert train_main([str(digits_config(base_model_file=str(bogus)))]) == 2
    err = capsys.readouterr().err
    assert str(bogus) in err and "base_model_file" in err and "delete" not in err and "Traceback" not in err
