"""Training and evaluation of N-worker codes (config ``"form": "nworker"``; docs/nworker.md).

One run: K = one of ``k_vals`` inputs per group, N = one of ``n_workers``
workers, S = one of ``stragglers`` late workers, an [encoder, decoder] pair of
``coders/nworker.py`` or ``coders/spline.py``. The computation is
:class:`coders.nworker.NWorkerCode`; this module only feeds it data, a loss and
an optimizer, scores it and writes the run folder (config.json, metrics.csv /
metrics.jsonl, current.pt, best.pt), like :class:`train.engine.CodedRun` does
for the systematic form.

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
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from base_models.fit import load_or_train, predict
from coders.config import CODE_DIRS, Config, to_dict
from coders.nworker import NWorkerCode, pattern_count, straggler_patterns
from datasets import load_data
from train.engine import eval_groups, fit_each, make_optimizer, resolve_task
from train.losses import LOSS_ALIASES, target_kind
from train.metrics import MetricsLog, Tally, columns_for, output_variance, summary_line
from train.preflight import KNOWN_SHAPES, check_data
from util.checkpoint import load_checkpoint, load_module_state, refuse_occupied, remove_partial_writes, save_checkpoint
from util.classpath import build, spec_name
from util.errors import ConfigError, RunDiverged
from util.files import atomic_write_text
from util.hardware import flush_denormals, resolve_device
from util.lock import FolderLock


@dataclass(frozen=True)
class NWorkerSpec:
    """One combination of an N-worker config: what one run folder holds."""

    dataset: str
    model: object
    k: int
    n_workers: int
    stragglers: int
    loss: object
    encoder: object
    decoder: object
    run_seed: Optional[int] = None

    def folder(self, save_dir: str) -> Path:
        parts = [spec_name(self.dataset), spec_name(self.model), f"k{self.k}", f"n{self.n_workers}",
                 f"s{self.stragglers}", spec_name(self.loss), spec_name(self.encoder), spec_name(self.decoder)]
        if self.run_seed is not None:
            parts.append(f"seed{self.run_seed}")
        return Path(save_dir, *parts)

    def describe(self) -> str:
        return (f"{spec_name(self.dataset)} {spec_name(self.model)} K={self.k} N={self.n_workers} "
                f"S={self.stragglers} {spec_name(self.encoder)}/{spec_name(self.decoder)}"
                + (f" seed={self.run_seed}" if self.run_seed is not None else ""))

    def train_seed(self, cfg: Config) -> int:
        return self.run_seed if self.run_seed is not None else cfg.seed


def expand_nworker_runs(cfg: Config) -> list[NWorkerSpec]:
    """Every combination of an N-worker config's lists, in a stable order."""
    return [NWorkerSpec(d, m, k, n, s, loss, enc, dec, seed)
            for d, m, k, n, s, loss, (enc, dec), seed in itertools.product(
                cfg.datasets, cfg.models, cfg.k_vals, cfg.n_workers, cfg.stragglers, cfg.losses,
                cfg.enc_dec_types, cfg.seeds or [None])]


def build_nworker_coders(spec: NWorkerSpec, in_shape, n_out: int):
    """Encoder and decoder of ``spec``: ``cls(K, N, in_dim, **args)``; a refusal is a ConfigError."""
    modules = []
    for which, cspec, dim in (("encoder", spec.encoder, [-1, *in_shape]), ("decoder", spec.decoder, [-1, n_out])):
        try:
            modules.append(build(cspec, "enc_dec_types", spec.k, spec.n_workers, dim))
        except ValueError as exc:
            raise ConfigError(f"Config key 'enc_dec_types': N-worker {which} {spec_name(cspec)} cannot serve "
                              f"K={spec.k}, N={spec.n_workers} with size {dim}: {exc} Fix: change k_vals, "
                              f"n_workers or the coder's args.") from None
        except TypeError as exc:
            raise ConfigError(f"Config key 'enc_dec_types': N-worker {which} {spec_name(cspec)} could not be built "
                              f"({exc}). Fix: name an N-worker coder (coders/nworker.py, coders/spline.py) taking "
                              f"(K, N, in_dim, ...).") from None
    return modules


