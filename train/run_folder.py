"""The run folder side of a training run: its state, checkpoints, resume and one-writer lock.

:class:`RunFolder` is the half of :class:`train.engine.CodedRun` that touches
files; the engine's half computes (steps, epochs, evaluation). Everything here
reads the run's attributes (``folder``, ``config``, ``encoder``, ``decoder``,
``parity_models``, ``optimizer``, ``gen``, ``epoch``, ``best_val``, ``log``,
``dist``) and writes only through :mod:`util.files` and :mod:`util.checkpoint`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch

from base_models.fit import default_path, has_weights
from datasets.splits import resolve_data_dir
from util.checkpoint import (RUN_FILES, fingerprint, load_checkpoint, load_module_state, refuse_occupied,
                             remove_partial_writes, save_checkpoint)
from util.classpath import spec_name
from util.errors import UserError
from util.files import atomic_write_text
from util.lock import FolderLock


class RunFolder:
    """Saving, resuming and locking a run's folder (mixed into :class:`train.engine.CodedRun`)."""

    # -- state -------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "best_val": self.best_val,
            "encoder": self.encoder.state_dict(),
            "decoder": self.decoder.state_dict(),
            "parity_models": self.parity_models.state_dict() if self.parity_models is not None else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "rng": {"torch": torch.get_rng_state(), "shuffle": self.gen.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "config": self.config,
        }

    @property
    def base_model_path(self) -> Path:
        """The file F's weights come from: 'base_model_file', else its default under 'base_model_dir'."""
        cfg = self.cfg
        return Path(cfg.base_model_file or default_path(self.splits.name, self.spec.model, cfg.base_model_dir))

    def record_fingerprint(self) -> None:
        """Add F's and the dataset's digests to the run's config (see util.checkpoint.fingerprint):
        written into every checkpoint, and compared with the checkpoint's on resume."""
        if "base_model_digest" in self.config:
            return
        cfg = self.cfg
        data_path, named = os.path.abspath(resolve_data_dir(cfg.data_dir)), None
        domain = (cfg.domains or {}).get(self.spec.dataset) if isinstance(self.spec.dataset, str) else None
        if domain and domain.get("sampler") == "file":  # the inputs are that file's rows, not data_dir's
            data_path = os.path.abspath(domain["path"])
            named = (f"domain '{self.spec.dataset}''s file", f"'domains' entry '{self.spec.dataset}' ('path')")
        self.config.update(fingerprint(self.base, self.splits, os.path.abspath(self.base_model_path), data_path,
                                       data_key=(json.dumps(self.spec.dataset), data_path, cfg.val_size, cfg.seed,
                                                 json.dumps(domain)), data_named=named))

    def load_state(self, path: Path) -> None:
        self.record_fingerprint()
        state = load_checkpoint(path, expected=self.config)
        load_module_state(self.encoder, state["encoder"], "encoder", path)
        load_module_state(self.decoder, state["decoder"], "decoder", path)
        if self.parity_models is not None:
            load_module_state(self.parity_models, state["parity_models"], "parity models", path)
        if self.optimizer is not None and state["optimizer"] is not None:
            # The config, not the checkpoint, sets the hyperparameters (lr, weight decay, ...):
            # a run resumed after changing them continues with the new values.
            configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as exc:
                raise UserError(f"Checkpoint '{path}' holds optimizer state that does not fit the configured "
                                f"optimizer ({exc}). Fix: resume with the optimizer class that made it, or "
                                f"rerun with --overwrite.") from None
            for group, values in zip(self.optimizer.param_groups, configured):
                group.update(values)
        torch.set_rng_state(state["rng"]["torch"])
        self.gen.set_state(state["rng"]["shuffle"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.epoch, self.best_val = state["epoch"], state["best_val"]

    def score(self, row: dict) -> Optional[float]:
        """What picks the best epoch, higher being better: the validation reconstruction accuracy of a
        classifier, minus the validation MSE of rebuilt outputs for any other F."""
        if self.classify:
            return row.get("val_recon_acc")
        mse = row.get("val_mse")
        return -mse if mse is not None and math.isfinite(mse) else None

    def checkpoint(self, row: dict) -> None:
        """``current.pt`` every epoch; ``best.pt`` when the validation :meth:`score` improves."""
        val = self.score(row)
        improved = val is not None and val > self.best_val
        if improved:
            self.best_val = val
        if self.dist is not None and not self.dist.is_main:  # torchrun: rank 0 alone writes the folder
            return
        state = self.state()
        if improved:  # best.pt first: a kill in between leaves current.pt an epoch behind, which resume redoes
            save_checkpoint(state, self.folder / "best.pt")
        save_checkpoint(state, self.folder / "current.pt")

    @property
    def folder_lock(self) -> FolderLock:
        """The run folder's one-writer lock (util/lock.py): taken by prepare_folder, released when fit ends."""
        if getattr(self, "_folder_lock", None) is None:
            self._folder_lock = FolderLock(self.folder)
        return self._folder_lock

    def check_base_outputs(self) -> None:
        """A UserError naming F when its outputs on the data are not finite: every loss and
        accuracy would be meaningless, and the run would only seem to diverge."""
        for split, (_, _, fx) in self.data.items():
            bad = int((~torch.isfinite(fx)).any(1).sum())
            if bad and not has_weights(self.base):
                raise UserError(f"Config key 'models': F ({spec_name(self.spec.model)}) outputs NaN or infinite "
                                f"values on {bad} of the {len(fx)} {split} inputs of '{spec_name(self.spec.dataset)}', "
                                f"so nothing can be trained or scored against it. Fix: restrict the domain (config "
                                f"key 'domains') to where F is finite, or correct F.")
            if bad:
                raise UserError(f"F ('{self.base_model_path}') outputs NaN or infinite values on {bad} of the {len(fx)} {split} "
                                f"images, so nothing can be trained or scored against it. Fix: retrain F (python "
                                f"-m base_models.fit ... --force) or point 'base_model_file' at sound weights.")

    def prepare_folder(self, resume: bool, overwrite: bool) -> None:
        """Lock the folder for this process, remove what a killed writer left (temporary files),
        then load the checkpoint (``resume``) or clear the folder for a fresh start."""
        self.record_fingerprint()
        current = self.folder / "current.pt"
        if current.exists() and resume:  # a checkpoint of another run is refused before the lock is touched
            load_checkpoint(current, expected=self.config)
        self.folder_lock.acquire()
        remove_partial_writes(self.folder)
        if current.exists() and resume:
            self.load_state(current)
            self.log.truncate(self.epoch)
        else:
            if not overwrite:
                refuse_occupied([self.folder], 1, busy_check=False)  # the lock is ours
            self.folder.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                if name != "config.json":
                    (self.folder / name).unlink(missing_ok=True)
        atomic_write_text(json.dumps(self.config, indent=2) + "\n", self.folder / "config.json")
