"""The one declared config schema.

Every key is declared once in :class:`Config` with its type, default and a
comment. :func:`load_config` rejects unknown keys (with a did-you-mean),
wrong types and impossible values before any work starts, and
:func:`expand_runs` turns the lists into one :class:`RunSpec` per combination. What depends on the
config's ``form`` (its keys' checks, the sizes it sweeps) is the form's (coders/form.py).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

from coders.form import FORMS, RunSpec, check_forms, expand_runs, form_named, form_of_record  # noqa: F401
from util.classpath import CODE_DIRS, add_code_dir, split_spec  # noqa: F401  (CODE_DIRS: re-exported)
from util.errors import ConfigError, UserError

Spec = Union[str, dict]

DEFAULT_OPTIMIZER = {"class": "torch.optim.Adam", "args": {"lr": 1e-3, "weight_decay": 1e-5}}


@dataclass
class Config:
    # -- the block users copy from the original write-ups --
    num_epoch: int                      # training epochs per run (0: evaluate only)
    k_vals: list[int]                   # numbers of data inputs per group to sweep
    enc_dec_types: list[list[Spec]]     # [encoder, decoder] class-path pairs to sweep
    datasets: list[str]                 # digits, mnist, fashion-mnist, cifar10, cifar100, diabetes, a class
                                        # path, or the name of an entry of 'domains'
    models: list[Spec]                  # base models F: base-mlp, logistic, lenet5, resnet18, or a class path
                                        # to an nn.Module class or to a plain torch function
                                        # (base_models/functions.py)
    losses: list[Spec]                  # mse, kl, xent or a class path such as torch.nn.MSELoss
    train_encoder: bool = True          # update the encoder's parameters
    train_parity_model: bool = False    # learn new models F_P for the parities (else parities go through F)
    train_decoder: bool = True          # update the decoder's parameters
    # -- optional --
    r_vals: list[int] = field(default_factory=lambda: [1])  # numbers of parities to sweep
    batch_size: int = 64                # groups of k inputs per training step
    epoch_groups: str = "images"        # "images": N groups per epoch (each image leads one group and
                                        # sits in k); "disjoint": N/k groups (each image once)
    eval_batch_size: int = 1024         # groups per evaluation step
    optimizer: Spec = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_OPTIMIZER)))
    lr_schedule: str = "constant"       # the optimizer's lr over the run, set before every step from the
                                        # step's place in num_epoch: "constant", "cosine" (to 0), "linear"
                                        # (to 0), "step" (x0.1 at 50% and again at 75%); train/schedule.py
    seed: int = 0                       # same seed: same splits, same initialisation, same numbers
    seeds: Optional[list[int]] = None   # sweep these training seeds (coder initialisation, data order);
                                        # each gets a seed<s> folder; splits and F stay those of 'seed'
    data_dir: Optional[str] = None      # dataset folder; else $LCC_DATA_DIR; else ./data
    download: bool = True               # download missing datasets through torchvision
    save_dir: str = "save"              # run folders go under save_dir/<dataset>/<model>/k<k>/r<r>/...
    val_size: Optional[int] = None      # validation images carved from the training split (default N/12)
    device: str = "auto"                # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    domains: Optional[dict] = None      # inputs drawn instead of read: {name: {"sampler": "uniform" | "normal"
                                        # | "file" | "dataset", ...}}, each name then listed in 'datasets'
                                        # (keys: datasets/domains.py DomainSpec; docs/any-function.md)
    task: str = "auto"                  # how outputs are scored: "classification" (accuracies and errors),
                                        # "regression" (errors only); "auto": classification on a labelled
                                        # dataset, regression on a domain or a regression set
    base_model_file: Optional[str] = None   # F's weights; default base_model_dir/<dataset>/<model>/model.pt
    base_model_dir: str = "base_model_trained_files"  # where F is trained to when its file is missing
    base_model_epochs: int = 20         # epochs when F has to be trained first
    parity_model: Optional[Spec] = None     # architecture of F_P (default: F's)
    parity_model_init: str = "random"   # "random" or "base" (start F_P from F's weights)
    augment: Optional[bool] = None      # random crop + flip on encoder inputs (default: on for CIFAR)
    progress: bool = True               # per-epoch progress bar
    num_threads: Optional[int] = None   # CPU threads for torch (default: torch's, one per core)
    scenario_power: float = 1.0         # a scenario with u data outputs missing weighs u**p in the loss: 1 weighs
                                        # every missing data output alike, 0 every scenario alike, 2 puts the
                                        # scenarios with more data outputs missing up (train/losses.py)
    flush_denormal: bool = True         # CPU arithmetic reads and writes floats below ~1.2e-38 as zero:
                                        # subnormals are many times slower on x86 (util.hardware.flush_denormals)
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


CHOICES = {"parity_model_init": ("random", "base"), "epoch_groups": ("images", "disjoint"),
           "lr_schedule": ("constant", "cosine", "linear", "step"),
           "task": ("auto", "classification", "regression"), "form": tuple(FORMS)}
REQUIRED = [f.name for f in dataclasses.fields(Config) if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]


def _type_ok(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin is Union:
        return any(_type_ok(value, h) for h in get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (inner,) = get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", dict: "an object",
             type(None): "null", float: "a number", list: "a list"}
    origin = get_origin(hint)
    if origin is Union:
        args = get_args(hint)
        if set(args) == {str, dict}:
            return "a class path string or {\"class\": ..., \"args\": {...}}"
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return names.get(hint, str(hint))


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
                              f"{', '.join(repr(key) for key in form_named(cfg.form).sweep_keys)} or 'seeds'. "
                              f"Fix: list each value once.")
        seen[folder] = spec.describe()


def validate_schema(raw: Any, schema: type, source: str = "config"):
    """Build the dataclass ``schema`` from ``raw`` after checking its keys and types.

    The machinery every lcc config shares (training, serving): unknown keys get a
    did-you-mean, missing required keys and wrong types a sentence naming the key.
    Value checks beyond types are the caller's.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a JSON object of keys; got {type(raw).__name__}.")
    hints = get_type_hints(schema)
    required = [f.name for f in dataclasses.fields(schema) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    for key in raw:
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            maybe = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'.{maybe} Known keys: {', '.join(hints)}.")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ConfigError(f"{source}: missing required config key(s) {', '.join(missing)}. "
                          f"See the config reference in README.md.")
    for key, value in raw.items():
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{source}: config key '{key}' must be {_type_name(hints[key])}; "
                              f"got {json.dumps(value)}.")
    return schema(**raw)


