"""The run config of ``python train.py``: the computation's keys and how they are trained.

Every key is declared once: the computation's in :class:`coders.config.CodeConfig`
(coders, k, r, N, S, data, F, parity models, perturbations), the training's here
in :class:`Config` (epochs, optimizer, schedule, batches, progress, where runs go).
:func:`load_config` rejects unknown keys (with a did-you-mean), wrong types and
impossible values before any work starts, and :func:`expand_runs` turns the lists
into one :class:`RunSpec` per combination.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from coders.config import (CODE_CHOICES, CODE_DIRS, NWORKER_RUN_KEYS, RUN_KEYS, CodeConfig, RunSpec,  # noqa: F401
                           Spec, add_code_dir, check_code_values, expand_runs, load_code_config, parse_overrides,
                           read_json_config, read_run_folder, spec_name, split_spec, to_dict, validate_schema)
from util.errors import ConfigError
from util.schema import key_error, required_keys

DEFAULT_OPTIMIZER = {"class": "torch.optim.Adam", "args": {"lr": 1e-3, "weight_decay": 1e-5}}


@dataclass(kw_only=True)
class Config(CodeConfig):
    num_epoch: int                      # training epochs per run (0: evaluate only)
    train_encoder: bool = True          # update the encoder's parameters
    train_decoder: bool = True          # update the decoder's parameters
    batch_size: int = 64                # groups of k inputs per training step
    epoch_groups: str = "images"        # "images": N groups per epoch (each image leads one group and
                                        # sits in k); "disjoint": N/k groups (each image once)
    eval_batch_size: int = 1024         # groups per evaluation step
    optimizer: Spec = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_OPTIMIZER)))
    lr_schedule: str = "constant"       # the optimizer's lr over the run, set before every step from the
                                        # step's place in num_epoch: "constant", "cosine" (to 0), "linear"
                                        # (to 0), "step" (x0.1 at 50% and again at 75%); train/schedule.py
    save_dir: str = "save"              # run folders go under save_dir/<dataset>/<model>/k<k>/r<r>/...
    device: str = "auto"                # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    task: str = "auto"                  # how outputs are scored: "classification" (accuracies and errors),
                                        # "regression" (errors only); "auto": classification on a labelled
                                        # dataset, regression on a domain or a regression set
    base_model_epochs: int = 20         # epochs when F has to be trained first
    augment: Optional[bool] = None      # random crop + flip on encoder inputs (default: on for CIFAR)
    progress: bool = True               # per-epoch progress bar
    num_threads: Optional[int] = None   # CPU threads for torch (default: torch's, one per core)
    scenario_power: float = 1.0         # a scenario with u data outputs missing weighs u**p in the loss: 1 weighs
                                        # every missing data output alike, 0 every scenario alike, 2 puts the
                                        # scenarios with more data outputs missing up (train/losses.py)
    flush_denormal: bool = True         # CPU arithmetic reads and writes floats below ~1.2e-38 as zero:
                                        # subnormals are many times slower on x86 (util.hardware.flush_denormals)


TRAINING_CHOICES = {"epoch_groups": ("images", "disjoint"), "lr_schedule": ("constant", "cosine", "linear", "step"),
                    "task": ("auto", "classification", "regression")}
CHOICES = {**CODE_CHOICES, **TRAINING_CHOICES}
REQUIRED = required_keys(Config)


def validate_dict(raw: Any, source: str = "config") -> Config:
    """Check ``raw`` against the schema and return a :class:`Config`; raise ConfigError otherwise."""
    cfg = validate_schema(raw, Config, source)
    _check_values(cfg, source)
    _check_distinct_folders(cfg, source)
    return cfg


def _check_distinct_folders(cfg: Config, source: str) -> None:
    """Two runs of one sweep must never write one folder (the second would find it taken,
    or overwrite it): a value listed twice in a list key is refused here."""
    seen = {}
    for spec in expand_runs(cfg):
        folder = spec.folder(cfg.save_dir)
        if folder in seen:
            raise ConfigError(f"{source}: two runs of the sweep would write the same run folder '{folder}' "
                              f"({seen[folder]} and {spec.describe()}): a value is listed twice in 'datasets', "
                              f"'models', 'losses', 'enc_dec_types', 'k_vals', "
                              f"{', '.join(repr(key) for key in spec.code_form.sweep_keys)} or 'seeds'. "
                              f"Fix: list each value once.")
        seen[folder] = spec.describe()


def _check_values(cfg: Config, source: str) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return key_error(source, key, msg)

    if cfg.num_epoch < 0:
        raise bad("num_epoch", f"must be 0 or more; got {cfg.num_epoch}.")
    if cfg.num_threads is not None and cfg.num_threads < 1:
        raise bad("num_threads", f"must be 1 or more; got {cfg.num_threads}.")
    for key in ("batch_size", "eval_batch_size", "base_model_epochs"):
        if getattr(cfg, key) < 1:
            raise bad(key, f"must be 1 or more; got {getattr(cfg, key)}.")
    if not cfg.save_dir.strip():  # "" would scatter folders over the current directory
        raise bad("save_dir", f"must name a folder (e.g. {Config.save_dir!r}); got {cfg.save_dir!r}.")
    if not -8.0 <= cfg.scenario_power <= 8.0:
        raise bad("scenario_power", f"must be a number from -8 to 8 (1 weighs every missing data output alike, "
                                    f"0 every scenario alike); got {cfg.scenario_power}.")
    for key, allowed in TRAINING_CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise bad(key, f"must be one of {', '.join(map(repr, allowed))}; got {getattr(cfg, key)!r}.")
    split_spec(cfg.optimizer, "optimizer")
    check_code_values(cfg, source)
    if cfg.device != "auto":
        import torch

        try:
            dev = torch.device(cfg.device)
        except RuntimeError:
            raise bad("device", f"is not a device name; use \"auto\", \"cpu\" or \"cuda\"; got {cfg.device!r}.") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise bad("device", "asks for CUDA, but this machine has no usable GPU; use \"auto\" or \"cpu\".")


def load_config(path: str | Path, overrides: Optional[dict] = None) -> Config:
    """Read and validate a JSON config file; ``overrides`` replace its keys first.

    The config's folder goes on ``sys.path`` so a user's own module beside
    the config file can be named by class path.
    """
    path = Path(path)
    raw = read_json_config(path, "such as conf/digits_learned.json")
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **overrides}
    add_code_dir(str(path.resolve().parent))
    return validate_dict(raw, source=f"config '{path}'")


def load_run_folder(folder: str | Path, overrides: Optional[dict] = None) -> tuple[Config, Path]:
    """The one-run config stored in a run folder's ``config.json``, and the folder."""
    raw, folder = read_run_folder(folder, Config, overrides)
    return validate_dict(raw, source=f"run config '{Path(folder) / 'config.json'}'"), folder
