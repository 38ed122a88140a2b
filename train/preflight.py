"""Checks that run before any work: every class path imports and every coder accepts its k, r and sizes."""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
from torch import nn

from base_models import MODEL_ALIASES
from base_models.fit import check_weights_path
from base_models.functions import construct
from datasets import DATASET_ALIASES
from coders.build import build_coders, probe_coders
from coders.form import form_named
from train.config import DEFAULT_OPTIMIZER, Config, RunSpec
from train.losses import LOSS_ALIASES, TARGET_KINDS, target_kind
from util.classpath import build, call_user, describe_exception, import_class, spec_name, split_spec
from util.checks import check_device, check_writable_folder  # noqa: F401  (re-exported: train.preflight.check_device)
from util.errors import ConfigError
from util.memory import available_memory as memory_bytes  # the one memory probe (util/memory.py)
from util.memory import check_memory, size as _size
from util.shapes import get_flattened_dim

# Input shapes and class counts of the shipped datasets, so coders can be
# checked before a dataset is read.
KNOWN_SHAPES = {
    "digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100),
}


def _importable(spec, key: str, aliases=None):
    path, _ = split_spec(spec, key)
    return import_class(path, key, aliases)


def preflight(cfg: Config, runs: list[RunSpec]) -> None:
    """Raise ConfigError for the first problem found in ``cfg``, for every run of the sweep, before
    any data or F is loaded; coders and base models are built and called on a few inputs."""
    check_machine(cfg)
    for spec in cfg.datasets:
        if spec not in (cfg.domains or {}):  # a domain is drawn, not imported (checked by check_data)
            _importable(spec, "datasets", DATASET_ALIASES)
    for spec in cfg.models:
        _importable(spec, "models", MODEL_ALIASES)
    if cfg.parity_model is not None:
        _importable(cfg.parity_model, "parity_model", MODEL_ALIASES)
    for spec in cfg.losses:
        name = split_spec(spec, "losses")[0]
        try:
            loss = call_user("losses", f"building the loss {name}", build, spec, "losses", aliases=LOSS_ALIASES,
                             fix="check its 'args' against its constructor.")
        except TypeError as exc:
            raise ConfigError(f"Config key 'losses': {spec!r} could not be built ({exc}).") from None
        if not callable(loss):
            raise ConfigError(f"Config key 'losses': {spec!r} is not a loss module.")
        probe_loss(loss, spec)
    check_optimizer(cfg)
    if cfg.base_model_file is not None:
        check_weights_path(cfg.base_model_file, cfg.base_model_dir)
    if cfg.train_parity_model and cfg.parity_model_init == "base" and cfg.parity_model is not None \
            and any(cfg.parity_model != m for m in cfg.models):
        raise ConfigError("Config key 'parity_model_init': \"base\" copies F's weights into the parity model, "
                          "so 'parity_model' must be F's architecture. Fix: use \"random\" or drop 'parity_model'.")
    import_class(form_named(cfg.form).probe, "form")(cfg, runs)  # the form's coders, before any data


def probe_sweep_coders(cfg: Config, runs: list[RunSpec]) -> None:
    """The systematic form's probe of a sweep (coders.form.SystematicForm.probe): every k, r has few enough
    scenarios, every coder is an nn.Module, and on a dataset of known sizes F, the parity model and the
    coders are built and called."""
    for run in runs:
        check_scenario_count(run, cfg)
    probed: set = set()
    for run in runs:
        for cspec in (run.encoder, run.decoder):
            cls = _importable(cspec, "enc_dec_types")
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise ConfigError(f"Config key 'enc_dec_types': {split_spec(cspec, 'enc_dec_types')[0]} is not "
                                  f"an nn.Module subclass (see coders/coder.py for the contract).")
        known = KNOWN_SHAPES.get(run.dataset)
        if known is not None:
            for key, mspec in (("models", run.model), ("parity_model", cfg.parity_model)):
                if mspec is not None and (key, _key(mspec), run.dataset) not in probed:
                    probed.add((key, _key(mspec), run.dataset))
                    probe_model(key, mspec, run.dataset, *known)
            try:
                with torch.device("meta"):  # checks shapes and arguments without allocating weights
                    coders = build_coders(run, known[0], known[1])
            except (NotImplementedError, RuntimeError):
                coders = None  # a coder computing its constants needs real tensors
            except ConfigError:
                raise
            except Exception:  # let the real build below name the error
                coders = None
            if coders is not None:
                check_coder_size(run, coders)
            probe_run_coders(run, known[0], known[1], probed)