def _check_values(cfg: Config, source: str) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{source}: config key '{key}' {msg}")

    if cfg.num_epoch < 0:
        raise bad("num_epoch", f"must be 0 or more; got {cfg.num_epoch}.")
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
    if cfg.num_threads is not None and cfg.num_threads < 1:
        raise bad("num_threads", f"must be 1 or more; got {cfg.num_threads}.")
    for key in ("batch_size", "eval_batch_size", "base_model_epochs"):
        if getattr(cfg, key) < 1:
            raise bad(key, f"must be 1 or more; got {getattr(cfg, key)}.")
    if not 0 <= cfg.seed < 2 ** 63:  # torch's generators take a 64-bit seed; a negative one aliases another
        raise bad("seed", f"must be an integer from 0 to 2**63 - 1; got {cfg.seed}.")
    if cfg.seeds is not None:
        if not cfg.seeds or any(not 0 <= s < 2 ** 63 for s in cfg.seeds) or len(set(cfg.seeds)) < len(cfg.seeds):
            raise bad("seeds", f"must list distinct integers from 0 to 2**63 - 1 (or be null); got {cfg.seeds}.")
    for key in ("save_dir", "base_model_dir"):  # "" would scatter folders over the current directory
        if not getattr(cfg, key).strip():
            raise bad(key, f"must name a folder (e.g. {getattr(Config, key)!r}); got {getattr(cfg, key)!r}.")
    if not -8.0 <= cfg.scenario_power <= 8.0:
        raise bad("scenario_power", f"must be a number from -8 to 8 (1 weighs every missing data output alike, "
                                    f"0 every scenario alike); got {cfg.scenario_power}.")
    if cfg.val_size is not None and cfg.val_size < 1:
        raise bad("val_size", f"must be 1 or more; got {cfg.val_size}.")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise bad(key, f"must be one of {', '.join(map(repr, allowed))}; got {getattr(cfg, key)!r}.")
    check_forms(cfg, bad)  # the form's own keys (coders/form.py)
    for key in ("optimizer", "parity_model"):
        if getattr(cfg, key) is not None:
            split_spec(getattr(cfg, key), key)
    for key in ("datasets", "models", "losses"):
        for spec in getattr(cfg, key):
            split_spec(spec, key)
    for pair in cfg.enc_dec_types:
        for spec in pair:
            split_spec(spec, "enc_dec_types")
    _check_domains(cfg, source)
    if cfg.device != "auto":
        import torch

        try:
            dev = torch.device(cfg.device)
        except RuntimeError:
            raise bad("device", f"is not a device name; use \"auto\", \"cpu\" or \"cuda\"; got {cfg.device!r}.") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise bad("device", "asks for CUDA, but this machine has no usable GPU; use \"auto\" or \"cpu\".")


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


def parse_overrides(pairs: list[str]) -> dict:
    """``["num_epoch=3", "k_vals=[2]"]`` -> ``{"num_epoch": 3, "k_vals": [2]}`` (values are JSON, else strings)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE (VALUE in JSON, e.g. num_epoch=3 or k_vals=[2,3]); got '{pair}'.")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _refuse_duplicates(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(ValueError):
    pass


def read_json_config(path: Path, example: str) -> Any:
    """The parsed JSON of a config file; a missing file, bad JSON or a key given twice
    (JSON would silently keep the last) is a ConfigError naming the file."""
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist. Fix: pass the path of a JSON file, {example}.")
    try:
        return json.loads(path.read_text(), object_pairs_hook=_refuse_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"Config file '{path}' is not valid JSON: {exc.msg} at line {exc.lineno}, "
                          f"column {exc.colno}.") from None
    except _DuplicateKey as exc:
        raise ConfigError(f"Config file '{path}' gives the key '{exc}' more than once (JSON would keep only the "
                          f"last). Fix: keep one of them.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Config file '{path}' is not text (UTF-8). Fix: pass a JSON file, {example}.") from None


def load_run_folder(folder: str | Path, overrides: Optional[dict] = None) -> tuple[Config, Path]:
    """The one-run config stored in a run folder's ``config.json``, and the folder."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"'{folder}' is a folder without config.json, so it is not a run folder. Fix: pass "
                          f"a config file, or the folder that holds the run's config.json and checkpoints.")
    try:
        saved = json.loads(path.read_text())
        raw = {key: saved[key] for key in get_type_hints(Config) if key in saved}
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
    return validate_dict(raw, source=f"run config '{path}'"), folder


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
