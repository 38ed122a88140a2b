"""Training and evaluation of N-worker codes (config ``"form": "nworker"``; docs/nworker.md).

One run: K = one of ``k_vals`` inputs per group, N = one of ``n_workers``
workers, S = one of ``stragglers`` late workers, an [encoder, decoder] pair of
``coders/nworker.py`` or ``coders/spline.py``. The computation is
:class:`coders.nworker.NWorkerCode`; :class:`NWorkerRun` is the systematic
run (:class:`train.engine.CodedRun`) with this code, its training step and its
evaluation: the data, the epoch loop, the schedule, the run folder
(config.json, metrics.csv / metrics.jsonl, current.pt, best.pt), resume and
the lock are the systematic run's. ``python train.py`` drives both forms.

Straggler patterns: the training patterns are all C(N, S) sets of late workers
when there are at most ``max_patterns`` of them, else ``max_patterns`` drawn
with the run's training seed; evaluation uses all, or ``max_patterns`` drawn
with the config's ``seed`` + 1, the same for every family of a sweep, so
Berrut, splines and learned codes are scored on the same patterns. Both
counts are printed and recorded in config.json.

Scores: every output of a group is rebuilt (no worker computes a raw input),
so the scores cover all K answers under every evaluation pattern. Errors
(MSE, normalised MSE, relative L2) are against F's outputs; for a classifier
``degraded_acc`` is the accuracy of the rebuilt answers against the labels
(ApproxIFER's accuracy) and ``recon_acc`` their agreement with F's own answers.
"""
from __future__ import annotations

import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

from coders.build import build_coders
from coders.form import NWorkerSpec  # noqa: F401  (its old home: train.nworker.NWorkerSpec)
from coders.form import RunSpec, expand_runs, form_named, form_of_record
from coders.nworker import pattern_count, patterns_used, straggler_patterns
from train.config import Config
from train.engine import CodedRun, eval_groups, make_optimizer, run_config
from train.losses import LOSS_ALIASES, target_kind
from train.metrics import MetricsLog, Tally, columns_for
from train.preflight import KNOWN_SHAPES
from train.schedule import SCHEDULES
from train import report
from util.classpath import build, spec_name
from util.errors import ConfigError
from util.memory import check_memory, size


# The one spec, expander and builder of every form (coders/form.py, coders/build.py), under the N-worker names
# this module gave them before the forms were one: NWorkerSpec(d, m, K, N, S, loss, enc, dec, seed) is an
# N-worker RunSpec, expand_nworker_runs(cfg) the runs of an N-worker config, build_nworker_coders(spec, ...)
# the coders of a spec.
expand_nworker_runs = expand_runs
build_nworker_coders = build_coders
FORM = form_named("nworker")


def coder_parameters(spec: RunSpec, in_shape, n_out: int) -> int:
    """Parameters of ``spec``'s encoder and decoder, counted on the meta device (nothing allocated); 0 for a
    coder that cannot be built there (one that computes its constants with SciPy has no parameters)."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for m in build_coders(spec, in_shape, n_out) for p in m.parameters())
    except Exception:  # the real build, after this check, names any error
        return 0


def nworker_bytes(cfg: Config, spec: RunSpec, d: int, n_out: int, parameters: int = 0) -> dict:
    """A lower bound of the memory one N-worker run needs, in parts named by what sets each: the coders'
    fixed matrices (float64 and float32, ``(N, K)`` each way) and the straggler patterns, the learned
    coders' parameters with their gradients and Adam's two moments, and the larger of a training step
    (coded inputs with their gradient, the outputs repeated for every pattern, float64 weights) and an
    evaluation step. F's own activations come on top."""
    k, n = spec.k, spec.n_workers
    p = patterns_used(n, spec.stragglers, cfg.max_patterns)

    def step(groups: int, grad: bool) -> float:
        return groups * (4.0 * n * d * (3 if grad else 1) + 4.0 * p * n * n_out * (4 if grad else 2) + 16.0 * p * n)

    return {"matrices": 32.0 * n * k + 2.0 * p * n, "parameters": 16.0 * parameters,
            "batches": max(step(cfg.batch_size, True), step(cfg.eval_batch_size, False))}


