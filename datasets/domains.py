"""Domains: where the inputs X of a function F come from when there is no labelled dataset.

A coded-computing run needs inputs X and F's outputs F(X). For a function
outside machine learning (``x * sin(x)``, a physics kernel) there is no
dataset: the inputs are drawn from F's domain instead, and the targets are
F(X), computed once per run (and per process) like F's outputs on a dataset.

A config declares its domains under the key ``domains``, each by a name that
``datasets`` then lists like a dataset::

    "datasets": ["interval"],
    "domains": {"interval": {"sampler": "uniform", "shape": [1], "low": 0, "high": 10}}

Samplers (:data:`SAMPLERS`):

* ``uniform``: uniform over the box ``[low, high]`` of inputs of shape ``shape``
  (``low`` and ``high`` are numbers, or nested lists that broadcast to ``shape``);
* ``normal``: normal with mean ``mean`` and standard deviation ``std`` (numbers or
  nested lists broadcasting to ``shape``);
* ``file``: the rows of a ``.npy`` array or a ``.pt`` tensor ``(N, *shape)`` at
  ``path`` (relative to the folder the command runs in); ``shape``, when given,
  is checked against the file;
* ``dataset``: the inputs of an existing dataset (``digits``, ``mnist``, a class
  path, ...), labels dropped, with that dataset's own train/validation/test split.

Draws are seeded with the config's ``seed``. ``uniform`` and ``normal`` draw
``n_train + n_val + n_test`` inputs in one stream and redraw any input equal to
an earlier one, so the three splits are disjoint as sets of points (float32
rounding makes repeats possible, if rare). ``file`` shuffles the rows with the
seed and cuts them into test, validation and training rows (disjoint by row;
rows that repeat in the file are the file's own).

A domain's :class:`datasets.splits.Splits` has ``num_classes = None`` and
labels of shape ``(N, 0)``: there are no labels, only F's outputs.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from util.errors import ConfigError, UserError

SAMPLERS = ("uniform", "normal", "file", "dataset")

# Which optional keys each sampler reads; any other key set in its spec is refused.
SAMPLER_KEYS = {
    "uniform": {"shape", "low", "high", "n_train", "n_val", "n_test"},
    "normal": {"shape", "mean", "std", "n_train", "n_val", "n_test"},
    "file": {"path", "shape", "n_train", "n_val", "n_test"},
    "dataset": {"dataset"},
}
DRAWN_SIZES = {"n_train": 8192, "n_val": 1024, "n_test": 1024}  # defaults of uniform and normal


@dataclass
class DomainSpec:
    """One entry of the config key ``domains``: a sampler and its parameters."""

    sampler: str                        # "uniform", "normal", "file" or "dataset"
    shape: Optional[list[int]] = None   # shape of one input, e.g. [1] or [3] or [1, 8, 8]; required
                                        # for uniform and normal, checked against the file for file
    low: Union[float, list] = -1.0      # uniform: lower corner of the box (a number, or nested lists
                                        # that broadcast to 'shape')
    high: Union[float, list] = 1.0      # uniform: upper corner of the box
    mean: Union[float, list] = 0.0      # normal: mean (a number or nested lists broadcasting to 'shape')
    std: Union[float, list] = 1.0       # normal: standard deviation, > 0
    path: Optional[str] = None          # file: a .npy or .pt file of inputs (N, *shape)
    dataset: Optional[str] = None       # dataset: the dataset whose inputs are the domain (its labels
                                        # are dropped; its own train/validation/test split is kept)
    n_train: Optional[int] = None       # training inputs (uniform/normal: 8192; file: the rows left over)
    n_val: Optional[int] = None         # validation inputs (uniform/normal: 1024; file: N // 10)
    n_test: Optional[int] = None        # test inputs (uniform/normal: 1024; file: N // 10)


def check_domain(name: str, spec: DomainSpec, where: str) -> None:
    """A ConfigError naming ``where`` (the config key and entry) unless ``spec`` is a usable domain.

    Only what can be checked without reading files: the file's existence and
    shape are checked by :func:`sample_domain`, before any run starts.
    """
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    if spec.sampler not in SAMPLERS:
        import difflib

        close = difflib.get_close_matches(spec.sampler, SAMPLERS, n=1)
        maybe = f" Did you mean '{close[0]}'?" if close else ""
        raise bad(f"unknown sampler {spec.sampler!r}.{maybe} Samplers: {', '.join(SAMPLERS)} "
                  f"(see docs/any-function.md).")
    defaults = DomainSpec(sampler=spec.sampler)
    stray = [f.name for f in dataclasses.fields(DomainSpec) if f.name != "sampler"
             and getattr(spec, f.name) != getattr(defaults, f.name) and f.name not in SAMPLER_KEYS[spec.sampler]]
    if stray:
        raise bad(f"the sampler {spec.sampler!r} does not read {', '.join(repr(s) for s in stray)}; it reads "
                  f"{', '.join(sorted(SAMPLER_KEYS[spec.sampler]))}. Fix: remove the key(s).")
    if spec.shape is not None and (not spec.shape or any(d < 1 for d in spec.shape)):
        raise bad(f"'shape' must be a non-empty list of positive integers, the shape of one input such as "
                  f"[1] or [3, 8, 8]; got {json.dumps(spec.shape)}.")
    if spec.sampler in ("uniform", "normal") and spec.shape is None:
        raise bad(f"the sampler {spec.sampler!r} needs 'shape', the shape of one input (e.g. [1] for a "
                  f"function of one real number).")
    for key in ("n_train", "n_val", "n_test"):
        value = getattr(spec, key)
        if value is not None and value < 1:
            raise bad(f"'{key}' must be 1 or more; got {value}.")
    if spec.sampler == "uniform":
        low, high = _broadcast(spec.low, spec.shape, "low", bad), _broadcast(spec.high, spec.shape, "high", bad)
        if not bool((low < high).all()):
            raise bad(f"'low' must be below 'high' in every coordinate; got low {json.dumps(spec.low)}, high "
                      f"{json.dumps(spec.high)}.")
    if spec.sampler == "normal":
        _broadcast(spec.mean, spec.shape, "mean", bad)
        if not bool((_broadcast(spec.std, spec.shape, "std", bad) > 0).all()):
            raise bad(f"'std' must be above 0 in every coordinate; got {json.dumps(spec.std)}.")
    if spec.sampler == "file" and not spec.path:
        raise bad("the sampler 'file' needs 'path', a .npy or .pt file of inputs (N, *shape).")
    if spec.sampler == "file" and Path(spec.path).suffix not in (".npy", ".pt"):
        raise bad(f"'path' must name a .npy or .pt file; got {spec.path!r}.")
    if spec.sampler == "dataset" and not spec.dataset:
        raise bad("the sampler 'dataset' needs 'dataset', the name or class path of a dataset whose inputs "
                  "make the domain (e.g. \"digits\").")


def _broadcast(value: Any, shape: list[int], key: str, bad) -> torch.Tensor:
    """``value`` (a number or nested lists) as a float32 tensor of ``shape``; a ConfigError otherwise."""
    try:
        t = torch.as_tensor(value, dtype=torch.float32)
        out = t.expand(*shape).clone()
    except (TypeError, ValueError, RuntimeError):
        raise bad(f"'{key}' must be a number or nested lists that broadcast to 'shape' {json.dumps(shape)}; "
                  f"got {json.dumps(value)}.") from None
    if not bool(torch.isfinite(out).all()):
        raise bad(f"'{key}' must be finite; got {json.dumps(value)}.")
    return out


def _distinct_draws(draw, n: int, gen: torch.Generator, where: str) -> torch.Tensor:
    """``n`` inputs from ``draw(m, gen)``, redrawing (in order) any row equal to an earlier one."""
    x = draw(n, gen)
    for _ in range(100):
        flat = x.reshape(n, -1)
        _, inverse = torch.unique(flat, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), n, dtype=torch.long)
        first = first.scatter_reduce(0, inverse, torch.arange(n), reduce="amin")
        repeat = torch.arange(n) != first[inverse]
        if not bool(repeat.any()):
            return x
        x[repeat] = draw(int(repeat.sum()), gen)
    raise ConfigError(f"{where}: could not draw {n} distinct inputs from this domain (it holds too few float32 "
                      f"values). Fix: widen the box or lower n_train, n_val and n_test.")


def _read_file(path: Path, where: str) -> torch.Tensor:
    if not path.is_file():
        raise ConfigError(f"{where}: the input file '{path}' does not exist. Fix: correct 'path' (it is read "
                          f"relative to the folder the command runs in), or create the file with numpy.save or "
                          f"torch.save of an (N, *shape) array.")
    try:
        if path.suffix == ".npy":
            data = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # numpy and torch raise many types for a foreign file
        raise ConfigError(f"{where}: '{path}' could not be read as an array ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''}). Fix: save an (N, *shape) "
                          f"array with numpy.save (.npy) or a tensor with torch.save (.pt).") from None
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or not (data.is_floating_point() or data.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        got = f"{data.dtype} {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise ConfigError(f"{where}: '{path}' holds {got}; it must be a numeric array (N, *shape) with one input "
                          f"per row (a function of one number: shape (N, 1)).")
    data = data.to(torch.float32)
    if not bool(torch.isfinite(data).all()):
        raise ConfigError(f"{where}: '{path}' holds NaN or infinite inputs. Fix: remove those rows.")
    return data


def sample_domain(name: str, spec: DomainSpec, seed: int = 0, data_dir: Optional[str] = None,
                  download: bool = True, val_size: Optional[int] = None):
    """The :class:`datasets.splits.Splits` of the domain ``name``: train, validation and test inputs,
    labels of shape ``(N, 0)``, ``num_classes = None``. ``val_size`` only matters to the sampler
    ``dataset`` (the dataset's own validation split); the others use ``n_val``."""
    from datasets.splits import Splits, load_dataset

    where = f"Config key 'domains', entry '{name}'"
    check_domain(name, spec, where)
    if spec.sampler == "dataset":
        inner = load_dataset(spec.dataset, data_dir, download, val_size, seed)
        empty = lambda x: x.new_zeros(len(x), 0)  # noqa: E731
        return Splits(name, inner.train_x, empty(inner.train_x), inner.val_x, empty(inner.val_x),
                      inner.test_x, empty(inner.test_x), None, inner.train_idx, inner.val_idx)
    gen = torch.Generator().manual_seed(seed)
    if spec.sampler == "file":
        data = _read_file(Path(spec.path), where)
        if spec.shape is not None and list(data.shape[1:]) != list(spec.shape):
            raise ConfigError(f"{where}: '{spec.path}' holds inputs of shape {list(data.shape[1:])} "
                              f"(array {tuple(data.shape)}), but 'shape' says {json.dumps(spec.shape)}. Fix: "
                              f"correct 'shape' or the file.")
        n = len(data)
        n_val = spec.n_val if spec.n_val is not None else max(1, n // 10)
        n_test = spec.n_test if spec.n_test is not None else max(1, n // 10)
        n_train = spec.n_train if spec.n_train is not None else n - n_val - n_test
        if n_train < 1 or n_train + n_val + n_test > n:
            raise ConfigError(f"{where}: '{spec.path}' holds {n} inputs, too few for n_train {n_train}, n_val "
                              f"{n_val} and n_test {n_test}. Fix: lower them, or add rows to the file.")
        pool = data[torch.randperm(n, generator=gen)]
        test, val, train = pool[:n_test], pool[n_test:n_test + n_val], pool[n_test + n_val:n_test + n_val + n_train]
    else:
        sizes = {k: getattr(spec, k) if getattr(spec, k) is not None else v for k, v in DRAWN_SIZES.items()}
        shape = list(spec.shape)
        if spec.sampler == "uniform":
            low = _broadcast(spec.low, shape, "low", ConfigError)
            width = _broadcast(spec.high, shape, "high", ConfigError) - low
            draw = lambda m, g: low + width * torch.rand(m, *shape, generator=g)  # noqa: E731
        else:
            mean = _broadcast(spec.mean, shape, "mean", ConfigError)
            std = _broadcast(spec.std, shape, "std", ConfigError)
            draw = lambda m, g: mean + std * torch.randn(m, *shape, generator=g)  # noqa: E731
        n_train, n_val, n_test = sizes["n_train"], sizes["n_val"], sizes["n_test"]
        pool = _distinct_draws(draw, n_train + n_val + n_test, gen, where)
        train, val, test = pool[:n_train], pool[n_train:n_train + n_val], pool[n_train + n_val:]
    idx = torch.arange(len(train) + len(val))
    empty = lambda x: x.new_zeros(len(x), 0)  # noqa: E731
    return Splits(name, train, empty(train), val, empty(val), test, empty(test), None,
                  idx[:len(train)], idx[len(train):])


_DRAWN: dict = {}


def load_data(name: str, data_dir: Optional[str] = None, download: bool = True, val_size: Optional[int] = None,
              seed: int = 0, domains: Optional[dict] = None):
    """The :class:`datasets.splits.Splits` a run's ``datasets`` entry ``name`` names: drawn from the
    domain ``domains[name]`` (the config key 'domains': name -> spec) when there is one, else the dataset
    read by :func:`datasets.splits.load_dataset`. Draws are cached per process, like datasets; each call
    returns copies."""
    from datasets.splits import Splits, load_dataset, resolve_data_dir

    if not domains or name not in domains:
        return load_dataset(name, data_dir, download, val_size, seed)
    spec = domains[name] if isinstance(domains[name], DomainSpec) else DomainSpec(**domains[name])
    key = (name, domain_key(spec), seed, val_size, str(Path(resolve_data_dir(data_dir)).resolve()))
    if key not in _DRAWN:
        _DRAWN[key] = sample_domain(name, spec, seed, data_dir, download, val_size)
    s = _DRAWN[key]
    return Splits(s.name, s.train_x.clone(), s.train_y.clone(), s.val_x.clone(), s.val_y.clone(),
                  s.test_x.clone(), s.test_y.clone(), None, s.train_idx, s.val_idx)


def domain_key(spec: DomainSpec) -> str:
    """A stable text of ``spec`` for caches keyed by what the domain holds."""
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


__all__ = ["DomainSpec", "SAMPLERS", "check_domain", "sample_domain", "load_data", "domain_key"]