def _key(spec) -> str:
    return json.dumps(spec, sort_keys=True)


def probe_run_coders(run: RunSpec, in_shape, n_out: int, probed: set) -> None:
    """Build ``run``'s encoder and decoder on the CPU and call them as training will (once per
    distinct coder pair, k, r and sizes in the sweep)."""
    key = ("coders", _key(run.encoder), _key(run.decoder), run.k, run.r, tuple(in_shape), n_out)
    if key in probed:
        return
    probed.add(key)
    names = f"{spec_name(run.encoder)}/{spec_name(run.decoder)}"
    coders = call_user("enc_dec_types", f"building the coders {names} for k={run.k}, r={run.r}", build_coders,
                       run, in_shape, n_out, fix="check the coder's constructor and its 'args'.")
    check_coder_size(run, coders)
    probe_coders(*coders, run.k, run.r, get_flattened_dim([-1, *in_shape]), n_out)


def probe_model(key: str, spec, dataset: str, in_shape, num_classes: int) -> None:
    """Build a base model (F or the parity model's architecture) for ``dataset`` and run it on two
    images, so a constructor or forward that fails, or an output that is not (B, n), is named here."""
    name = split_spec(spec, key)[0]
    try:
        with torch.device("meta"):  # arguments first, without allocating weights
            construct(spec, key, MODEL_ALIASES, in_shape, num_classes)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Config key '{key}': {name} could not be built for {dataset} ({exc}). Fix: check its "
                          f"'args'; base models are built as cls(in_shape=(C, H, W), num_classes=n, **args).") from None
    except Exception:  # meta tensors do not support everything; the real build below names real errors
        pass
    model = call_user(key, f"building {name} for {dataset}", construct, spec, key, MODEL_ALIASES, in_shape,
                      num_classes, fix="base models are built as cls(in_shape=(C, H, W), num_classes=n, **args).")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"Config key '{key}': {name} built a {type(model).__name__}, not an nn.Module.")
    with torch.no_grad():
        out = call_user(key, f"{name}, called in eval mode on 2 images of shape {tuple(in_shape)},",
                        model.eval(), torch.zeros(2, *in_shape), fix="its forward must take a (B, C, H, W) batch.")
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"Config key '{key}': {name} returned {got} for 2 images of {dataset}; a base model "
                          f"returns one row of class scores per image, (B, n).")


def check_optimizer(cfg: Config) -> None:
    """The optimizer class exists, accepts its args and can take a plain ``step()`` on dense gradients."""
    name = split_spec(cfg.optimizer, "optimizer")[0]
    opt_cls = _importable(cfg.optimizer, "optimizer")
    if not (isinstance(opt_cls, type) and issubclass(opt_cls, torch.optim.Optimizer)):
        raise ConfigError(f"Config key 'optimizer': {name} is not a torch.optim.Optimizer class.")
    args = cfg.optimizer.get("args") or {} if isinstance(cfg.optimizer, dict) else {}
    for key, value in args.items():  # torch refuses a NaN or negative rate, but takes an infinite one
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"Config key 'optimizer': its arg '{key}' is {value}, and training with it would "
                              f"fail at the first step. Fix: a finite number (the default 'lr' is "
                              f"{DEFAULT_OPTIMIZER['args']['lr']:g}).")
    param = nn.Parameter(torch.zeros(3))
    try:
        opt = build(cfg.optimizer, "optimizer", [param])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Config key 'optimizer': its 'args' are not accepted ({exc}).") from None
    except Exception as exc:
        raise ConfigError(f"Config key 'optimizer': {name} could not be built ({describe_exception(exc)}).") from None
    try:
        (param - 1).pow(2).sum().backward()
        opt.step()
    except Exception as exc:
        raise ConfigError(
            f"Config key 'optimizer': {name} cannot train here: lcc calls optimizer.step() after each backward "
            f"pass on dense gradients, and {name} raised {describe_exception(exc)} (LBFGS needs a closure, "
            f"SparseAdam sparse gradients). Fix: use torch.optim.Adam, AdamW or SGD, or a class with a plain "
            f"step().") from None


