"""The computation's keys of the run config, and the sweep they make.

A run config (``python train.py conf/X.json``) is one declared schema in two
blocks: :class:`CodeConfig` here holds what the computation is (the coders,
k and r or N and S, the data, F, the parity models, the perturbations between
the workers and the decoder), which :func:`coders.code.load_code` rebuilds a
trained code from; ``train.config.Config`` adds how it is trained (epochs,
optimizer, schedule, progress, ...). :func:`expand_runs` turns the lists into
one :class:`RunSpec` per combination. What depends on the config's ``form`` (its
keys' checks, the sizes it sweeps, the runs it expands into) is the form's
(coders/form.py). The schema machinery (types, unknown keys, the refusals'
wording) is util/schema.py's.

The training config's names stay importable from here (``from coders.config
import Config, load_config``), served from train/config.py when first asked for.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, get_type_hints

from coders.form import FORMS, RunSpec, check_forms, expand_runs, form_of_record  # noqa: F401  (re-exported)
from util.classpath import CODE_DIRS, add_code_dir, spec_name, split_spec  # noqa: F401  (CODE_DIRS: re-exported)
from util.errors import ConfigError
from util.moved import keep_moved_attributes
from util.schema import (Spec, key_error, parse_overrides, read_json_config,  # noqa: F401  (re-exported)
                         validate_schema)


@dataclass
class CodeConfig:
    """The computation's keys, each declared once with its type, default and meaning (``train.config.Config``
    adds training's)."""

    k_vals: list[int]                   # numbers of data inputs per group to sweep
    enc_dec_types: list[list[Spec]]     # [encoder, decoder] class-path pairs to sweep
    datasets: list[str]                 # digits, mnist, fashion-mnist, cifar10, cifar100, diabetes, a class
                                        # path, or the name of an entry of 'domains'
    models: list[Spec]                  # base models F: base-mlp, logistic, lenet5, resnet18, or a class path
                                        # to an nn.Module class or to a plain torch function
                                        # (base_models/functions.py)
    losses: list[Spec]                  # mse, kl, xent or a class path such as torch.nn.MSELoss
    train_parity_model: bool = False    # learn new models F_P for the parities (else parities go through F)
    r_vals: list[int] = field(default_factory=lambda: [1])  # numbers of parities to sweep
    seed: int = 0                       # same seed: same splits, same initialisation, same numbers
    seeds: Optional[list[int]] = None   # sweep these training seeds (coder initialisation, data order);
                                        # each gets a seed<s> folder; splits and F stay those of 'seed'
    data_dir: Optional[str] = None      # dataset folder; else $LCC_DATA_DIR; else ./data
    download: bool = True               # download missing datasets through torchvision
    val_size: Optional[int] = None      # validation images carved from the training split (default N/12)
    domains: Optional[dict] = None      # inputs drawn instead of read: {name: {"sampler": "uniform" | "normal"
                                        # | "file" | "dataset", ...}}, each name then listed in 'datasets'
                                        # (keys: datasets/domains.py DomainSpec; docs/any-function.md)
    base_model_file: Optional[str] = None   # F's weights; default base_model_dir/<dataset>/<model>/model.pt
    base_model_dir: str = "base_model_trained_files"  # where F is trained to when its file is missing
    parity_model: Optional[Spec] = None     # architecture of F_P (default: F's)
    parity_model_init: str = "random"   # "random" or "base" (start F_P from F's weights)
    form: str = "systematic"            # "systematic": k data + r parity workers (k_vals, r_vals); "nworker": the
                                        # literature's form, k_vals inputs coded into n_workers worker inputs,
                                        # rebuilt from any n_workers - stragglers outputs (docs/nworker.md)
    n_workers: Optional[list[int]] = None   # "nworker" form: numbers of workers N to sweep
    stragglers: Optional[list[int]] = None  # "nworker" form: numbers of late workers S to sweep (0 <= S < N)
    max_patterns: int = 64              # "nworker" form: straggler patterns trained and scored; all C(N, S) when
                                        # at most this many, else a seeded sample of this many (logged)
    adversaries: int = 0                # "nworker" form: answering workers whose outputs are corrupted in every
                                        # decode of training and evaluation (coders/perturb.py, docs/nworker.md)
    adversary: str = "gaussian"         # how: "gaussian" (adds N(0, adversary_scale^2)), "sign" (negated),
                                        # "swap" (top class exchanged with adversary_target)
    adversary_scale: float = 100.0      # the standard deviation of the "gaussian" adversary's corruption
    adversary_target: Optional[int] = None  # the class "swap" pushes towards (null: the one after the top class)
    output_noise: float = 0.0           # "nworker" form: noise of this standard deviation on every worker's output
    straggler_p: Optional[float] = None     # "nworker" form: each worker late independently with this probability
                                        # (then 'stragglers' must be [0]); null: exactly S late
    worker_latency: Optional[dict] = None   # "nworker" form: each worker's completion time (ms), a latency law as
                                        # serving's 'delays' entries (util/latency.py); needs deadline_ms
    deadline_ms: Optional[float] = None     # "nworker" form: evaluation decodes from the workers done by then
                                        # (coders/deadline.py); a group with too few is not answered



CODE_CHOICES = {"parity_model_init": ("random", "base"), "form": tuple(FORMS)}

keep_moved_attributes(__name__, {  # the training config's names, as before (tests/test_layering.py reads this dict)
    "Config": "train.config", "DEFAULT_OPTIMIZER": "train.config", "CHOICES": "train.config",
    "REQUIRED": "train.config", "validate_dict": "train.config", "load_config": "train.config",
    "load_run_folder": "train.config"})


