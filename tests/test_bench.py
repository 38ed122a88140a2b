"""The speed benchmark runs end to end and prints every figure it promises (no timing is asserted)."""
from __future__ import annotations

import re

from bench import speed


def test_speed_benchmark_prints_every_setup_and_the_inference_table(data_dir, anchor_dir, capsys):
    weights = anchor_dir / "mnist" / "base-mlp" / "model.t7"
    code = speed.main(["--quick", "--steps", "2", "--data-dir", str(data_dir), "--device", "cpu",
                       "--base-model-file", str(weights)])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"dense fp32 matmul \(2048\^3\): [\d.]+ GFLOP/s; memory copy: [\d.]+ GB/s", out)
    for name in speed.SETUPS:
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        cells = re.split(r"\s{2,}", line.strip())
        groups, seconds, per_s, vs_original, gflop = cells[1:6]
        assert int(groups) == (27500 if "disjoint" in name else 55000)
        assert float(seconds) > 0 and float(gflop) > 0
        assert abs(float(per_s) - int(groups) / float(seconds)) <= 0.01 * float(per_s)  # s/epoch is rounded
        assert vs_original.endswith("x") and float(vs_original[:-1]) > 0
    for model in ("base-mlp", "resnet18"):
        row = next(ln for ln in out.splitlines() if ln.startswith(model + " "))
        assert float(row.split()[-1]) > 0  # (E+D)/F


def test_speed_benchmark_reports_a_bad_weights_path_as_one_error(data_dir, anchor_dir, capsys):
    code = speed.main(["--quick", "--steps", "1", "--only", "train", "--data-dir", str(data_dir), "--device", "cpu",
                       "--base-model-file", str(anchor_dir / "mnist")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "is a folder" in err and "Traceback" not in err