def probe_nworker_coders(cfg: Config, known_shapes: dict = KNOWN_SHAPES) -> None:
    """Build and call every run's coders on a dataset of known sizes (``{dataset: (in_shape, n_out)}``),
    before any data or F is loaded: a coder that refuses K, N or the sizes, or breaks the contract of
    coders/nworker.py, is a ConfigError naming 'enc_dec_types'."""
    seen = set()
    for spec in expand_nworker_runs(cfg):
        known = known_shapes.get(spec.dataset)
        key = (json.dumps([spec.encoder, spec.decoder], sort_keys=True), spec.k, spec.n_workers, spec.stragglers,
               spec.dataset)
        if known is None or key in seen:
            continue
        seen.add(key)
        (in_shape, n_out), (k, n) = known, (spec.k, spec.n_workers)
        encoder, decoder = build_nworker_coders(spec, in_shape, n_out)
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


class NWorkerRun:
    """The data, the code, the optimizer and the loop of one N-worker run."""

    def __init__(self, cfg: Config, spec: NWorkerSpec, folder: Optional[Path] = None):
        self.cfg, self.spec = cfg, spec
        self.folder = Path(folder) if folder is not None else spec.folder(cfg.save_dir)
        self.k, self.n, self.s = spec.k, spec.n_workers, spec.stragglers
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        flush_denormals(cfg.flush_denormal)  # as train.engine.CodedRun does
        dev = self.device = resolve_device(cfg.device)
        self.splits = load_data(spec.dataset, cfg.data_dir, cfg.download, cfg.val_size, cfg.seed, cfg.domains)
        self.classify = resolve_task(cfg.task, self.splits) == "classification"
        base = load_or_train(spec.model, self.splits, path=cfg.base_model_file, root=cfg.base_model_dir,
                             device=cfg.device, seed=cfg.seed, epochs=cfg.base_model_epochs, progress=cfg.progress)
        base = base.to(dev).requires_grad_(False).eval()
        self.data = {}
        for split in ("train", "val", "test"):
            x, y = self.splits.split(split)
            x, y = x.to(dev), y.to(dev)
            self.data[split] = (x, y, predict(base, x, cfg.eval_batch_size))
        self.out_var = {split: output_variance(fx) for split, (_, _, fx) in self.data.items()}  # for the NMSE
        n_out = self.data["test"][2].shape[1]

        train_seed = spec.train_seed(cfg)
        torch.manual_seed(train_seed)
        encoder, decoder = build_nworker_coders(spec, self.splits.input_shape, n_out)
        self.code = NWorkerCode(base, encoder, decoder, self.k, self.n, self.s).to(dev)
        self.train_patterns = straggler_patterns(self.n, self.s, cfg.max_patterns, train_seed).to(dev)
        self.eval_patterns = straggler_patterns(self.n, self.s, cfg.max_patterns, cfg.seed + 1).to(dev)
        self.loss_fn = build(spec.loss, "losses", aliases=LOSS_ALIASES).to(dev)
        self.loss_kind = target_kind(self.loss_fn)
        if self.loss_kind == "label" and not self.classify:
            raise ConfigError(f"Config key 'losses': {spec_name(spec.loss)} compares answers with class labels, "
                              f"but this F has no classes. Fix: use \"mse\".")
        params = [p for p in self.code.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg.optimizer, params) if params else None
        self.gen = torch.Generator().manual_seed(train_seed)
        self.epoch, self.best_val = 0, -math.inf
        self.config = {**to_dict(cfg), **asdict(spec), "form": "nworker", "code_dirs": list(CODE_DIRS),
                       "patterns_total": pattern_count(self.n, self.s),
                       "train_patterns": len(self.train_patterns), "eval_patterns": len(self.eval_patterns)}
        self.log = MetricsLog(self.folder, columns_for(self.classify))

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

    def train_epoch(self) -> dict:
        n = len(self.data["train"][0])
        g = n // self.k
        groups = torch.randperm(n, generator=self.gen)[: g * self.k].view(g, self.k).to(self.device)
        tally = Tally(self.classify)
        self.code.train(True)
        for i in range(0, g, self.cfg.batch_size):
            self.step(groups[i:i + self.cfg.batch_size], tally)
        self.code.train(False)
        return tally.result("train", self.base_accuracy("train"), self.out_var["train"])

    def base_accuracy(self, split: str) -> Optional[float]:
        if not self.classify:
            return None
        _, y, fx = self.data[split]
        return (fx.argmax(1) == y).float().mean().item()

    @torch.no_grad()
    def evaluate(self, split: str) -> dict:
        """Every group of ``split`` (the last wraps around) under every evaluation pattern."""
        x, y, fx = self.data[split]
        groups = eval_groups(len(x), self.k, self.device)
        tally = Tally(self.classify)
        self.code.train(False)
        for i in range(0, len(groups), self.cfg.eval_batch_size):
            idx = groups[i:i + self.cfg.eval_batch_size]
            self.scored(self.code.forward_patterns(x[idx], self.eval_patterns), fx[idx], y[idx], tally)
        return tally.result(split, self.base_accuracy(split), self.out_var[split])

    # -- state and the loop ------------------------------------------------------------------------
    def state(self) -> dict:
        return {"epoch": self.epoch, "best_val": self.best_val,
                "encoder": self.code.encoder.state_dict(), "decoder": self.code.decoder.state_dict(),
                "parity_models": None,  # N-worker codes have none; every checkpoint names the slot (util.checkpoint)
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "rng": {"torch": torch.get_rng_state(), "shuffle": self.gen.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                "config": self.config}

    def load_state(self, path: Path) -> None:
        state = load_checkpoint(path)
        load_module_state(self.code.encoder, state["encoder"], "encoder", path)
        load_module_state(self.code.decoder, state["decoder"], "decoder", path)
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        self.gen.set_state(state["rng"]["shuffle"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.epoch, self.best_val = state["epoch"], state["best_val"]

    def score(self, row: dict) -> Optional[float]:
        """Higher is better: the validation accuracy of a classifier, minus the validation MSE otherwise."""
        if self.classify:
            return row.get("val_degraded_acc")
        mse = row.get("val_mse")
        return None if mse is None else -mse

    def checkpoint(self, row: dict) -> None:
        val = self.score(row)
        state = None
        if val is not None and val > self.best_val:
            self.best_val = val
            state = self.state()
            save_checkpoint(state, self.folder / "best.pt")
        save_checkpoint(state or self.state(), self.folder / "current.pt")

    def fit(self, resume: bool = False, overwrite: bool = False, out=None) -> list[dict]:
        out = out or sys.stdout
        lock = FolderLock(self.folder)
        lock.acquire()
        try:
            remove_partial_writes(self.folder)
            current = self.folder / "current.pt"
            if current.exists() and resume:
                self.load_state(current)
                self.log.truncate(self.epoch)
            else:
                if not overwrite:
                    refuse_occupied([self.folder], 1, busy_check=False)
                self.folder.mkdir(parents=True, exist_ok=True)
                for name in ("current.pt", "best.pt", *MetricsLog.NAMES):
                    (self.folder / name).unlink(missing_ok=True)
            atomic_write_text(json.dumps(self.config, indent=2, default=str) + "\n", self.folder / "config.json")
            print(f"== {self.spec.describe()} -> {self.folder}\n   straggler patterns: "
                  f"{len(self.train_patterns)} trained, {len(self.eval_patterns)} scored, of C({self.n}, {self.s}) = "
                  f"{pattern_count(self.n, self.s)}", file=out)
            if self.epoch == 0 and not self.log.rows():
                t0 = time.time()
                row = {"epoch": 0, **self.evaluate("val"), **self.evaluate("test"), "seconds": time.time() - t0}
                self.finish_epoch(row, out)
            if self.optimizer is None:
                if self.cfg.num_epoch > 0:
                    print("nothing to train (no trainable parameters): evaluated only", file=out)
                return self.log.rows()
            while self.epoch < self.cfg.num_epoch:
                t0 = time.time()
                row = self.train_epoch()
                if not math.isfinite(row["train_loss"]):
                    raise RunDiverged(f"Run '{self.folder}' diverged in epoch {self.epoch + 1} (training loss "
                                      f"{row['train_loss']}). Fix: lower the 'lr' in 'optimizer', then --resume.")
                self.epoch += 1
                row = {"epoch": self.epoch, "seconds": time.time() - t0, **row,
                       **self.evaluate("val"), **self.evaluate("test")}
                self.finish_epoch(row, out)
            return self.log.rows()
        finally:
            lock.release()

    def finish_epoch(self, row: dict, out) -> None:
        self.log.append(row)
        self.checkpoint(row)
        print(summary_line(row, self.cfg.num_epoch), file=out, flush=True)


def run_nworker(cfg: Config, folder: Optional[Path], resume: bool, overwrite: bool, only_test: bool,
                out=None, failed: Optional[list] = None, shard=None, list_only: bool = False) -> list:
    """``train.py`` for an N-worker config: every run of the sweep, in order."""
    out = out or sys.stdout
    runs = expand_nworker_runs(cfg)
    probe_nworker_coders(cfg)  # before any data or F is loaded
    if shard is not None:
        runs = runs[shard[0] - 1::shard[1]]
    folders = [folder if folder is not None else spec.folder(cfg.save_dir) for spec in runs]
    if list_only:
        lines = [f"{i:>4}  {spec.describe():<60}  {where}" for i, (spec, where) in enumerate(zip(runs, folders), 1)]
        print(*lines, sep="\n", file=out)
        return lines
    if not (resume or overwrite or only_test):
        refuse_occupied(folders, len(runs))
    check_data(cfg)  # every dataset or domain loads, and F runs on a domain, before the first run
    return fit_each(lambda i: NWorkerRun(cfg, runs[i], folders[i]), len(runs), resume, overwrite, only_test, out,
                    failed)


def results_table(root: str | Path) -> list[str]:
    """Markdown rows, one per N-worker run folder under ``root``: its best epoch's test scores
    (accuracy of all K answers for a classifier; MSE, normalised MSE and relative L2 error always)."""
    lines = ["| dataset | F | K | N | S | encoder | decoder | epochs | best | val score | test acc (%) | test MSE "
             "| test NMSE | test rel. L2 |", "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cfg_path in sorted(Path(root).rglob("config.json")):
        saved = json.loads(cfg_path.read_text())
        rows_path = cfg_path.parent / "metrics.jsonl"
        if saved.get("form") != "nworker" or not rows_path.exists():
            continue
        rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
        classify = any("val_degraded_acc" in r for r in rows)
        key = (lambda r: r.get("val_degraded_acc", -1)) if classify else (lambda r: -r.get("val_mse", math.inf))
        best = max(rows, key=key)
        acc = f"{100 * best['test_degraded_acc']:.2f}" if classify else "n/a"
        val = f"{100 * best['val_degraded_acc']:.2f}%" if classify else f"{best['val_mse']:.4g}"
        lines.append(f"| {spec_name(saved['dataset'])} | {spec_name(saved['model'])} | {saved['k']} | "
                     f"{saved['n_workers']} | {saved['stragglers']} | {spec_name(saved['encoder'])} | "
                     f"{spec_name(saved['decoder'])} | {max(r['epoch'] for r in rows)} | {best['epoch']} | {val} | "
                     f"{acc} | " + " | ".join(f"{best[c]:.4g}" if c in best else "n/a"
                                              for c in ("test_mse", "test_nmse", "test_rel_l2")) + " |")
    return lines


def error_by_n(root: str | Path, column: str = "test_nmse") -> list[str]:
    """Markdown rows: ``column`` at the best validation epoch against N, one row per (dataset, K, S,
    family); of several runs of one family (a decoder's lam, say) the one with the lowest validation
    MSE is shown, with its lam."""
    best: dict = {}
    for cfg_path in sorted(Path(root).rglob("config.json")):
        saved = json.loads(cfg_path.read_text())
        rows_path = cfg_path.parent / "metrics.jsonl"
        if saved.get("form") != "nworker" or not rows_path.exists():
            continue
        rows = [json.loads(line) for line in rows_path.read_text().splitlines() if line.strip()]
        row = min(rows, key=lambda r: r["val_mse"])
        family = spec_name(saved["encoder"]).split("-")[0]
        lam = saved["decoder"].get("args", {}).get("lam") if isinstance(saved["decoder"], dict) else None
        key = (spec_name(saved["dataset"]), saved["k"], saved["stragglers"], family, saved["n_workers"])
        if key not in best or row["val_mse"] < best[key][0]:
            best[key] = (row["val_mse"], row[column], lam)
    ns = sorted({key[-1] for key in best})
    lines = ["| dataset | K | S | code | " + " | ".join(f"N = {n}" for n in ns) + " |",
             "|---|---:|---:|---|" + "---:|" * len(ns)]
    for head in sorted({key[:-1] for key in best}):
        cells = [best.get((*head, n)) for n in ns]
        lines.append(f"| {head[0]} | {head[1]} | {head[2]} | {head[3]} | " + " | ".join(
            "" if c is None else f"{c[1]:.4g}" + (f" (lam {c[2]:g})" if c[2] is not None else "") for c in cells)
            + " |")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m train.nworker RESULTS_DIR``: the table of every N-worker run under RESULTS_DIR."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m train.nworker", description=main.__doc__)
    ap.add_argument("root", help="a save_dir of N-worker runs, e.g. results_nworker")
    ap.add_argument("--by-n", action="store_true", help="one row per code, the test NMSE against N")
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"error: '{args.root}' is not a folder. Fix: pass the save_dir of an N-worker config "
              f"(e.g. results_nworker).", file=sys.stderr)
        return 2
    print(*(error_by_n(args.root) if args.by_n else results_table(args.root)), sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
