"""train.py --ray: a sweep as Ray tasks gives the sequential sweep's numbers, run by run, even when a worker dies."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train.cli import main
from train.ray_sweep import KILL_ENV

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds",)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, base_model_dir):
    """A digits sweep of four runs (k = 2, 3 x seeds 0, 1), and its numbers from the sequential command."""
    root = tmp_path_factory.mktemp("ray_sweep")
    cfg = {"num_epoch": 2, "k_vals": [2, 3], "seeds": [0, 1], "datasets": ["digits"], "models": ["base-mlp"],
           "enc_dec_types": [["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]], "losses": ["mse"],
           "batch_size": 32, "base_model_dir": str(base_model_dir), "device": "cpu", "progress": False,
           "num_threads": 1, "save_dir": str(root / "sequential")}
    path = root / "config.json"
    path.write_text(json.dumps(cfg))
    assert main([str(path)]) == 0
    return path, root, numbers(root / "sequential")


def numbers(save_dir: Path) -> dict:
    """metrics.jsonl rows of every run folder under ``save_dir`` without timing columns, by relative folder."""
    found = {}
    for f in sorted(Path(save_dir).rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        found[str(f.parent.relative_to(save_dir))] = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    return found


def test_ray_sweep_gives_the_sequential_numbers(local_ray, sweep, capsys):
    path, root, expected = sweep
    assert len(expected) == 4 and all(len(rows) == 3 for rows in expected.values())
    assert main([str(path), "--ray", "--set", f"save_dir={json.dumps(str(root / 'ray'))}"]) == 0
    out = capsys.readouterr().out
    assert numbers(root / "ray") == expected
    for i in range(1, 5):  # each run's lines carry its prefix: its header and one line per epoch 0..2
        mine = [line for line in out.splitlines() if line.startswith(f"[run {i}/4] ")]
        assert sum(" -> " in line for line in mine) == 1
        assert sum("epoch " in line and "/2 |" in line for line in mine) == 3
    # --list reads the folders the tasks wrote, as it does after a sequential sweep
    assert main([str(path), "--list", "--set", f"save_dir={json.dumps(str(root / 'ray'))}"]) == 0
    assert "4 runs: 4 done" in capsys.readouterr().out


def test_killed_worker_is_retried_and_resumes(local_ray, sweep, tmp_path, monkeypatch, capsys):
    """Every run's worker is SIGKILLed right after epoch 1; Ray retries it, it resumes from current.pt
    (epoch 1 is not trained again) and ends with the uninterrupted numbers."""
    path, root, expected = sweep
    monkeypatch.setenv(KILL_ENV, str(tmp_path / "kills"))
    save = tmp_path / "killed"
    assert main([str(path), "--ray", "--set", f"save_dir={json.dumps(str(save))}", "--set", "k_vals=[3]"]) == 0
    out = capsys.readouterr().out
    assert len(list((tmp_path / "kills").glob("run*.killed"))) == 2  # both workers died once
    got = numbers(save)
    assert got == {k: v for k, v in expected.items() if "/k3/" in f"/{k}/"} and len(got) == 2
    for i in (1, 2):
        mine = [line for line in out.splitlines() if line.startswith(f"[run {i}/2] ")]
        assert any("attempt 2" in line and "resuming" in line for line in mine)
        # the retry trains epoch 2 only: its epoch-1 line (if the dead worker's got out) is printed once
        assert sum(line.split("] ", 1)[1].startswith("epoch 2/2") for line in mine) == 1


@pytest.mark.parametrize("args, named", [(["--ray", "--set", "batch_size=0"], "batch_size"),
                                         (["--ray", "127.0.0.1:1"], "--ray 127.0.0.1:1")])
def test_ray_bad_input_exits_2_before_submitting(sweep, tmp_path, args, named):
    """A bad key (the preflight's paragraph) or an address where no Ray answers stops --ray with
    exit 2 before anything is submitted or written."""
    path, _, _ = sweep
    proc = subprocess.run([sys.executable, "train.py", str(path), *args,
                           "--set", f"save_dir={json.dumps(str(tmp_path / 'bad'))}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert named in proc.stderr and "Traceback" not in proc.stderr
    assert "submitted" not in proc.stdout and not (tmp_path / "bad").exists()
