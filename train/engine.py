"""One run: frozen F, encoder, decoder, optional parity models; the step, the epoch loop, evaluation.

Reading order: :meth:`CodedRun.forward_groups` is the whole computation
(encode -> F on parities -> every scenario through the decoder), the
training step wraps it with a loss, and :meth:`CodedRun.fit` is the loop
with evaluation, metrics and checkpoints around it. What touches the run
folder (state, checkpoints, resume, the lock) is :class:`train.run_folder.RunFolder`;
the builders of the coders and parity models are in ``coders/build.py``.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from base_models.fit import load_or_train, predict
from coders.build import build_coders, build_parity_models, probe_coders
from coders.code import Code, freeze
from train.config import CODE_DIRS, Config, RunSpec, to_dict
from coders.scenarios import gather_pairs, unavailable_data, unavailable_pairs
from datasets import load_data
from datasets.splits import AUGMENTED
from train import distributed
from train.augment import random_crop_flip
from train.losses import LOSS_ALIASES, scenario_groups, target_kind, weighted_by_scenario
from train.metrics import MetricsLog, Tally, columns_for, group_hits, output_variance, summary_line
from train.run_folder import RunFolder
from train.schedule import SCHEDULES, progress, set_rates
from util.classpath import build, import_class, spec_name, split_spec
from util.errors import ConfigError, RunDiverged
from util.hardware import flush_denormals, keep_freed_memory, resolve_device
from util.shapes import coder_in_dim, get_flattened_dim


def eval_groups(n: int, k: int, device) -> torch.Tensor:
    """Fixed ``(ceil(n/k), k)`` groups covering every index; the last one wraps around."""
    g = math.ceil(n / k)
    return (torch.arange(g * k, device=device) % n).view(g, k)


_DATA_CACHE: dict = {}

FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def resolve_task(task: str, splits) -> str:
    """The config's 'task' for ``splits``: "auto" is "classification" on a labelled dataset and
    "regression" on a domain or a regression set; a classification without classes is refused."""
    if task == "auto":
        return "classification" if splits.num_classes is not None else "regression"
    if task == "classification" and splits.num_classes is None:
        raise ConfigError(f"Config key 'task': \"classification\" scores F's answers against class labels, but "
                          f"'{splits.name}' has none (a domain or a regression set). Fix: use \"auto\" or "
                          f"\"regression\".")
    return task


def make_optimizer(spec, params: list) -> torch.optim.Optimizer:
    """Build the configured optimizer; Adam, AdamW and SGD get the fused kernel unless the
    config chose ``fused`` or ``foreach`` itself (one pass over the weights instead of ~10 on CPU)."""
    path, args = split_spec(spec, "optimizer")
    cls = import_class(path, "optimizer")
    if isinstance(cls, type) and issubclass(cls, FUSABLE) and not {"fused", "foreach"} & set(args):
        args["fused"] = True
    return cls(params, **args)


def run_config(cfg: Config, spec: RunSpec) -> dict:
    """The resolved config of one run: the whole config, this run's choices, and the
    folders its user code may live in (see :data:`util.classpath.CODE_DIRS`)."""
    return {**to_dict(cfg), **spec.record(), "code_dirs": list(CODE_DIRS)}


class CodedRun(RunFolder):
    """Everything one combination of the config needs, and its training loop."""

    def __init__(self, cfg: Config, spec: RunSpec, folder: Optional[Path] = None):
        self.k, self.r = spec.k, spec.r
        self.open_run(cfg, spec, folder, run_config(cfg, spec))
        cfg, dev = self.cfg, self.device
        self.augment = cfg.augment if cfg.augment is not None else spec.dataset in AUGMENTED
        self.config["augment"] = self.augment  # the resolved config records what "auto" chose

        train_seed = spec.train_seed(cfg)
        torch.manual_seed(train_seed)
        encoder, decoder = build_coders(spec, self.in_shape, self.n_out)
        self.encoder = encoder.to(dev).requires_grad_(cfg.train_encoder)
        self.decoder = decoder.to(dev).requires_grad_(cfg.train_decoder)
        # the contract of coders/coder.py, checked on the real coders in evaluation mode (which changes nothing)
        probe_coders(self.encoder, self.decoder, self.k, self.r, get_flattened_dim(coder_in_dim(self.in_shape)),
                     self.n_out, dev, training_modes=(False,), batch_sizes=(2,))
        self.parity_models = (build_parity_models(cfg, spec, self.splits, self.base, self.n_out).to(dev)
                              if cfg.train_parity_model else None)
        # The computation, shared with evaluation and serving (coders/code.py).
        self.code = Code(self.base, self.encoder, self.decoder, self.parity_models, self.k, self.r).to(dev)
        self.loss_fn = build(spec.loss, "losses", aliases=LOSS_ALIASES).to(dev)
        self.loss_kind = target_kind(self.loss_fn)
        if self.loss_kind == "label" and not self.classify:
            raise ConfigError(f"Config key 'losses': {spec_name(spec.loss)} compares reconstructions with class "
                              f"labels, but this run's F has no classes ('task' {self.task}). Fix: use a loss "
                              f"against F's outputs, such as \"mse\".")
        self.parity_loss = (self.parity_models is not None and self.loss_kind == "base"
                            and hasattr(self.decoder, "combine_labels"))
        coder_params = [p for m in (self.encoder, self.decoder) for p in m.parameters() if p.requires_grad]
        # Reconstruction loss trains E and D; a parity model whose decoder says
        # what it should output (combine_labels) learns from that target alone.
        self.recon_loss = bool(coder_params) or (self.parity_models is not None and not self.parity_loss)
        self.trainable = coder_params + (list(self.parity_models.parameters()) if self.parity_models else [])
        self.optimizer = make_optimizer(cfg.optimizer, self.trainable) if self.trainable else None
        # The configured rates; the schedule scales them before every step (train/schedule.py).
        self.base_rates = [g["lr"] for g in self.optimizer.param_groups] if self.optimizer is not None else []
        self.schedule = SCHEDULES[cfg.lr_schedule]

        self.available = self.code.scenarios  # every scenario, (S, k + r); the code holds them
        self.unavailable = unavailable_data(self.available, self.k)
        self.pairs = unavailable_pairs(self.unavailable)
        self.scenario_weights = scenario_groups(self.unavailable.cpu(), cfg.scenario_power)
        self.gen = torch.Generator().manual_seed(train_seed)
        self.epoch = 0
        self.best_val = -math.inf  # the best validation score (score()) so far
        self.log = MetricsLog(self.folder, columns_for(self.classify))

    def open_run(self, cfg: Config, spec, folder: Optional[Path], config: dict, dist: bool = True) -> None:
        """What every run, systematic or N-worker, sets up first: the device (and torchrun's process
        group when ``dist``), the thread count, the resolved ``config``, the data, the frozen F and
        F's outputs on the data (``self.data[split] = (x, y, F(x))``, cached across a sweep's runs)."""
        self.cfg, self.spec = cfg, spec
        self.folder = Path(folder) if folder is not None else spec.folder(cfg.save_dir)
        self.device = resolve_device(cfg.device)
        # torchrun's process group (train/distributed.py), else None
        self.dist = distributed.current(self.device) if dist else None
        if self.dist is not None:
            self.device = self.dist.device(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        flush_denormals(cfg.flush_denormal)  # process-wide, after the thread count: see README, Benchmarks
        self.config = config
        if self.dist is not None and not self.dist.is_main:  # one progress bar: rank 0's
            cfg = self.cfg = replace(cfg, progress=False)
        dev = self.device

        self.splits = load_data(spec.dataset, cfg.data_dir, cfg.download, cfg.val_size, cfg.seed, cfg.domains)
        # A classifier is scored by accuracies and errors, any other F by the errors of its rebuilt outputs.
        self.task = resolve_task(cfg.task, self.splits)
        self.classify = self.task == "classification"
        self.config["task"] = self.task  # the resolved config records what "auto" chose
        n_train = len(self.splits.train_y)
        if n_train < self.k:
            raise ConfigError(f"Config key 'k_vals': k={self.k} needs at least k training images to form one group, "
                              f"but {spec.dataset} has {n_train} after the validation split. Fix: lower k_vals.")
        def load_base():
            return load_or_train(spec.model, self.splits, path=cfg.base_model_file, root=cfg.base_model_dir,
                                 device=cfg.device, seed=cfg.seed, epochs=cfg.base_model_epochs, progress=cfg.progress)
        # Under torchrun rank 0 trains a missing F before the other ranks read its file.
        self.base = freeze((self.dist.main_first(load_base) if self.dist is not None else load_base()).to(dev))

        # Data on the device with F's outputs on it, computed once per dataset and F
        # (shared by every run of a sweep that uses them), never per step.
        key = (spec.dataset, json.dumps(spec.model, sort_keys=True), cfg.base_model_file, cfg.base_model_dir,
               cfg.data_dir, cfg.val_size, cfg.seed, str(dev), json.dumps((cfg.domains or {}).get(spec.dataset)))
        if key not in _DATA_CACHE:
            _DATA_CACHE.clear()  # one dataset at a time on the device
            data = {}
            for split in ("train", "val", "test"):
                x, y = self.splits.split(split)
                x, y = x.to(dev), y.to(dev)
                data[split] = (x, y, predict(self.base, x, cfg.eval_batch_size))
            _DATA_CACHE[key] = data
        self.data = _DATA_CACHE[key]
        self.out_var = {split: output_variance(fx) for split, (_, _, fx) in self.data.items()}  # for the NMSE
        self.n_out = self.data["test"][2].shape[1]
        self.in_shape = self.splits.input_shape

    # -- the computation (coders/code.py) -----------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.code.encode(x)

    def parity_outputs(self, parities: torch.Tensor) -> torch.Tensor:
        return self.code.parity_outputs(parities)

    def decode(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(B, k + r, n)`` -> reconstructions ``(S, B, k, n)`` for all S scenarios in one call."""
        return self.code.decode_scenarios(outputs)

    def forward_groups(self, x: torch.Tensor, fx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data ``(B, k, C, H, W)`` and F's outputs on it ``(B, k, n)`` -> (reconstructions, parity outputs)."""
        return self.code.forward_groups(x, fx)

    def select_unavailable(self, recon: torch.Tensor, fx: torch.Tensor, y: torch.Tensor):
        """The reconstructions of unavailable data outputs with their targets: ``(M, n), (M, n), (M,)``
        (the labels are None for an F without classes)."""
        return (gather_pairs(recon, self.pairs),
                gather_pairs(fx, self.pairs, shared=True),
                gather_pairs(y, self.pairs, shared=True) if self.classify else None)

    def reconstruction_loss(self, recon_sel, fx_sel, y_sel) -> torch.Tensor:
        """The configured loss over the selected rows, the scenarios weighed by 'scenario_power'."""
        def loss(rows):
            pick = (lambda t: t) if rows is None else (lambda t: t[rows.to(t.device)])
            if self.loss_kind == "both":
                return self.loss_fn(pick(recon_sel), pick(fx_sel), pick(y_sel))
            return self.loss_fn(pick(recon_sel), pick(y_sel if self.loss_kind == "label" else fx_sel))
        return weighted_by_scenario(loss, len(recon_sel), len(self.pairs[0]), self.scenario_weights)

    def loss(self, recon_sel, fx_sel, y_sel, fp, fx) -> torch.Tensor:
        total = recon_sel.new_zeros(())
        if self.recon_loss:
            total = total + self.reconstruction_loss(recon_sel, fx_sel, y_sel)
        if self.parity_loss:
            target = self.decoder.combine_labels(fx)
            total = total + self.loss_fn(fp.reshape(-1, fp.shape[-1]), target.reshape(-1, target.shape[-1]))
        return total

    # -- training ----------------------------------------------------------------------------------
    def train_mode(self, on: bool) -> None:
        for m in (self.encoder, self.decoder, self.parity_models):
            if m is not None:
                m.train(on)
        self.base.eval()  # F never leaves eval mode

    def step(self, idx: torch.Tensor, tally: Tally) -> None:
        """One step on the groups ``idx`` ``(B, k)``: data -> loss -> backward -> optimizer step."""
        x_all, y_all, fx_all = self.data["train"]
        x, y = x_all[idx], y_all[idx]
        if self.augment:  # drawn for the whole step on every rank, so the draws do not depend on the ranks
            x = random_crop_flip(x.flatten(0, 1), self.gen).view_as(x)
        share = self.dist.share(len(idx)) if self.dist is not None else None
        if share is not None:  # torchrun: this rank's groups of the step (train/distributed.py)
            idx, x, y = idx[share.part], x[share.part], y[share.part]
        self.optimizer.zero_grad(set_to_none=True)
        if len(idx):
            if self.augment:
                with torch.no_grad():  # F's targets must follow the augmented inputs
                    fx = self.base(x.flatten(0, 1)).view(*idx.shape, -1)
            else:
                fx = fx_all[idx]
            recon, fp = self.forward_groups(x, fx)
            sel = self.select_unavailable(recon, fx, y)
            loss = self.loss(*sel, fp, fx)
            loss.backward()
            tally.add(sel[0], sel[1], sel[2], loss.detach())
        if share is not None:  # the gradient of the whole step's loss, on every rank
            self.dist.combine_gradients(self.trainable, share.weight)
        self.optimizer.step()

    def epoch_groups(self) -> torch.Tensor:
        """This epoch's training groups ``(G, k)``, drawn with the run's generator.

        ``"disjoint"``: one shuffle cut into N/k groups, each image once (the
        original research code's epoch).
        ``"images"``: k shuffles, so N groups and every image sits in k groups
        (twice the steps; the default, which matches the original's accuracy
        per epoch).
        """
        n = len(self.data["train"][0])
        g = n // self.k
        passes = self.k if self.cfg.epoch_groups == "images" else 1
        groups = [torch.randperm(n, generator=self.gen)[: g * self.k].view(g, self.k) for _ in range(passes)]
        return torch.cat(groups).to(self.device)

    def train_epoch(self) -> dict:
        groups = self.epoch_groups()
        g = len(groups)
        bs = self.cfg.batch_size
        tally = Tally(self.classify)
        self.train_mode(True)
        bar = tqdm(range(0, g, bs), desc=f"epoch {self.epoch + 1}/{self.cfg.num_epoch}", leave=False,
                   disable=not self.cfg.progress, file=sys.stderr)
        steps = math.ceil(g / bs)
        for n_step, i in enumerate(bar):
            factor = self.schedule(progress(self.epoch, n_step, steps, self.cfg.num_epoch))
            set_rates(self.optimizer, self.base_rates, factor)
            self.step(groups[i:i + bs], tally)
            if self.cfg.progress and n_step % 20 == 0:
                running = tally.result("train", float("nan"))
                shown = ({"recon": f"{running['train_recon_acc']:.3f}"} if self.classify else
                         {"mse": f"{running['train_mse']:.4g}"})
                bar.set_postfix(loss=f"{running['train_loss']:.4g}", **shown, refresh=False)
        self.train_mode(False)
        if self.dist is not None:  # the sums of every rank's share
            self.dist.sum_tally(tally)
        return tally.result("train", self.base_accuracy("train"), self.out_var["train"])

    # -- evaluation --------------------------------------------------------------------------------
    def base_accuracy(self, split: str) -> Optional[float]:
        """F's own accuracy on ``split``; None for an F without classes."""
        if not self.classify:
            return None
        _, y, fx = self.data[split]
        return (fx.argmax(1) == y).float().mean().item()

    @torch.no_grad()
    def evaluate(self, split: str) -> dict:
        """Loss, errors and (a classifier's) accuracies over every group and every scenario of ``split``."""
        x, y, fx = self.data[split]
        groups = eval_groups(len(x), self.k, self.device)
        if self.dist is not None:  # torchrun: each rank scores its share; the sums are added below
            groups = groups[self.dist.part(len(groups))]
        tally = Tally(self.classify)
        self.train_mode(False)
        for i in range(0, len(groups), self.cfg.eval_batch_size):
            idx = groups[i:i + self.cfg.eval_batch_size]
            fx_idx = fx[idx]
            recon, fp = self.forward_groups(x[idx], fx_idx)
            sel = self.select_unavailable(recon, fx_idx, y[idx])
            tally.add(*sel, self.loss(*sel, fp, fx_idx))
            if self.classify:
                tally.add_groups(group_hits(recon, fx_idx, y[idx], self.unavailable))
        if self.dist is not None:
            self.dist.sum_tally(tally)
        return tally.result(split, self.base_accuracy(split), self.out_var[split])

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False, out=None) -> list[dict]:
        """Train to ``num_epoch`` (see :meth:`_fit`), holding the run folder's lock until the end."""
        try:
            return self._fit(resume, overwrite, out)
        finally:
            self.folder_lock.release()

    def _fit(self, resume: bool, overwrite: bool, out) -> list[dict]:
        """Train to ``num_epoch``, evaluating and checkpointing after every epoch.

        Epoch 0 is the untrained code (or a training-free one such as Berrut),
        evaluated on validation and test before the first step.
        """
        out = out or sys.stdout
        self.check_base_outputs()
        if self.dist is not None:  # rank 0 prepares the folder, the others load its checkpoint
            self.dist.prepare_folder(self, resume, overwrite)
        else:
            self.prepare_folder(resume, overwrite)
        print(self.banner(), file=out)
        if self.epoch == 0 and not self.log.rows():
            t0 = time.time()
            row = {"epoch": 0, **self.evaluate("val"), **self.evaluate("test"), "seconds": time.time() - t0}
            self.finish_epoch(row, out)
        if self.optimizer is None and self.cfg.num_epoch > 0:
            print("nothing to train (no trainable parameters): evaluated only", file=out)
            return self.log.rows()
        while self.epoch < self.cfg.num_epoch:
            t0 = time.time()
            row = self.train_epoch()
            if not math.isfinite(row["train_loss"]):
                lr = self.base_rates[0] if self.base_rates else None
                raise RunDiverged(
                    f"Run '{self.folder}' diverged in epoch {self.epoch + 1}: its training loss is "
                    f"{row['train_loss']}. current.pt still holds epoch {self.epoch}. Fix: lower the learning "
                    f"rate ('lr' in the config key 'optimizer', now {lr}), then continue with --resume or "
                    f"start again with --overwrite.")
            self.epoch += 1
            row = {"epoch": self.epoch, "seconds": time.time() - t0, **row,
                   **self.evaluate("val"), **self.evaluate("test")}
            self.finish_epoch(row, out)
        return self.log.rows()

    def banner(self) -> str:
        """The line that opens a run's output."""
        return f"== {self.spec.describe()} -> {self.folder}"

    def finish_epoch(self, row: dict, out) -> None:
        if self.dist is None or self.dist.is_main:
            self.log.append(row)
        self.checkpoint(row)
        print(summary_line(row, self.cfg.num_epoch), file=out, flush=True)


def fit_each(make_run, count: int, resume: bool, overwrite: bool, only_test: bool, out, failed) -> list:
    """Train (or, with ``only_test``, score on test) the runs ``make_run(i)`` for i < ``count``, one
    after the other: the loop of every sweep, systematic or N-worker. A run that diverges is recorded in
    ``failed`` (its rows kept) when a list is given, else its error stops the sweep."""
    results = []
    for i in range(count):
        print(f"[run {i + 1}/{count}]", file=out)
        run = make_run(i)
        if only_test:
            run.load_state(run.folder / "best.pt")
            metrics = run.evaluate("test")
            print(json.dumps({"run": str(run.folder), "epoch": run.epoch, **metrics}), file=out)
            results.append(metrics)
            continue
        try:
            results.append(run.fit(resume=resume, overwrite=overwrite, out=out))
        except RunDiverged as exc:
            if failed is None:
                raise
            print(f"error: {exc}", file=sys.stderr)
            failed.append(str(run.folder))
            results.append(run.log.rows())
    return results
