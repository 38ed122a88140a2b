"""Checks that run before any work: every class path imports and every coder accepts its k, r and sizes."""
from __future__ import annotations

import os

import torch
from torch import nn

from base_models import MODEL_ALIASES
from base_models.train import check_weights_path
from datasets import DATASET_ALIASES
from train.config import Config, RunSpec
from train.losses import LOSS_ALIASES, target_kind
from util.classpath import build, import_class, spec_name, split_spec
from util.errors import ConfigError

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
    """Raise ConfigError for the first problem found in ``cfg``; build nothing that costs memory."""
    for spec in cfg.datasets:
        _importable(spec, "datasets", DATASET_ALIASES)
    for spec in cfg.models:
        _importable(spec, "models", MODEL_ALIASES)
    if cfg.parity_model is not None:
        _importable(cfg.parity_model, "parity_model", MODEL_ALIASES)
    for spec in cfg.losses:
        try:
            loss = build(spec, "losses", aliases=LOSS_ALIASES)
        except TypeError as exc:
            raise ConfigError(f"Config key 'losses': {spec!r} could not be built ({exc}).") from None
        if not callable(loss):
            raise ConfigError(f"Config key 'losses': {spec!r} is not a loss module.")
        probe_loss(loss, spec)
    opt_cls = _importable(cfg.optimizer, "optimizer")
    if not (isinstance(opt_cls, type) and issubclass(opt_cls, torch.optim.Optimizer)):
        raise ConfigError(f"Config key 'optimizer': {split_spec(cfg.optimizer, 'optimizer')[0]} is not a "
                          f"torch.optim.Optimizer class.")
    try:
        build(cfg.optimizer, "optimizer", [nn.Parameter(torch.zeros(1))])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Config key 'optimizer': its 'args' are not accepted ({exc}).") from None
    if cfg.base_model_file is not None:
        check_weights_path(cfg.base_model_file, cfg.base_model_dir)
    if cfg.train_parity_model and cfg.parity_model_init == "base" and cfg.parity_model is not None \
            and any(cfg.parity_model != m for m in cfg.models):
        raise ConfigError("Config key 'parity_model_init': \"base\" copies F's weights into the parity model, "
                          "so 'parity_model' must be F's architecture. Fix: use \"random\" or drop 'parity_model'.")
    from train.engine import build_coders

    for run in runs:
        for cspec in (run.encoder, run.decoder):
            cls = _importable(cspec, "enc_dec_types")
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise ConfigError(f"Config key 'enc_dec_types': {split_spec(cspec, 'enc_dec_types')[0]} is not "
                                  f"an nn.Module subclass (see coders/coder.py for the contract).")
        known = KNOWN_SHAPES.get(run.dataset)
        if known is not None:
            for key, mspec in (("models", run.model), ("parity_model", cfg.parity_model)):
                if mspec is None:
                    continue
                try:
                    with torch.device("meta"):
                        build(mspec, key, aliases=MODEL_ALIASES, in_shape=known[0], num_classes=known[1])
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"Config key '{key}': {split_spec(mspec, key)[0]} could not be built for "
                                      f"{run.dataset} ({exc}). Fix: check its 'args'; base models are built as "
                                      f"cls(in_shape=(C, H, W), num_classes=n, **args).") from None
            try:
                with torch.device("meta"):  # checks shapes and arguments without allocating weights
                    coders = build_coders(run, known[0], known[1])
            except (NotImplementedError, RuntimeError):
                coders = build_coders(run, known[0], known[1])  # a coder computing its constants needs real tensors
            check_coder_size(run, coders)


def probe_loss(loss, spec) -> None:
    """Call ``loss`` once as the engine will, so a module that is not a loss (or wants
    other targets) fails here with its key named rather than in the first step."""
    kind = target_kind(loss)
    name = split_spec(spec, "losses")[0]
    if kind not in ("base", "label"):
        raise ConfigError(f"Config key 'losses': {name} has target_kind {kind!r}; it must be \"base\" (compared "
                          f"with F's outputs) or \"label\" (compared with class indices).")
    recon = torch.randn(4, 10, requires_grad=True)
    target = torch.randn(4, 10) if kind == "base" else torch.arange(4)
    try:
        out = loss(recon, target)
        if isinstance(out, torch.Tensor) and out.numel() == 1:
            out.backward()
    except Exception as exc:  # a foreign module can raise anything here
        raise ConfigError(f"Config key 'losses': {name} is not usable as a loss: called as loss(reconstruction "
                          f"(4, 10), {'outputs of F (4, 10)' if kind == 'base' else 'labels (4,)'}) it raised "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Fix: name a "
                          f"loss class (see the config reference in README.md).") from None
    if not (isinstance(out, torch.Tensor) and out.numel() == 1 and out.requires_grad):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"Config key 'losses': {name} returned {got} for a batch of 4 rows; a loss must return "
                          f"one differentiable number (use reduction 'mean' or 'sum').")


def memory_bytes() -> int:
    """This machine's physical memory (0 when the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.0f} GiB" if n >= 2 ** 30 else f"{n / 2**20:.0f} MiB"


def check_coder_size(run: RunSpec, coders) -> None:
    """Refuse a run whose encoder and decoder cannot fit in memory with their gradients and
    Adam's two moments (4 copies), e.g. an MLP code with a huge k, before anything is allocated."""
    numel = sum(p.numel() for m in coders for p in m.parameters())
    need = 4 * numel * 4
    have = memory_bytes()
    if have and need > have:
        raise ConfigError(f"Config key 'k_vals': the run with k={run.k}, r={run.r} and {spec_name(run.encoder)}/"
                          f"{spec_name(run.decoder)} on {run.dataset} has {numel:,} coder parameters, about "
                          f"{_size(need)} with gradients and optimizer state, more than this machine's "
                          f"{_size(have)}. Fix: lower k_vals or r_vals, or pick a smaller coder.")


def check_data(cfg: Config) -> None:
    """Load every dataset of the sweep once (cached for the runs), so a missing
    file stops the command before the first run rather than in the middle."""
    from datasets import load_dataset

    for spec in cfg.datasets:
        load_dataset(spec, cfg.data_dir, cfg.download, cfg.val_size, cfg.seed)