def check_nworker_memory(cfg: Config, spec: RunSpec, in_shape, n_out: int) -> None:
    """Refuse (ConfigError naming 'n_workers') a run whose :func:`nworker_bytes` exceed the memory available
    (util/memory.py, the probe serving's limits use), before anything of the run is allocated."""
    d = math.prod(in_shape)
    for counted in (False, True):  # the fixed parts first, so a huge N is refused before even a meta build
        parts = nworker_bytes(cfg, spec, d, n_out, coder_parameters(spec, in_shape, n_out) if counted else 0)
        shown = ", ".join(f"{name} {size(v)}" for name, v in parts.items() if v)
        check_memory(sum(parts.values()), f"the N-worker run with K={spec.k}, N={spec.n_workers:,}, "
                     f"S={spec.stragglers} and {spec_name(spec.encoder)}/{spec_name(spec.decoder)} on "
                     f"{spec_name(spec.dataset)} ({shown})", "n_workers",
                     "lower n_workers (or batch_size, eval_batch_size, max_patterns, or the coders' widths).")


def probe_nworker_coders(cfg: Config, runs: Optional[list[RunSpec]] = None,
                         known_shapes: dict = KNOWN_SHAPES) -> None:
    """Build and call the coders of every run (``runs``, default the config's) on a dataset of known sizes
    (``{dataset: (in_shape, n_out)}``), before any data or F is loaded (the N-worker form's probe,
    coders.form.NWorkerForm.probe): a coder that refuses K, N or the sizes, or breaks the contract of
    coders/nworker.py, is a ConfigError naming 'enc_dec_types'."""
    seen = set()
    for spec in expand_runs(cfg) if runs is None else runs:
        known = known_shapes.get(spec.dataset)
        key = (json.dumps([spec.encoder, spec.decoder], sort_keys=True), spec.k, spec.n_workers, spec.stragglers,
               spec.dataset)
        if key in seen:  # the same coders at the same sizes: checked once
            continue
        seen.add(key)
        check_nworker_memory(cfg, spec, *(known or ((1,), 1)))  # unknown sizes: the N- and K-bound parts alone
        if known is None:
            continue
        (in_shape, n_out), (k, n) = known, (spec.k, spec.n_workers)
        encoder, decoder = build_coders(spec, in_shape, n_out)
        d = math.prod(in_shape)
        available = straggler_patterns(n, spec.stragglers, 2, seed=0)[[0, -1]]  # two rows, even if C(N, S) = 1
        try:
            with torch.no_grad():
                coded = encoder.eval()(torch.randn(2, k, d))
                rebuilt = decoder.eval()(torch.randn(2, n, n_out) * available[..., None], available)
        except ValueError as exc:
            raise ConfigError(f"Config key 'enc_dec_types': {spec_name(spec.decoder)} cannot decode K={k} from "
                              f"N - S = {n - spec.stragglers} of N={n} workers: {exc} Fix: change n_workers, "
                              f"stragglers or the coder.") from None
        if coded.shape != (2, n, d) or rebuilt.shape != (2, k, n_out):
            raise ConfigError(f"Config key 'enc_dec_types': {spec_name(spec.encoder)}/{spec_name(spec.decoder)} "
                              f"returned shapes {tuple(coded.shape)} and {tuple(rebuilt.shape)}; the contract of "
                              f"coders/nworker.py wants (B, N, D) = (2, {n}, {d}) and (B, K, n) = (2, {k}, {n_out}).")


