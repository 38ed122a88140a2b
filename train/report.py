"""Summarise a sweep: one markdown table over every run folder, plus validation curves.

``python -m train.report SAVE_DIR [--plots DIR] [--out FILE] [--no-plots] [--each-seed] [--form FORM]``
(its old name ``python -m util.report`` is the same command: this report moved beside the training it reports)

A run folder is any folder under SAVE_DIR holding ``metrics.jsonl`` and
``config.json`` (what :class:`train.engine.CodedRun` writes). Each run is
reported at its *best validation epoch* -- the highest validation
reconstruction accuracy, the earliest on ties -- because that is the epoch
``best.pt`` holds; the last epoch may have overfit. The runs of a ``seeds``
sweep become one row of mean ± standard deviation (``--each-seed`` lists
them one by one).

Runs of an F without classes (a function on a domain, a regression network:
metrics rows without accuracies) get a table of their own with the errors of
the rebuilt outputs (MSE, normalised MSE, relative L2) and no accuracy column;
their best validation epoch is the one of lowest validation MSE.

Each code form (coders/form.py) gets tables of its own, in the order of :data:`coders.form.FORMS`, with the
columns its form gives (:meth:`coders.form.CodeForm.columns`): N-worker runs (docs/nworker.md) show K, N
and S in place of k and r, the rebuilt outputs' errors, and a classifier scored (as the run picks its best
epoch) by the accuracy of all K answers over every straggler pattern (ApproxIFER's). ``--form`` keeps one
form's tables (``python -m train.nworker SAVE_DIR`` is ``--form nworker --no-plots``).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from coders.form import FORMS as CODE_FORMS
from coders.form import form_named, form_of_record
from util.classpath import spec_name
from util.errors import EXIT_USER_ERROR
from util.files import unwritable

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
FORMS = tuple(CODE_FORMS)  # the code forms, in the order their tables are printed
SIZE_KEYS = tuple(dict.fromkeys(key for form in CODE_FORMS.values() for key in form.sizes))  # r, n_workers, ...

# (row key, column header, kind); kind "pct" prints a 0..1 fraction as a percentage, "num" 4 digits.
_RUN = [  # what the run is, and how far it got: every table starts with these
    ("dataset", "dataset", "str"),
    ("model", "base model", "str"),
    ("k", "k", "str"),
    ("r", "r", "str"),
    ("loss", "loss", "str"),
    ("encoder", "encoder", "str"),
    ("decoder", "decoder", "str"),
    ("epochs_run", "epochs run", "str"),
    ("best_epoch", "best epoch", "str"),
]
_SECONDS = [("epoch_seconds", "s / epoch", "sec")]
COLUMNS = _RUN[:2] + [("f_test_acc", "F test acc (%)", "pct")] + _RUN[2:] + [
    ("test_recon_acc", "test recon acc (%)", "pct"),
    ("test_degraded_acc", "test degraded acc (%)", "pct"),
    ("test_group_acc", "test all-k acc (%)", "pct"),
    ("acc_lost", "accuracy lost vs F (points)", "pct"),
] + _SECONDS
# The table of runs whose F has no classes: errors of the rebuilt outputs only.
REGRESSION_COLUMNS = _RUN + [
    ("test_mse", "test MSE", "num"),
    ("test_nmse", "test NMSE", "num"),
    ("test_rel_l2", "test rel. L2", "num"),
] + _SECONDS


class RunReadError(ValueError):
    """A run folder whose metrics or config cannot be used; the report skips it."""


def find_runs(save_dir: str | Path) -> list[Path]:
    """Every folder under ``save_dir`` (itself included) holding both metrics.jsonl and config.json, sorted."""
    root = Path(save_dir)
    return sorted(p.parent for p in root.rglob(METRICS_FILE) if (p.parent / CONFIG_FILE).is_file())


def whole_lines(text: str) -> list[str]:
    """The lines of ``text``, less a last one that lacks its newline and is not a whole JSON
    object: what a write cut short by a kill leaves."""
    lines = text.split("\n")
    last = lines.pop()  # "" when the text ends with a newline
    if last.strip():
        try:
            if isinstance(json.loads(last), dict):
                lines.append(last)
        except json.JSONDecodeError:
            pass
    return lines


def read_rows(path: Path) -> list[dict]:
    """The epoch rows of a metrics.jsonl up to its last whole line; :class:`RunReadError` if it is
    empty or a line before the last is not a JSON row."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise RunReadError(f"cannot read {path.name}: {exc}") from None
    rows = []
    # A file being appended to, or cut by a kill mid-append, ends in half a line: read up to the last whole row.
    for n, line in enumerate(whole_lines(text), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunReadError(f"{path.name} line {n} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise RunReadError(f"{path.name} line {n} is not an epoch row")
        rows.append(row)
    if not rows:
        raise RunReadError(f"{path.name} is empty")
    return rows


def _number(v: Any) -> Optional[float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
        return float(v)
    return None


def is_classifier(rows: Sequence[dict]) -> bool:
    """Whether the run's rows score a classifier (they hold accuracies) or any other F (errors only)."""
    return any("val_recon_acc" in r for r in rows)


def best_row(rows: Sequence[dict], by: str = "val_recon_acc") -> dict:
    """The row with the highest ``by`` (``val_recon_acc``; an N-worker run's ``val_degraded_acc``),
    for an F without classes the lowest ``val_mse``; the earliest epoch on ties."""
    if not is_classifier(rows):
        scored = [(r, _number(r.get("val_mse"))) for r in rows]
        scored = [(r, -v) for r, v in scored if v is not None and math.isfinite(v)]
        if not scored:
            raise RunReadError("no epoch has a validation reconstruction accuracy or MSE")
        top = max(v for _, v in scored)
        return min((r for r, v in scored if v == top), key=lambda r: r["epoch"])
    scored = [(r, _number(r.get(by))) for r in rows]
    scored = [(r, v) for r, v in scored if v is not None]
    if not scored:
        raise RunReadError(f"no epoch has a validation score ({by})")
    top = max(v for _, v in scored)
    return min((r for r, v in scored if v == top), key=lambda r: r["epoch"])


def summarize_run(folder: str | Path) -> dict:
    """One table row for the run in ``folder``, figures from its best validation epoch.

    Fractions stay fractions (0..1); ``acc_lost`` is F's test accuracy minus
    the degraded-mode test accuracy. ``history`` holds ``(epoch, val recon,
    val degraded)`` per epoch for the plots.
    """
    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunReadError(f"{CONFIG_FILE} is unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise RunReadError(f"{CONFIG_FILE} is not a JSON object")
    form = form_of_record(config)
    missing = [k for k in form.record_keys() if k not in config]
    if missing:
        raise RunReadError(f"{CONFIG_FILE} lacks {', '.join(missing)}")
    rows = sorted(read_rows(folder / METRICS_FILE), key=lambda r: r["epoch"])
    best = best_row(rows, form.best_by)
    classify = is_classifier(rows)
    f_acc = _number(best.get("test_base_acc"))
    # Epoch 0 only evaluates the untrained code; the others train, evaluate and checkpoint.
    seconds = [v for v in (_number(r.get("seconds")) for r in rows if r["epoch"] > 0) if v is not None]
    degraded = _number(best.get("test_degraded_acc"))
    return {
        "dataset": spec_name(config["dataset"]),
        "model": spec_name(config["model"]),
        "k": config["k"],
        **{key: config.get(key) if key in form.sizes else None for key in SIZE_KEYS},  # r; N, S
        "form": form.name,
        "loss": spec_name(config["loss"]),
        "encoder": spec_name(config["encoder"]),
        "decoder": spec_name(config["decoder"]),
        "f_test_acc": f_acc,
        "epochs_run": max(r["epoch"] for r in rows),
        "best_epoch": best["epoch"],
        "test_recon_acc": _number(best.get("test_recon_acc")),
        "test_degraded_acc": degraded,
        "test_group_acc": _number(best.get("test_group_acc")),
        "acc_lost": f_acc - degraded if f_acc is not None and degraded is not None else None,
        "epoch_seconds": statistics.median_high(seconds) if seconds else None,  # the median epoch
        "seed": config.get("run_seed"),
        # The runs of one 'seeds' sweep share the folder above their seed<s> folders. That folder
        # may itself be a run (the same choices without 'seeds'): it is not one of the seeds.
        "group": (f"seeds of {folder.parent}" if config.get("run_seed") is not None else f"run {folder}"),
        "folder": str(folder),
        "classify": classify,
        "test_mse": _number(best.get("test_mse")),
        "test_nmse": _number(best.get("test_nmse")),
        "test_rel_l2": _number(best.get("test_rel_l2")),
        # per epoch for the plots: a classifier's (val recon, val degraded), any other F's (val MSE, val NMSE)
        "history": [(r["epoch"], *((_number(r.get("val_recon_acc")), _number(r.get("val_degraded_acc")))
                                   if classify else (_number(r.get("val_mse")), _number(r.get("val_nmse")))))
                    for r in rows],
    }


def merge_seeds(rows: Sequence[dict]) -> list[dict]:
    """One row per seed sweep: the runs that differ only in their seed (one ``group``) become a
    row holding each figure's mean, with its sample standard deviation under ``<key>_std`` and
    the number of runs under ``seeds``. Runs outside a sweep pass through with ``seeds`` 1."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    merged = []
    for members in groups.values():
        row = {**members[0], "seeds": len(members)}
        if len(members) > 1:
            row["seed"] = None
            for key, _, kind in columns_of(row.get("form", "systematic"), row.get("classify", True)):
                values = [m.get(key) for m in members]
                if kind in ("pct", "num"):
                    known = [v for v in values if v is not None]
                    row[key] = statistics.fmean(known) if known else None
                    if key != "f_test_acc":  # one F for the whole sweep: its spread is no news
                        row[f"{key}_std"] = statistics.stdev(known) if len(known) > 1 else None
                elif kind == "sec":
                    known = [v for v in values if v is not None]
                    row[key] = statistics.median_high(known) if known else None
                elif key in ("epochs_run", "best_epoch") and len(set(values)) > 1:
                    row[key] = f"{min(values)}-{max(values)}"
        merged.append(row)
    return merged


def sort_key(row: dict) -> tuple:
    """(dataset, model, k, r, N, S, loss, encoder, decoder, seed), k, r, N and S compared as numbers
    (r is -1 for an N-worker run, N and S 0 for a systematic one)."""
    r = row.get("r")
    return (row["dataset"], row["model"], row["k"], -1 if r is None else r, row.get("n_workers") or 0,
            row.get("stragglers") or 0, row["loss"], row["encoder"], row["decoder"], row.get("seed") or 0)


_ERRORS = [c for c in REGRESSION_COLUMNS if c[2] == "num"]  # test MSE, NMSE, relative L2


def columns_of(form: str, classify: bool) -> list:
    """The columns of every table here: of runs of code ``form`` whose F is a classifier or not."""
    return form_named(form).columns(COLUMNS if classify else REGRESSION_COLUMNS, _ERRORS)


def shape_label(row: dict) -> str:
    """``k=8 r=2`` for a systematic run, ``K=8 N=12 S=1`` for an N-worker one (the run's form says)."""
    return form_of_record(row).label(row)


def _cell(value: Any, kind: str, std: Optional[float] = None) -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
    if kind == "num":
        return f"{value:.4g}" + (f" ± {std:.2g}" if std is not None else "")
    if kind == "sec":
        return f"{value:.1f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Iterable[dict], forms: Sequence[str] = FORMS) -> str:
    """A markdown table of ``rows`` (as from :func:`summarize_run` or :func:`merge_seeds`), stably
    sorted by :func:`sort_key`. A "seeds" column appears when a row merges several seeds (figures
    then read mean ± standard deviation), a "seed" column when rows of a sweep are listed one by one.
    Runs of classifiers and runs of other F get a table each (the second after a blank line), the
    latter with error columns (:data:`REGRESSION_COLUMNS`) and no accuracy; each other code form's runs get
    their own tables after those, with the columns of their form (:func:`columns_of`). ``forms`` limits the tables to those code forms."""
    rows = list(rows)
    parts = []
    for form in forms:
        for classify in (True, False):
            part = [r for r in rows if r.get("classify", True) == classify and r.get("form", "systematic") == form]
            if part:
                parts.append(_one_table(part, columns_of(form, classify)))
    return "\n".join(parts)


def _one_table(rows: list[dict], columns: list) -> str:
    rows = sorted(rows, key=sort_key)
    columns = list(columns)
    at = [key for key, _, _ in columns].index("decoder") + 1
    if any(r.get("seeds", 1) > 1 for r in rows):
        columns.insert(at, ("seeds", "seeds", "str"))
    elif any(r.get("seed") is not None for r in rows):
        columns.insert(at, ("seed", "seed", "str"))
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if kind == "str" else "---:" for _, _, kind in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), kind, row.get(f"{key}_std")) for key, _, kind in columns)
                     + " |")
    return "\n".join(lines) + "\n"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def write_plots(rows: Sequence[dict], out_dir: str | Path, err=sys.stderr) -> list[Path]:
    """One PNG per (dataset, model, k, r): validation recon and degraded accuracy per epoch, a line per run
    (for an F without classes: validation MSE and normalised MSE, on a log scale).

    matplotlib is an optional extra: without it, say so on ``err`` and write nothing.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("note: matplotlib is not installed, so no plots were written "
              "(pip install matplotlib to get them)", file=err)
        return []
    groups: dict[tuple, list[dict]] = {}
    for row in sorted(rows, key=sort_key):
        groups.setdefault((row["dataset"], row["model"], shape_label(row)), []).append(row)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for (dataset, model, shape), runs in groups.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
        codes: dict[str, int] = {}  # the seeds of one code share its colour, each with its own line style
        seen: dict[str, int] = {}
        for run in runs:
            code = f"{run['loss']} {run['encoder']}/{run['decoder']}"
            color = colors[codes.setdefault(code, len(codes)) % len(colors)]
            style = styles[seen.get(code, 0) % len(styles)]
            seen[code] = seen.get(code, 0) + 1
            label = code + (f" seed {run['seed']}" if run.get("seed") is not None else "")
            epochs = [e for e, _, _ in run["history"]]
            scale = 100 if run.get("classify", True) else 1
            for ax, i in zip(axes, (1, 2)):
                values = [scale * h[i] if h[i] is not None else float("nan") for h in run["history"]]
                ax.plot(epochs, values, marker="o", markersize=3, label=label, color=color, linestyle=style)
        classify = runs[0].get("classify", True)
        titles = (("validation reconstruction accuracy", "%"), ("validation degraded-mode accuracy", "%")) \
            if classify else (("validation MSE of rebuilt outputs", "MSE"), ("validation normalised MSE", "MSE / Var F(X)"))
        for ax, (title, unit) in zip(axes, titles):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(unit)
            if not classify:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
        fig.suptitle(f"{dataset} / {model} / {shape}")
        fig.tight_layout()
        path = out_dir / _safe(f"{dataset}_{model}_{shape.replace('=', '').replace(' ', '_')}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def collect(save_dir: Path, err=sys.stderr) -> list[dict]:
    """:func:`summarize_run` over every run folder, skipping (with a warning) the unreadable ones."""
    rows = []
    for folder in find_runs(save_dir):
        try:
            rows.append(summarize_run(folder))
        except RunReadError as exc:
            print(f"warning: skipping {folder}: {exc}", file=err)
    return rows


def main(argv: Optional[list[str]] = None, out=None, err=None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    ap = argparse.ArgumentParser(prog="python -m train.report",
                                 description="Table and plots of every run under a save_dir.")
    ap.add_argument("save_dir", help="the config's save_dir, e.g. save")
    ap.add_argument("--plots", metavar="DIR", help="folder for the PNG plots (default SAVE_DIR/plots)")
    ap.add_argument("--no-plots", action="store_true", help="write the table only")
    ap.add_argument("--out", metavar="FILE", help="also write the markdown table to FILE")
    ap.add_argument("--each-seed", action="store_true",
                    help="a row per run of a 'seeds' sweep instead of one row of mean ± std per sweep")
    ap.add_argument("--form", choices=FORMS, help="only this code form's runs (default: every form's tables)")
    args = ap.parse_args(argv)

    save_dir = Path(args.save_dir)
    for flag, value in (("--out", args.out), ("--plots", args.plots)):
        bad = unwritable(Path(value), want_folder=flag == "--plots") if value else None
        if bad:
            print(f"error: {flag} '{value}' {bad}", file=err)
            return EXIT_USER_ERROR
    if not save_dir.is_dir():
        print(f"error: save_dir '{save_dir}' does not exist. Fix: pass the folder your config's "
              f"'save_dir' points at (runs are under save_dir/<dataset>/<model>/...).", file=err)
        return EXIT_USER_ERROR
    if not find_runs(save_dir):
        print(f"error: no runs under '{save_dir}' (no folder holds both {METRICS_FILE} and {CONFIG_FILE}). "
              f"Fix: train first (python train.py CONFIG.json) or pass the right folder.", file=err)
        return EXIT_USER_ERROR
    rows = collect(save_dir, err)
    if not rows:
        print(f"error: every run folder under '{save_dir}' was unreadable (see the warnings above).", file=err)
        return EXIT_USER_ERROR
    if args.form:
        rows = [r for r in rows if r["form"] == args.form]
        if not rows:
            print(f"error: no {args.form} runs under '{save_dir}' (config \"form\": \"{args.form}\"). Fix: pass "
                  f"the save_dir of such a config, or leave out --form to table every run.", file=err)
            return EXIT_USER_ERROR

    table = markdown_table(rows if args.each_seed else merge_seeds(rows), (args.form,) if args.form else FORMS)
    print(table, end="", file=out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    if not args.no_plots:
        written = write_plots(rows, Path(args.plots) if args.plots else save_dir / "plots", err)
        if written:
            print(f"wrote {len(written)} plot(s) to {written[0].parent}", file=err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
