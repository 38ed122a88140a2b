"""util.report: the table lists every run at its best validation epoch; errors exit 2; plots are PNGs."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from util import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def table_rows(table: str) -> list[list[str]]:
    """Data rows of a markdown table as lists of stripped cells (header and rule dropped)."""
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def header(table: str) -> list[str]:
    return [c.strip() for c in table.splitlines()[0].strip("|").split("|")]


def run_report(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = report.main(argv, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def write_run(folder: Path, rows: list[dict], **config) -> Path:
    """A run folder by hand: config.json with the run's choices and metrics.jsonl with ``rows``."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"dataset": "digits", "model": "base-mlp", "k": 2, "r": 1, "loss": "torch.nn.MSELoss",
           "encoder": "coders.mlp.MLPEncoder", "decoder": "coders.mlp.MLPDecoder", **config}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def epoch_row(epoch: int, val_recon: float, test_recon: float, test_degraded: float, base: float = 0.95) -> dict:
    row = {"epoch": epoch, "seconds": 1.0, "val_recon_acc": val_recon, "val_degraded_acc": val_recon - 0.01,
           "val_base_acc": base, "test_recon_acc": test_recon, "test_degraded_acc": test_degraded,
           "test_base_acc": base}
    if epoch > 0:
        row.update(train_loss=1.0, train_recon_acc=0.5)
    return row


def expected_best(rows: list[dict]) -> dict:
    """Best validation epoch, computed independently of util.report: first strict maximum in epoch order."""
    best = None
    for row in sorted(rows, key=lambda r: r["epoch"]):
        if best is None or row["val_recon_acc"] > best["val_recon_acc"]:
            best = row
    return best


def test_report_lists_every_run_of_a_real_sweep(digits_config, tmp_path):
    from train.cli import run_all

    config = digits_config(k_vals=[2, 3], num_epoch=2)
    run_all(str(config), {}, out=io.StringIO())
    save_dir = tmp_path / "save"
    folders = sorted(p.parent for p in save_dir.rglob("metrics.jsonl"))
    assert len(folders) == 2

    code, out, err = run_report([str(save_dir), "--no-plots", "--out", str(tmp_path / "table.md")])
    assert code == 0, err
    assert (tmp_path / "table.md").read_text() == out
    cols = header(out)
    rows = table_rows(out)
    assert len(rows) == 2
    by_k = {r[cols.index("k")]: r for r in rows}
    assert set(by_k) == {"2", "3"}
    for folder in folders:
        cfg = json.loads((folder / "config.json").read_text())
        metrics = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
        best = expected_best(metrics)
        row = dict(zip(cols, by_k[str(cfg["k"])]))
        assert row["dataset"] == "digits" and row["base model"] == "base-mlp"
        assert (row["loss"], row["encoder"], row["decoder"]) == ("MSELoss", "MLPEncoder", "MLPDecoder")
        assert row["epochs run"] == "2"
        assert row["best epoch"] == str(best["epoch"])
        assert row["F test acc (%)"] == f"{100 * best['test_base_acc']:.2f}"
        assert row["test recon acc (%)"] == f"{100 * best['test_recon_acc']:.2f}"
        assert row["test degraded acc (%)"] == f"{100 * best['test_degraded_acc']:.2f}"
        lost = 100 * (best["test_base_acc"] - best["test_degraded_acc"])
        assert float(row["accuracy lost vs F (points)"]) == pytest.approx(lost, abs=0.006)


def test_report_uses_best_validation_epoch_not_last(tmp_path):
    rows = [epoch_row(0, 0.10, 0.11, 0.12), epoch_row(1, 0.80, 0.70, 0.60),
            epoch_row(2, 0.80, 0.71, 0.61), epoch_row(3, 0.50, 0.90, 0.90)]
    folder = write_run(tmp_path / "save" / "run", rows)

    summary = report.summarize_run(folder)
    assert summary["best_epoch"] == 1  # epochs 1 and 2 tie on validation: the earliest wins
    assert summary["epochs_run"] == 3
    assert summary["test_recon_acc"] == pytest.approx(0.70)
    assert summary["acc_lost"] == pytest.approx(0.95 - 0.60)

    code, out, _ = run_report([str(tmp_path / "save"), "--no-plots"])
    assert code == 0
    row = dict(zip(header(out), table_rows(out)[0]))
    assert row["best epoch"] == "1"
    assert row["test recon acc (%)"] == "70.00"
    assert row["test degraded acc (%)"] == "60.00"
    assert row["accuracy lost vs F (points)"] == "35.00"
    assert row["F test acc (%)"] == "95.00"