def check_machine(cfg: Config) -> None:
    """The device can hold tensors, num_threads is sane and the output folders are writable folders."""
    if cfg.device != "auto":
        check_device(cfg.device)
    cores = os.cpu_count() or 1
    if cfg.num_threads is not None and cfg.num_threads > MAX_THREADS_PER_CORE * cores:
        raise ConfigError(f"Config key 'num_threads': {cfg.num_threads} threads on a machine with {cores} cores "
                          f"would only slow torch down. Fix: use at most {cores} (or null for one per core).")
    for key in ("save_dir", "base_model_dir"):
        check_writable_folder(getattr(cfg, key), key)


MAX_THREADS_PER_CORE = 4


def check_scenario_count(run: RunSpec, cfg: Config) -> None:
    """Refuse a k, r whose C(k + r, r) - 1 unavailability scenarios are too many to enumerate and decode:
    each evaluation batch decodes every scenario at once."""
    count = math.comb(run.k + run.r, run.r) - 1
    if count <= MAX_SCENARIOS:
        return
    # Decoder inputs of one evaluation batch: scenarios x groups x (k + r) outputs of >= 10 floats.
    need = count * cfg.eval_batch_size * (run.k + run.r) * 10 * 4
    raise ConfigError(f"Config key 'k_vals'/'r_vals': k={run.k}, r={run.r} has C({run.k + run.r}, {run.r}) - 1 = "
                      f"{count:,} unavailability scenarios, all trained and evaluated at once: one evaluation "
                      f"batch alone would need about {_size(need)} of decoder inputs (this machine has "
                      f"{_size(memory_bytes()) if memory_bytes() else 'an unknown amount'}), and listing them "
                      f"takes {_size(count * (run.k + run.r))} and hours. Fix: lower k_vals or r_vals (at most "
                      f"{MAX_SCENARIOS:,} scenarios).")


MAX_SCENARIOS = 100_000


def probe_loss(loss, spec) -> None:
    """Call ``loss`` once as the engine will, so a module that is not a loss (or wants
    other targets) fails here with its key named rather than in the first step."""
    kind = target_kind(loss)
    name = split_spec(spec, "losses")[0]
    if kind not in TARGET_KINDS:
        raise ConfigError(f"Config key 'losses': {name} has target_kind {kind!r}; it must be \"base\" (compared "
                          f"with F's outputs), \"label\" (compared with class indices) or \"both\" (called "
                          f"as loss(reconstruction, outputs of F, labels)).")
    recon = torch.randn(4, 10, requires_grad=True)
    targets = {"base": (torch.randn(4, 10),), "label": (torch.arange(4),),
               "both": (torch.randn(4, 10), torch.arange(4))}[kind]
    try:
        out = loss(recon, *targets)
        if isinstance(out, torch.Tensor) and out.numel() == 1:
            out.backward()
    except Exception as exc:  # a foreign module can raise anything here
        raise ConfigError(f"Config key 'losses': {name} is not usable as a loss: called as loss(reconstruction "
                          f"(4, 10), { {'base': 'outputs of F (4, 10)', 'label': 'labels (4,)', 'both': 'outputs of F (4, 10), labels (4,)'}[kind]}) it raised "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Fix: name a "
                          f"loss class (see the config reference in README.md).") from None
    if not (isinstance(out, torch.Tensor) and out.numel() == 1 and out.requires_grad):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"Config key 'losses': {name} returned {got} for a batch of 4 rows; a loss must return "
                          f"one differentiable number (use reduction 'mean' or 'sum').")


def check_coder_size(run: RunSpec, coders) -> None:
    """Refuse a run whose encoder and decoder cannot fit in memory with their gradients and
    Adam's two moments (4 copies), e.g. an MLP code with a huge k, before anything is allocated."""
    numel = sum(p.numel() for m in coders for p in m.parameters())
    check_memory(4 * numel * 4, f"the run with k={run.k}, r={run.r} and {spec_name(run.encoder)}/"
                 f"{spec_name(run.decoder)} on {run.dataset} ({numel:,} coder parameters, with their gradients "
                 f"and optimizer state)", "k_vals", "lower k_vals or r_vals, or pick a smaller coder.",
                 have=memory_bytes)


