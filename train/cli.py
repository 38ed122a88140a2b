"""Command line: ``python train.py CONFIG.json [--resume] [--only-test] [--list] [--set key=value ...]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from util.schema import parse_overrides
from util.errors import EXIT_RUN_FAILED, EXIT_USER_ERROR, UserError


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)``: the second of every four runs."""
    i, sep, n = text.partition("/")
    try:
        shard = int(i), int(n)
    except ValueError:
        shard = None
    if not sep or shard is None or not 1 <= shard[0] <= shard[1]:
        raise UserError(f"--shard expects I/N with 1 <= I <= N, such as --shard 1/4; got '{text}'.")
    return shard


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="train.py", description="Train learned codes for every combination in a config.")
    ap.add_argument("config", help="JSON config file (e.g. conf/digits_learned.json), or one run's folder")
    ap.add_argument("--resume", action="store_true", help="continue runs from their current.pt")
    ap.add_argument("--overwrite", action="store_true", help="start runs again even if their folder has checkpoints")
    ap.add_argument("--only-test", action="store_true", help="evaluate each run's best.pt on the test split")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable), e.g. --set num_epoch=3")
    ap.add_argument("--list", dest="list_only", action="store_true",
                    help="print each run of the sweep with its folder and progress, and train nothing")
    ap.add_argument("--shard", metavar="I/N", help="run only the I-th of every N runs of the sweep (1 <= I <= N), "
                    "so N processes or machines can share it")
    ap.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                    help="run every run of the sweep as a Ray task: on a local Ray, or on the cluster at ADDRESS "
                    "(e.g. auto, ray://host:10001); see train/ray_sweep.py")
    args = ap.parse_args(argv)
    failed: list = []
    try:
        if args.resume and args.overwrite:
            raise UserError("--resume continues runs from their checkpoints and --overwrite deletes them to start "
                            "again: pass one of the two.")
        shard = parse_shard(args.shard) if args.shard else None
        results = run_all(args.config, parse_overrides(args.overrides), args.resume, args.overwrite,
                          args.only_test, failed=failed, shard=shard, list_only=args.list_only,
                          ray_address=args.ray)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is in current.pt; rerun with --resume to continue",
              file=sys.stderr)
        return 130
    if failed:
        print(f"{len(failed)} of {len(results)} runs diverged (see above):\n" + "\n".join(f"  {f}" for f in failed),
              file=sys.stderr)
        return EXIT_RUN_FAILED
    return 0


def run_status(folder: Path, num_epoch: int) -> tuple[str, str]:
    """How far the run in ``folder`` has got, from its checkpoint and metrics.jsonl:
    ``(state, phrase)`` with state "new", "part", "done" or "unreadable"; the phrase says when
    another process is writing the run now."""
    from util.lock import holder

    state, phrase = _run_progress(Path(folder), num_epoch)
    return state, phrase + ("; being written now" if holder(folder) is not None else "")


def _run_progress(folder: Path, num_epoch: int) -> tuple[str, str]:
    from train.report import METRICS_FILE, RunReadError, best_row, is_classifier, read_rows

    if not (folder / "current.pt").exists():
        return "new", "new"
    try:
        rows = read_rows(folder / METRICS_FILE)
        best = best_row(rows)
    except RunReadError as exc:
        return "unreadable", f"has a checkpoint; metrics unreadable ({exc})"
    last = max(r["epoch"] for r in rows)
    state = "done" if last >= num_epoch else "part"
    phrase = f"done, {last} epochs" if state == "done" else f"at epoch {last}/{num_epoch}"
    if is_classifier(rows):
        return state, f"{phrase}; best val recon {100 * best['val_recon_acc']:.2f}% (epoch {best['epoch']})"
    return state, f"{phrase}; best val mse {best['val_mse']:.4g} (epoch {best['epoch']})"


def run_all(config_path: str, overrides: dict, resume: bool = False, overwrite: bool = False,
            only_test: bool = False, out=None, failed: Optional[list] = None,
            shard: Optional[tuple[int, int]] = None, list_only: bool = False,
            ray_address: Optional[str] = None) -> list:
    """Run (or, with ``only_test``, evaluate) every combination of a config.

    ``config_path`` may also be a run folder: its ``config.json`` then
    rebuilds that one run, in that folder, wherever the folder now lives.

    A run that diverges is reported on stderr and the sweep goes on; with
    ``failed`` given, its folder is appended there, otherwise the error is raised.
    ``shard=(i, n)`` keeps runs i, i + n, i + 2n, ... (1-based) of the sweep's order.
    ``list_only`` prints each run's progress (see :func:`run_status`) and
    returns those lines instead of training.
    ``ray_address`` (``""`` for a local Ray) runs the runs as Ray tasks (train/ray_sweep.py).
    """
    out = out or sys.stdout
    from util.checkpoint import refuse_occupied
    from coders.form import FORMS, form_named
    from train.config import expand_runs, load_config, load_run_folder
    from train.engine import fit_each
    from util.classpath import import_class
    from train.preflight import check_data, preflight

    if Path(config_path).is_dir():
        cfg, folder = load_run_folder(config_path, overrides)
    else:
        cfg, folder = load_config(config_path, overrides), None
    runs = expand_runs(cfg)  # of the config's form (coders/form.py)
    form = form_named(cfg.form)
    if ray_address is not None and not form.on_ray:
        raise UserError(f"--ray runs the sweeps of {' and '.join(f.name for f in FORMS.values() if f.on_ray)} codes "
                        f"only; this config's 'form' is \"{cfg.form}\". Fix: drop --ray, or share the sweep with "
                        f"--shard I/N across processes.")
    preflight(cfg, runs)  # the whole sweep, so a typo fails in every shard; the form's coders before any data
    make_run = import_class(form.trainer, "form")
    data_runs = runs if form.probe_with_data else None
    if shard is not None:
        total, runs = len(runs), runs[shard[0] - 1::shard[1]]
        print(f"shard {shard[0]}/{shard[1]}: {len(runs)} of the sweep's {total} runs", file=out)
    folders = [folder if folder is not None else spec.folder(cfg.save_dir) for spec in runs]
    if list_only:
        statuses = [run_status(where, cfg.num_epoch) for where in folders]
        lines = [f"{i:>4}  {phrase:<52}  {where}" for i, ((_, phrase), where) in enumerate(zip(statuses, folders), 1)]
        count = [state for state, _ in statuses].count
        print(f"{'run':>4}  {'progress':<52}  folder", *lines, file=out, sep="\n")
        print(f"{len(lines)} runs: {count('done')} done, {count('part')} part-trained, {count('new')} new", file=out)
        return lines
    if not (resume or overwrite or only_test):  # before any run trains, not at the first old one
        refuse_occupied(folders, len(runs))
    check_data(cfg, data_runs)  # every dataset or domain loads, and F runs on a domain, before the first run
    if ray_address is not None:
        from train.ray_sweep import run_sweep
        return run_sweep(cfg, runs, folder, ray_address or None, resume, overwrite, only_test, out, failed)
    return fit_each(lambda i: make_run(cfg, runs[i], folder), len(runs), resume, overwrite, only_test, out, failed)