class NWorkerRun(CodedRun):
    """One N-worker run: its own code, training step and evaluation; everything else is the
    systematic run's (:class:`train.engine.CodedRun`): the data and F's cached outputs, the epoch
    loop with its learning-rate schedule and epoch groups, and (:class:`train.run_folder.RunFolder`)
    the checkpoint slots, resume with its fingerprint check, and the folder's one-writer lock."""

    def __init__(self, cfg: Config, spec: RunSpec, folder: Optional[Path] = None):
        self.k, self.n, self.s = spec.k, spec.n_workers, spec.stragglers
        train_seed = spec.train_seed(cfg)
        config = {**run_config(cfg, spec), "patterns_total": pattern_count(self.n, self.s)}
        self.open_run(cfg, spec, folder, config, dist=False)  # the step below does not share groups across ranks
        dev = self.device
        self.augment, self.parity_models = False, None  # no augmentation, no parity models (a checkpoint slot of None)

        torch.manual_seed(train_seed)
        encoder, decoder = build_coders(spec, self.in_shape, self.n_out)
        self.code = FORM.code(cfg, spec, self.base, encoder, decoder).to(dev)
        self.encoder, self.decoder = self.code.encoder, self.code.decoder
        self.train_patterns, self.eval_patterns = (p.to(dev) for p in self.patterns(cfg, spec))
        self.config.update(train_patterns=len(self.train_patterns), eval_patterns=len(self.eval_patterns))
        self.loss_fn = build(spec.loss, "losses", aliases=LOSS_ALIASES).to(dev)
        self.loss_kind = target_kind(self.loss_fn)
        if self.loss_kind not in ("label", "base"):
            raise ConfigError(f"Config key 'losses': {spec_name(spec.loss)} needs both F's outputs and the labels; "
                              f"N-worker runs take a loss against one of them. Fix: use \"mse\", \"kl\" or "
                              f"\"xent\".")
        if self.loss_kind == "label" and not self.classify:
            raise ConfigError(f"Config key 'losses': {spec_name(spec.loss)} compares answers with class labels, "
                              f"but this F has no classes. Fix: use \"mse\".")
        self.trainable = [p for p in self.code.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg.optimizer, self.trainable) if self.trainable else None
        self.base_rates = [g["lr"] for g in self.optimizer.param_groups] if self.optimizer is not None else []
        self.schedule = SCHEDULES[cfg.lr_schedule]
        self.gen = torch.Generator().manual_seed(train_seed)
        self.epoch, self.best_val = 0, -math.inf
        self.log = MetricsLog(self.folder, columns_for(self.classify))

    @staticmethod
    def patterns(cfg: Config, spec: RunSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """``(training, evaluation)`` straggler patterns: drawn (when C(N, S) > max_patterns) with the run's
        training seed and with the config's seed + 1, so a code is not scored on the very patterns it trained
        on, and every family of a sweep is scored on the same ones."""
        return (straggler_patterns(spec.n_workers, spec.stragglers, cfg.max_patterns, spec.train_seed(cfg)),
                straggler_patterns(spec.n_workers, spec.stragglers, cfg.max_patterns, cfg.seed + 1))

    # -- the step and the scores -------------------------------------------------------------------
    def scored(self, rebuilt: torch.Tensor, fx: torch.Tensor, y: torch.Tensor, tally: Tally) -> torch.Tensor:
        """The loss of ``rebuilt`` ``(P, B, K, n)`` against F's outputs ``fx`` ``(B, K, n)`` or the labels
        ``y`` ``(B, K)`` (by the loss), counted in ``tally``."""
        p = rebuilt.shape[0]
        rebuilt = rebuilt.reshape(-1, fx.shape[-1])
        base = fx.unsqueeze(0).expand(p, *fx.shape).reshape(-1, fx.shape[-1])
        labels = y.unsqueeze(0).expand(p, *y.shape).reshape(len(rebuilt), *y.shape[2:])  # a domain's are (.., 0)
        loss = self.loss_fn(rebuilt, labels if self.loss_kind == "label" else base)
        tally.add(rebuilt, base, labels, loss.detach())
        return loss

    def step(self, idx: torch.Tensor, tally: Tally) -> None:
        """One step on the groups ``idx`` ``(B, K)``: every training pattern -> loss -> backward -> step."""
        x_all, y_all, fx_all = self.data["train"]
        self.optimizer.zero_grad(set_to_none=True)
        rebuilt = self.code.forward_patterns(x_all[idx], self.train_patterns)
        self.scored(rebuilt, fx_all[idx], y_all[idx], tally).backward()
        self.optimizer.step()

    @torch.no_grad()
    def evaluate(self, split: str) -> dict:
        """Every group of ``split`` (the last wraps around) under every evaluation pattern."""
        x, y, fx = self.data[split]
        groups = eval_groups(len(x), self.k, self.device)
        tally = Tally(self.classify)
        self.train_mode(False)
        for i in range(0, len(groups), self.cfg.eval_batch_size):
            idx = groups[i:i + self.cfg.eval_batch_size]
            self.scored(self.code.forward_patterns(x[idx], self.eval_patterns), fx[idx], y[idx], tally)
        return tally.result(split, self.base_accuracy(split), self.out_var[split])

    def score(self, row: dict) -> Optional[float]:
        """Higher is better: a classifier's validation accuracy of all K answers against the labels
        (ApproxIFER's score), minus the validation MSE for any other F (as the systematic run's)."""
        return row.get("val_degraded_acc") if self.classify else super().score(row)

    def banner(self) -> str:
        return (f"{super().banner()}\n   straggler patterns: {len(self.train_patterns)} trained, "
                f"{len(self.eval_patterns)} scored, of C({self.n}, {self.s}) = {pattern_count(self.n, self.s)}")


def nworker_runs(root: str | Path, err=None):
    """``(saved config, metrics rows)`` of each N-worker run folder under ``root``, in path order, read as
    ``python -m train.report`` reads them (:func:`train.report.find_runs`, :func:`train.report.read_rows`: a
    last line cut short by a kill is left out); an unreadable folder is skipped with a warning on ``err``."""
    for folder in report.find_runs(root):
        try:
            saved = json.loads((folder / report.CONFIG_FILE).read_text())
            if isinstance(saved, dict) and form_of_record(saved) is FORM:
                yield saved, report.read_rows(folder / report.METRICS_FILE)
        except (json.JSONDecodeError, report.RunReadError) as exc:
            print(f"warning: skipping {folder}: {exc}", file=sys.stderr if err is None else err)


def results_table(root: str | Path, err=None) -> list[str]:
    """The lines of the N-worker tables of ``python -m train.report ROOT`` (one table-printing path,
    :func:`train.report.markdown_table`): every N-worker run under ``root`` at its best validation epoch,
    the runs of a ``seeds`` sweep merged into mean ± std."""
    rows = [r for r in report.collect(Path(root), sys.stderr if err is None else err) if r["form"] == FORM.name]
    return report.markdown_table(report.merge_seeds(rows), (FORM.name,)).splitlines()


def error_by_n(root: str | Path, column: str = "test_nmse") -> list[str]:
    """Markdown rows: ``column`` at the best validation epoch against N, one row per (dataset, K, S,
    family). The runs of a ``seeds`` sweep are averaged (mean ± standard deviation, with the count);
    of several variants of one family (a decoder's lam, say) the one with the lowest mean validation
    MSE is shown, with its lam."""
    variants: dict = {}
    for saved, rows in nworker_runs(root):
        row = min(rows, key=lambda r: r["val_mse"])
        family = spec_name(saved["encoder"]).split("-")[0]
        lam = saved["decoder"].get("args", {}).get("lam") if isinstance(saved["decoder"], dict) else None
        key = (spec_name(saved["dataset"]), saved["k"], saved["stragglers"], family, saved["n_workers"])
        variant = json.dumps([saved["encoder"], saved["decoder"]], sort_keys=True)
        variants.setdefault(key, {}).setdefault(variant, (lam, []))[1].append((row["val_mse"], row[column]))
    best = {}
    for key, by_variant in variants.items():
        lam, runs = min(by_variant.values(), key=lambda v: statistics.fmean(r[0] for r in v[1]))
        tests = [r[1] for r in runs]
        best[key] = (statistics.fmean(tests), statistics.stdev(tests) if len(tests) > 1 else None, len(tests), lam)
    ns = sorted({key[-1] for key in best})
    lines = ["| dataset | K | S | code | " + " | ".join(f"N = {n}" for n in ns) + " |",
             "|---|---:|---:|---|" + "---:|" * len(ns)]
    for head in sorted({key[:-1] for key in best}):
        cells = [best.get((*head, n)) for n in ns]
        lines.append(f"| {head[0]} | {head[1]} | {head[2]} | {head[3]} | " + " | ".join(
            "" if c is None else f"{c[0]:.4g}" + (f" ± {c[1]:.2g} ({c[2]} seeds)" if c[1] is not None else "")
            + (f" (lam {c[3]:g})" if c[3] is not None else "") for c in cells) + " |")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m train.nworker RESULTS_DIR``: the tables of every N-worker run under RESULTS_DIR, as
    ``python -m train.report RESULTS_DIR --form nworker --no-plots`` prints them (that command is the
    one report; this name is kept); ``--by-n``: one row per code, the test NMSE against N."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m train.nworker", description=main.__doc__)
    ap.add_argument("root", help="a save_dir of N-worker runs, e.g. results_nworker")
    ap.add_argument("--by-n", action="store_true", help="one row per code, the test NMSE against N")
    args = ap.parse_args(argv)
    if not args.by_n:
        return report.main([args.root, "--form", FORM.name, "--no-plots"])
    if not Path(args.root).is_dir():
        print(f"error: '{args.root}' is not a folder. Fix: pass the save_dir of an N-worker config "
              f"(e.g. results_nworker).", file=sys.stderr)
        return 2
    print(*error_by_n(args.root), sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