def check_data(cfg: Config, runs: Optional[list[RunSpec]] = None) -> None:
    """Load every dataset of the sweep once (cached for the runs), so a missing file or a dataset
    function that fails or returns the wrong things stops the command before the first run rather
    than in the middle; the coders of ``runs`` on a dataset of unknown sizes are probed here. On a
    domain or a regression set, every F of the sweep is run on the inputs first (probe_function)."""
    from base_models.fit import output_size
    from datasets import load_data
    from train.engine import resolve_task

    probed: set = set()
    for spec in cfg.datasets:
        name = split_spec(spec, "datasets")[0]
        domain = spec in (cfg.domains or {})
        splits = call_user("domains" if domain else "datasets", f"{'drawing the domain' if domain else 'loading the dataset'} "
                           f"{name}", load_data, spec, cfg.data_dir, cfg.download, cfg.val_size, cfg.seed,
                           cfg.domains, fix="a dataset function returns (train_x, train_y, test_x, test_y, "
                           "num_classes) with float inputs (N, ...) and int64 labels (README, 'A dataset').")
        check_splits(name, splits)
        task = resolve_task(cfg.task, splits)
        sized = {}
        if splits.num_classes is None or task == "regression":
            for model in cfg.models:
                sized[_key(model)] = probe_function(model, spec, splits, cfg, domain)
                if cfg.train_parity_model:
                    probe_parity_model(cfg, model, spec, splits, sized[_key(model)])
        for run in runs or []:
            if run.dataset != spec:
                continue
            if task == "regression":
                loss = build(run.loss, "losses", aliases=LOSS_ALIASES)
                if target_kind(loss) == "label":
                    raise ConfigError(f"Config key 'losses': {split_spec(run.loss, 'losses')[0]} compares "
                                      f"reconstructions with class labels, but F on '{name}' has no classes "
                                      f"('task' {task}). Fix: use a loss against F's outputs, such as \"mse\".")
            if spec not in KNOWN_SHAPES or sized:
                n_out = sized.get(_key(run.model), output_size(splits))
                if n_out is not None:
                    probe_run_coders(run, splits.input_shape, n_out, probed)


PROBE_ROWS = 16  # inputs an F with weights is run on to check its output shape before it is trained


def probe_parity_model(cfg: Config, model_spec, dataset, splits, n_out: int) -> None:
    """The parity models of F on ``splits`` (no classes) can learn: an architecture with parameters,
    built with F's ``n_out`` outputs, that returns (B, n_out) on a few inputs."""
    from base_models.fit import build_base_model, has_weights

    arch = cfg.parity_model or model_spec
    name = split_spec(arch, "parity_model")[0]
    model = call_user("parity_model", f"building the parity model {name} for '{dataset}'", build_base_model, arch,
                      splits, "parity_model", out_size=n_out,
                      fix="a parity model class is built as cls(in_shape=..., num_classes=n, **args) with F's n.")
    if not has_weights(model):
        raise ConfigError(f"Config key 'parity_model': {name} has no parameters (a plain function), so "
                          f"\"train_parity_model\": true has nothing to train. Fix: name a network class as "
                          f"'parity_model', e.g. \"base_models.tabular.TabularMLP\" for vector inputs.")
    x = splits.train_x[:2]
    with torch.no_grad():
        out = call_user("parity_model", f"the parity model {name}, called on 2 inputs of '{dataset}',",
                        model.eval(), x, fix="it must map (B, *input_shape) to (B, n), n being F's outputs.")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_out):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"Config key 'parity_model': {name} returned {got} for 2 inputs of '{dataset}'; it "
                          f"must return F's {n_out} outputs per input, (B, {n_out}).")


