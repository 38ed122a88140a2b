"""torchrun: one run on two CPU processes (gloo) gives the weights and metrics of one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.cli import main

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds",)


def torchrun(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", str(config), *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=600)


def run_folders(save_dir: Path) -> dict:
    return {str(f.parent.relative_to(save_dir)): f.parent for f in sorted(Path(save_dir).rglob("metrics.jsonl"))}


def rows(folder: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same(one: Path, two: Path) -> None:
    """Run by run: same metrics rows (to float tolerance) and the same encoder and decoder weights."""
    a, b = run_folders(one), run_folders(two)
    assert sorted(a) == sorted(b) and len(a) == 2
    for name in a:
        ra, rb = rows(a[name]), rows(b[name])
        assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
        for x, y in zip(ra, rb):
            assert x.keys() == y.keys()
            for key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (name, x["epoch"], key)
        sa, sb = (torch.load(f[name] / "current.pt", weights_only=True) for f in (a, b))
        assert sa["epoch"] == sb["epoch"]
        for module in ("encoder", "decoder"):
            for key, value in sa[module].items():
                torch.testing.assert_close(sb[module][key], value, rtol=1e-4, atol=1e-6)
        # the optimizer's state too (SGD's momentum): the next epochs go on the same way
        for i, state in sa["optimizer"]["state"].items():
            torch.testing.assert_close(sb["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"],
                                       rtol=1e-4, atol=1e-6)


@pytest.fixture
def two_runs(digits_config, tmp_path):
    """A sweep of two runs (k = 2, 3); 33 groups a step, so steps and the last one split unevenly over two ranks.
    SGD with momentum: its step follows the gradient's size (Adam's would hide a gradient summed instead
    of averaged, and amplifies rounding where a gradient is near zero)."""
    sgd = {"class": "torch.optim.SGD", "args": {"lr": 0.002, "momentum": 0.9}}
    return digits_config(num_epoch=1, k_vals=[2, 3], batch_size=33, num_threads=1, optimizer=sgd,
                         save_dir=str(tmp_path / "one"))


def test_two_processes_equal_one_and_resume(two_runs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([str(two_runs)]) == 0
    proc = torchrun(two_runs, "--set", f"save_dir={json.dumps(str(two))}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(one, two)
    # rank 0 alone prints: each run's header and epoch lines once
    assert proc.stdout.count("== digits") == 2 and proc.stdout.count("epoch 1/1 |") == 2

    # --resume on two processes continues both runs as one process does
    assert main([str(two_runs), "--resume", "--set", "num_epoch=2"]) == 0
    proc = torchrun(two_runs, "--resume", "--set", "num_epoch=2", "--set", f"save_dir={json.dumps(str(two))}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("epoch 2/2 |") == 2 and "epoch 1/2 |" not in proc.stdout
    assert_same(one, two)


def test_bad_input_under_torchrun_exits_2(digits_config, tmp_path):
    """Every rank runs the preflight: a bad key ends each with the one-paragraph message and exit 2."""
    cfg = digits_config(num_epoch=1, batch_size=0, save_dir=str(tmp_path / "bad"))
    env = {k: v for k, v in os.environ.items()}
    env.update(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    proc = subprocess.run([sys.executable, "train.py", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2 and "batch_size" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_share_and_weights_cover_the_batch(monkeypatch):
    """Each rank's share is contiguous, the shares tile the batch and the weights sum to one."""
    from train import distributed

    parts = []
    for rank in range(3):
        g = distributed.Group.__new__(distributed.Group)
        g.rank, g.world = rank, 3
        parts.append(g.share(31))
    assert [p.part.start for p in parts] == [0, 10, 20] and parts[-1].part.stop == 31
    assert sum(p.weight for p in parts) == pytest.approx(1.0)
    assert [p.part.stop - p.part.start for p in parts] == [10, 10, 11]