def test_seconds_per_epoch_is_the_median_training_epoch(tmp_path):
    rows = [epoch_row(e, 0.5, 0.5, 0.5) for e in range(4)]
    for row, seconds in zip(rows, (40.0, 3.0, 9.0, 4.0)):  # epoch 0 only evaluates: left out
        row["seconds"] = seconds
    write_run(tmp_path / "save" / "run", rows)
    write_run(tmp_path / "save" / "untrained", [epoch_row(0, 0.3, 0.3, 0.3)], encoder="coders.berrut.BerrutEncoder")
    code, out, _ = run_report([str(tmp_path / "save"), "--no-plots"])
    assert code == 0
    by_encoder = {r["encoder"]: r for r in (dict(zip(header(out), cells)) for cells in table_rows(out))}
    assert by_encoder["MLPEncoder"]["s / epoch"] == "4.0"
    assert by_encoder["BerrutEncoder"]["s / epoch"] == "n/a"


def test_rows_sorted_with_k_as_a_number(tmp_path):
    save = tmp_path / "save"
    for k, enc in ((10, "B"), (2, "B"), (2, "A"), (3, "A")):
        write_run(save / f"k{k}{enc}", [epoch_row(0, 0.1, 0.1, 0.1)], k=k, encoder=f"pkg.{enc}Enc")
    code, out, _ = run_report([str(save), "--no-plots"])
    assert code == 0
    cols = header(out)
    order = [(r[cols.index("k")], r[cols.index("encoder")]) for r in table_rows(out)]
    assert order == [("2", "AEnc"), ("2", "BEnc"), ("3", "AEnc"), ("10", "BEnc")]


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_no_runs_exits_2_with_message(tmp_path, make):
    save = tmp_path / "save"
    if make == "empty":
        (save / "digits").mkdir(parents=True)
    code, out, err = run_report([str(save)])
    assert code == 2
    assert out == ""
    assert str(save) in err and "error:" in err and "Traceback" not in err