def probe_function(model_spec, dataset, splits, cfg: Config, domain: bool) -> int:
    """Run F on the inputs of ``splits`` (a domain or a regression set) and return its output width n.

    A plain function (no weights: F as it will be) runs on every input of every split, so an output
    of the wrong shape, or NaN or infinite values anywhere on the domain, are named here; an F with
    weights (trained or loaded later) runs on a few inputs, for its output shape alone."""
    from base_models.fit import build_base_model, has_weights

    name = split_spec(model_spec, "models")[0]
    where = f"the domain '{dataset}'" if domain else f"the dataset '{dataset}'"
    model = call_user("models", f"building {name} for {where}", build_base_model, model_spec, splits,
                      fix="a class is built as cls(in_shape=..., num_classes=n, **args); a plain function is "
                      "called as fn(x, **args) (docs/any-function.md).")
    model.eval()
    full = not has_weights(model)
    width = None
    for split in ("train", "val", "test"):
        x = splits.split(split)[0]
        rows = x if full else x[:PROBE_ROWS]
        bad_rows, first = 0, None
        for i in range(0, len(rows), cfg.eval_batch_size):
            batch = rows[i:i + cfg.eval_batch_size]
            with torch.no_grad():
                out = call_user("models", f"F ({name}), called on {len(batch)} inputs of shape "
                                f"{list(batch.shape[1:])} from {where},", model, batch,
                                fix=f"F must map a batch (B, {', '.join(map(str, batch.shape[1:]))}) to one output "
                                "row per input, (B, n) (a function may return (B, ...): it is flattened).")
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(batch) \
                    or not out.is_floating_point():
                got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
                raise ConfigError(f"Config key 'models': F ({name}) returned {got} for {len(batch)} inputs of "
                                  f"{where}; it must return one row of real outputs per input, float (B, n). "
                                  f"Fix: correct F's output shape, or the domain's 'shape'.")
            if width is not None and out.shape[1] != width:
                raise ConfigError(f"Config key 'models': F ({name}) returned {out.shape[1]} outputs per input "
                                  f"for some inputs of {where} and {width} for others; it must return the same "
                                  f"number for every input.")
            width = int(out.shape[1])
            bad = ~torch.isfinite(out).all(1)
            if first is None and bool(bad.any()):
                first = batch[bad.nonzero()[0, 0]].flatten()[:4].tolist()
            bad_rows += int(bad.sum())
        if bad_rows:  # counted over the whole split, every batch of it
            raise ConfigError(f"Config key 'models': F ({name}) returns NaN or infinite values on {bad_rows} of "
                              f"{'the' if full else 'the first'} {len(rows)} {split} inputs of {where} (the first "
                              f"at {[round(v, 4) for v in first]}{'...' if x[0].numel() > 4 else ''}). Fix: "
                              f"restrict the domain (config key 'domains') to where F is finite, or correct F.")
    return width


def check_splits(name: str, splits) -> None:
    """What a dataset function returned is usable: float inputs (N, ...), int64 labels in range,
    as many labels as inputs, finite values. A regression set (num_classes None) has float
    targets (N,) or (N, m); a domain has none, (N, 0)."""
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"Config key 'datasets': the dataset {name} {msg}. A dataset function returns "
                           f"(train_x, train_y, test_x, test_y, num_classes) with float images (N, C, H, W) and "
                           f"int64 labels in 0..num_classes-1, or float inputs (N, ...), float targets and "
                           f"num_classes None for a regression set (README, 'A dataset').")

    n = splits.num_classes
    regression = n is None
    if not regression and (not isinstance(n, int) or isinstance(n, bool) or n < 2):
        raise bad(f"gives num_classes = {n!r}; it must be an integer of 2 or more (or None for a regression set)")
    for split in ("train", "val", "test"):
        x, y = splits.split(split)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise bad(f"gives {split} data of type {type(x).__name__}/{type(y).__name__}, not tensors")
        if not x.is_floating_point() or x.dim() < 2 or (not regression and x.dim() != 4):
            raise bad(f"gives {split} images of dtype {x.dtype} and shape {tuple(x.shape)}; they must be floating "
                      f"point {'(N, ...)' if regression else '(N, C, H, W)'} (uint8 pixels: divide by 255 first)")
        if regression:
            if not y.is_floating_point() or y.dim() not in (1, 2) or len(y) != len(x):
                raise bad(f"gives {len(x)} {split} inputs with targets of dtype {y.dtype} and shape "
                          f"{tuple(y.shape)}; a regression set has float targets (N,) or (N, m)")
        else:
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise bad(f"gives {len(x)} {split} images with labels of dtype {y.dtype} and shape {tuple(y.shape)}; "
                          f"there must be one int64 label per image")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= n):
                raise bad(f"gives {split} labels from {int(y.min())} to {int(y.max())} with num_classes = {n}")
        if not bool(torch.isfinite(x).all()):
            raise bad(f"gives {split} images holding NaN or infinite values")