def check_code_values(cfg: CodeConfig, source: str) -> None:
    """The values of the computation's keys (their types are already checked); a ConfigError naming the key."""
    def bad(key: str, msg: str) -> ConfigError:
        return key_error(source, key, msg)

    for key in ("k_vals", "r_vals", "enc_dec_types", "datasets", "models", "losses"):
        if not getattr(cfg, key):
            raise bad(key, "must list at least one value.")
    if any(k < 1 for k in cfg.k_vals):
        raise bad("k_vals", f"must hold integers of 1 or more; got {cfg.k_vals}.")
    if any(r < 1 for r in cfg.r_vals):
        raise bad("r_vals", f"must hold integers of 1 or more; got {cfg.r_vals}.")
    for pair in cfg.enc_dec_types:
        if len(pair) != 2:
            raise bad("enc_dec_types", f"must hold [encoder, decoder] pairs; got {json.dumps(pair)}.")
    if not 0 <= cfg.seed < 2 ** 63:  # torch's generators take a 64-bit seed; a negative one aliases another
        raise bad("seed", f"must be an integer from 0 to 2**63 - 1; got {cfg.seed}.")
    if cfg.seeds is not None:
        if not cfg.seeds or any(not 0 <= s < 2 ** 63 for s in cfg.seeds) or len(set(cfg.seeds)) < len(cfg.seeds):
            raise bad("seeds", f"must list distinct integers from 0 to 2**63 - 1 (or be null); got {cfg.seeds}.")
    if not cfg.base_model_dir.strip():  # "" would scatter folders over the current directory
        raise bad("base_model_dir", f"must name a folder (e.g. {CodeConfig.base_model_dir!r}); "
                                    f"got {cfg.base_model_dir!r}.")
    if cfg.val_size is not None and cfg.val_size < 1:
        raise bad("val_size", f"must be 1 or more; got {cfg.val_size}.")
    for key, allowed in CODE_CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise bad(key, f"must be one of {', '.join(map(repr, allowed))}; got {getattr(cfg, key)!r}.")
    check_forms(cfg, bad)  # the form's own keys (coders/form.py)
    if cfg.parity_model is not None:
        split_spec(cfg.parity_model, "parity_model")
    for key in ("datasets", "models", "losses"):
        for spec in getattr(cfg, key):
            split_spec(spec, key)
    for pair in cfg.enc_dec_types:
        for spec in pair:
            split_spec(spec, "enc_dec_types")
    _check_domains(cfg, source)


def _check_domains(cfg: Config, source: str) -> None:
    """Each entry of 'domains' is a valid domain spec (datasets/domains.py) whose name is no dataset's."""
    if cfg.domains is None:
        return
    from datasets import DATASET_ALIASES
    from datasets.domains import DomainSpec, check_domain

    for name, raw in cfg.domains.items():
        where = f"{source}: config key 'domains', entry '{name}'"
        if name in DATASET_ALIASES or "." in name or not name.strip() or "/" in name:
            raise ConfigError(f"{where}: a domain needs a name of its own, without '.' or '/', that is not a "
                              f"dataset's ({', '.join(DATASET_ALIASES)}); it names the run folders. Fix: rename it, "
                              f"e.g. \"interval\".")
        if isinstance(raw, dict) and "sampler" not in raw:
            raise ConfigError(f"{where}: every domain names its 'sampler' (uniform, normal, file or dataset); "
                              f"got keys {sorted(raw)}.")
        spec = validate_schema(raw, DomainSpec, where)
        check_domain(name, spec, where)


# config.json's one-run keys -> the config's lists, by form (coders.form.CodeForm.run_keys; these two, old names)
RUN_KEYS, NWORKER_RUN_KEYS = FORMS["systematic"].run_keys(), FORMS["nworker"].run_keys()


def read_run_folder(folder: str | Path, schema: type, overrides: Optional[dict] = None) -> tuple[dict, Path]:
    """The keys of ``schema`` in a run folder's ``config.json`` (as a one-run config's lists), and the folder;
    the folder's code directories go on ``sys.path``. The values are the caller's to check."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"'{folder}' is a folder without config.json, so it is not a run folder. Fix: pass "
                          f"a config file, or the folder that holds the run's config.json and checkpoints.")
    try:
        saved = json.loads(path.read_text())
        raw = {key: saved[key] for key in get_type_hints(schema) if key in saved}
        for one, many in form_of_record(saved).run_keys().items():  # an N-worker run's N and S, else r
            raw[many] = [saved[one]]
        raw["enc_dec_types"] = [[saved["encoder"], saved["decoder"]]]
        raw["seeds"] = [saved["run_seed"]] if saved.get("run_seed") is not None else None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"Run config '{path}' is damaged ({exc!r}). Fix: restore it, or rerun the "
                          f"original config file with --resume.") from None
    raw.update(overrides or {})
    code_dirs = saved.get("code_dirs", [])
    for code_dir in code_dirs if isinstance(code_dirs, list) else []:
        if isinstance(code_dir, str) and Path(code_dir).is_dir():
            add_code_dir(code_dir)
    return raw, folder


def load_code_config(folder: str | Path) -> tuple[CodeConfig, Path]:
    """The computation's keys of a run folder's ``config.json``, checked, and the folder (what
    :func:`coders.code.load_code` rebuilds the code from; training keys are left to the trainer)."""
    raw, folder = read_run_folder(folder, CodeConfig)
    source = f"run config '{Path(folder) / 'config.json'}'"
    cfg = validate_schema(raw, CodeConfig, source)
    check_code_values(cfg, source)
    return cfg, folder


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