def test_corrupt_metrics_skipped_with_warning(tmp_path):
    save = tmp_path / "save"
    write_run(save / "good", [epoch_row(0, 0.2, 0.3, 0.4)])
    bad = write_run(save / "bad", [], k=3)
    broken = write_run(save / "broken", [], k=4)
    # A damaged line before the last (a cut last line is only an append in progress: read up to it).
    (broken / "metrics.jsonl").write_text('{"epoch": 0, "val_recon_acc": 0.1}\n{"epoch": 1, "val_re\n{"epoch": 2}\n')
    code, out, err = run_report([str(save), "--no-plots"])
    assert code == 0
    assert len(table_rows(out)) == 1 and table_rows(out)[0][header(out).index("k")] == "2"
    assert f"warning: skipping {bad}" in err
    assert f"warning: skipping {broken}" in err

    # Only unreadable runs: still a clear exit 2, not an empty table.
    (save / "good" / "metrics.jsonl").write_text("")
    code, out, err = run_report([str(save), "--no-plots"])
    assert code == 2 and out == "" and "unreadable" in err


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    save = tmp_path / "save"
    rows = [epoch_row(e, 0.1 * e, 0.1, 0.1) for e in range(3)]
    write_run(save / "a", rows)
    write_run(save / "b", rows, encoder="coders.conv.ConvEncoder")
    write_run(save / "c", rows, k=3)
    code, _, err = run_report([str(save), "--plots", str(tmp_path / "plots")])
    assert code == 0, err
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["digits_base-mlp_k2_r1.png", "digits_base-mlp_k3_r1.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC

    # Default folder: SAVE_DIR/plots; and a second report does not mistake it for a run.
    code, out, _ = run_report([str(save)])
    assert code == 0 and len(table_rows(out)) == 3
    assert len(list((save / "plots").glob("*.png"))) == 2


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    save = tmp_path / "save"
    write_run(save / "a", [epoch_row(0, 0.1, 0.1, 0.1)])
    code, out, err = run_report([str(save), "--plots", str(tmp_path / "plots")])
    assert code == 0 and len(table_rows(out)) == 1
    assert "matplotlib is not installed" in err
    assert not (tmp_path / "plots").exists()


def test_a_seed_sweep_is_one_row_of_mean_and_std_and_each_seed_lists_them(tmp_path):
    import statistics

    sweep = tmp_path / "save" / "digits" / "base-mlp" / "k2" / "r1" / "MSELoss" / "MLPEncoder" / "MLPDecoder"
    tests = {0: (0.90, 0.85), 1: (0.80, 0.70), 2: (0.95, 0.90)}  # seed: (test recon, test degraded)
    for seed, (recon, degraded) in tests.items():
        # The best validation epoch is 1 for seeds 0 and 2, 2 for seed 1; epoch 2 of seeds 0/2 must not count.
        rows = [epoch_row(0, 0.1, 0.1, 0.1), epoch_row(1, 0.6 if seed != 1 else 0.4, recon, degraded),
                epoch_row(2, 0.5 if seed != 1 else 0.6, 0.0 if seed != 1 else recon, 0.0 if seed != 1 else degraded)]
        write_run(sweep / f"seed{seed}", rows, run_seed=seed)
    write_run(tmp_path / "save" / "other", [epoch_row(0, 0.2, 0.3, 0.25), epoch_row(1, 0.4, 0.5, 0.45)],
              encoder="coders.conv.ConvEncoder")  # not part of a sweep: its own row, no std

    code, out, err = run_report([str(tmp_path / "save"), "--no-plots"])
    assert code == 0, err
    cols = header(out)
    rows = {r[cols.index("encoder")]: r for r in table_rows(out)}
    assert len(rows) == 2 and cols[cols.index("decoder") + 1] == "seeds"
    merged = rows["MLPEncoder"]
    assert merged[cols.index("seeds")] == "3"
    for col, values in (("test recon acc (%)", [v[0] for v in tests.values()]),
                        ("test degraded acc (%)", [v[1] for v in tests.values()]),
                        ("accuracy lost vs F (points)", [0.95 - v[1] for v in tests.values()])):
        mean, std = merged[cols.index(col)].split(" ± ")
        assert float(mean) == pytest.approx(100 * statistics.fmean(values), abs=0.006)
        assert float(std) == pytest.approx(100 * statistics.stdev(values), abs=0.006)
    assert merged[cols.index("F test acc (%)")] == "95.00"
    assert merged[cols.index("best epoch")] == "1-2"
    assert rows["ConvEncoder"][cols.index("seeds")] == "1"
    assert "±" not in rows["ConvEncoder"][cols.index("test recon acc (%)")]

    code, out, err = run_report([str(tmp_path / "save"), "--no-plots", "--each-seed"])
    assert code == 0, err
    cols = header(out)
    listed = [r for r in table_rows(out) if r[cols.index("encoder")] == "MLPEncoder"]
    assert [r[cols.index("seed")] for r in listed] == ["0", "1", "2"]
    for r, (recon, _) in zip(listed, tests.values()):
        assert r[cols.index("test recon acc (%)")] == f"{100 * recon:.2f}"


def test_a_plain_run_in_the_folder_above_its_seed_sweep_is_not_one_of_the_seeds(tmp_path):
    # The same choices run once without 'seeds' (folder X) and then with seeds 0 and 1 (X/seed0, X/seed1).
    plain = tmp_path / "save" / "digits" / "base-mlp" / "k2" / "r1" / "MSELoss" / "MLPEncoder" / "MLPDecoder"
    write_run(plain, [epoch_row(0, 0.1, 0.1, 0.1), epoch_row(1, 0.5, 0.20, 0.20)])
    for seed, recon in ((0, 0.80), (1, 0.90)):
        write_run(plain / f"seed{seed}", [epoch_row(0, 0.1, 0.1, 0.1), epoch_row(1, 0.5, recon, recon)], run_seed=seed)

    code, out, err = run_report([str(tmp_path / "save"), "--no-plots"])
    assert code == 0, err
    cols = header(out)
    rows = sorted(table_rows(out), key=lambda r: r[cols.index("seeds")])
    assert [r[cols.index("seeds")] for r in rows] == ["1", "2"]
    assert rows[0][cols.index("test recon acc (%)")] == "20.00"
    assert rows[1][cols.index("test recon acc (%)")].split(" ± ")[0] == "85.00"


def write_both_forms(save: Path) -> None:
    """A systematic run and two seeds of an N-worker run (K = 3, N = 5, S = 1) under one save_dir."""
    write_run(save / "sys", [epoch_row(0, 0.5, 0.5, 0.4), epoch_row(1, 0.7, 0.6, 0.55)])
    nworker = dict(form="nworker", k=3, r=None, n_workers=5, stragglers=1, encoder="coders.nworker.BerrutEncoder",
                   decoder="coders.nworker.BerrutDecoder")
    for seed, (acc, mse) in enumerate(((0.80, 0.02), (0.90, 0.04))):
        rows = [{**epoch_row(0, acc, acc, acc), "test_mse": mse, "test_nmse": 2 * mse, "test_rel_l2": 0.1}]
        write_run(save / "nw" / f"seed{seed}", rows, run_seed=seed, **nworker)


def test_one_report_prints_both_forms_tables_and_one_form_on_request(tmp_path):
    """A save_dir holding both forms: the systematic table, then the N-worker one (K, N, S, errors,
    seeds merged); --form keeps one of them; a form the folder lacks is an exit-2 error."""
    write_both_forms(tmp_path / "save")
    code, out, err = run_report([str(tmp_path / "save"), "--no-plots"])
    assert code == 0, err
    systematic, nworker = out.split("\n\n")
    assert "| k | r |" in systematic.splitlines()[0] and len(table_rows(systematic)) == 1
    row = dict(zip(header(nworker), table_rows(nworker)[0]))
    assert (row["K"], row["N"], row["S"], row["seeds"]) == ("3", "5", "1", "2")
    assert row["test acc, all K answers (%)"] == "85.00 ± 7.07" and row["test MSE"].startswith("0.03 ±")

    code, only, _ = run_report([str(tmp_path / "save"), "--no-plots", "--form", "nworker"])
    assert code == 0 and only == nworker
    code, only, _ = run_report([str(tmp_path / "save"), "--no-plots", "--form", "systematic"])
    assert code == 0 and only == systematic + "\n"  # the one table, with the newline that ends it
    write_run(tmp_path / "just_sys" / "run", [epoch_row(0, 0.5, 0.5, 0.4)])
    code, out, err = run_report([str(tmp_path / "just_sys"), "--no-plots"])
    assert code == 0 and "| K |" not in out and len(table_rows(out)) == 1
    code, out, err = run_report([str(tmp_path / "just_sys"), "--no-plots", "--form", "nworker"])
    assert code == 2 and out == "" and "no nworker runs under" in err and "--form" in err


def test_the_report_command_under_its_old_name_prints_both_forms_tables(tmp_path):
    """``python -m util.report`` (the old name) is ``python -m train.report``: the same two tables."""
    import os
    import subprocess

    write_both_forms(tmp_path / "save")
    _, both, _ = run_report([str(tmp_path / "save"), "--no-plots"])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    old = subprocess.run([sys.executable, "-m", "util.report", str(tmp_path / "save"), "--no-plots"], cwd=root,
                         capture_output=True, text=True, env=env)
    assert old.returncode == 0, old.stderr
    assert old.stdout == both and "| k | r |" in both and "| K | N | S |" in both


def test_train_nworker_is_the_one_report_of_the_nworker_runs(tmp_path, capsys):
    """``python -m train.nworker ROOT`` (the old name) prints util.report's N-worker table, nothing else."""
    from train import nworker

    write_both_forms(tmp_path / "save")
    _, nworker_table, _ = run_report([str(tmp_path / "save"), "--no-plots", "--form", "nworker"])
    assert nworker.main([str(tmp_path / "save")]) == 0
    assert capsys.readouterr().out == nworker_table
    assert nworker.results_table(tmp_path / "save") == nworker_table.splitlines()
    assert nworker.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_nworker_by_n_averages_seeds_and_shows_the_lam_of_lowest_validation_mse(tmp_path, capsys):
    """``--by-n``: one row per (dataset, K, S, family), a column per N; seeds averaged; of two lams the one
    of lower mean validation MSE, whatever its test error; a half-written last line is not read."""
    from train import nworker

    base = dict(form="nworker", k=3, r=None, stragglers=1, loss="mse")

    def run(name, n, nmse, val=0.1, decoder="coders.nworker.BerrutDecoder", encoder="coders.nworker.BerrutEncoder",
            **extra):
        rows = [{"epoch": 0, "val_mse": val, "test_nmse": nmse}]
        folder = write_run(tmp_path / "save" / name, rows, n_workers=n, encoder=encoder, decoder=decoder, **base,
                           **extra)
        return folder

    run("b5s0", 5, 0.1, run_seed=0)
    run("b5s1", 5, 0.3, run_seed=1)
    run("b9", 9, 0.05)
    spline = dict(encoder="coders.spline.SplineEncoder")
    run("lam_big", 5, 0.2, val=0.5, decoder={"class": "coders.spline.SplineDecoder", "args": {"lam": 0.1}}, **spline)
    cut = run("lam_small", 5, 0.4, val=0.2, decoder={"class": "coders.spline.SplineDecoder", "args": {"lam": 0.01}},
              **spline)
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 1, "val_mse": 0.0')  # a kill mid-append: not a row, not an error
    assert nworker.main([str(tmp_path / "save"), "--by-n"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| dataset | K | S | code | N = 5 | N = 9 |"
    rows = {line.split("|")[4].strip(): [c.strip() for c in line.strip("|").split("|")[4:]] for line in out[2:]}
    assert rows["BerrutEncoder"] == ["0.2 ± 0.14 (2 seeds)", "0.05"]
    assert rows["SplineEncoder"] == ["0.4 (lam 0.01)", ""]
