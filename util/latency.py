"""Latency laws: the delay models of serving configs (``delays``, ``service``) and of N-worker deadlines.

A law is a dict such as ``{"dist": "shifted-exponential", "shift_ms": 10, "mean_ms": 5}``, optionally with
``probability`` (each draw is delayed with this probability, else 0 ms) and ``instances`` (only these
instances, or workers, are delayed). :func:`check_delay` validates one (a ConfigError naming the key),
:func:`sample_ms` draws from one with a numpy Generator: serving's simulator and runtime
(serve/core/plan.py) and N-worker evaluation by a deadline (coders/deadline.py) draw from this one law.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from util.errors import ConfigError
from util.lru import ByteLRU
from util.schema import key_error as _bad  # the refusal naming a key (serve/config.py imports it from here)

DISTRIBUTIONS = {
    # name: (required parameters, optional parameters)
    "none": ((), ()),
    "constant": (("ms",), ()),
    "exponential": (("mean_ms",), ()),
    "shifted-exponential": (("shift_ms", "mean_ms"), ()),
    "pareto": (("scale_ms", "alpha"), ()),
    "file": (("path",), ("column",)),
}
COMMON_DELAY_KEYS = ("dist", "probability", "instances")
FILE_CACHE_BYTES = 64 * 2 ** 20  # latency files' values kept in memory (8 bytes a value), least recently used out
_FILES = ByteLRU(FILE_CACHE_BYTES)


def check_delay(delay: dict, source: str, key: str = "delays") -> None:
    dist = delay.get("dist")
    if dist not in DISTRIBUTIONS:
        raise _bad(source, key, f"needs \"dist\" set to one of {', '.join(DISTRIBUTIONS)}; got {delay}.")
    required, optional = DISTRIBUTIONS[dist]
    unknown = set(delay) - set(required) - set(optional) - set(COMMON_DELAY_KEYS)
    missing = [p for p in required if p not in delay]
    if unknown or missing:
        raise _bad(source, key, f"entry {delay}: \"{dist}\" takes {', '.join(required) or 'no parameters'}"
                   f"{' (and ' + ', '.join(optional) + ')' if optional else ''}, plus optional \"probability\" "
                   f"and \"instances\"; {'unknown ' + ', '.join(sorted(unknown)) if unknown else 'missing ' + ', '.join(missing)}.")
    for p in required:
        if p == "path":
            if not isinstance(delay[p], str) or not Path(delay[p]).is_file():
                raise _bad(source, key, f"entry {delay}: \"path\" must name an existing file of measured "
                           f"latencies in milliseconds (one per line, or a CSV column).")
        elif not _number(delay[p]) or delay[p] < 0 or (p in ("mean_ms", "scale_ms", "alpha") and delay[p] == 0):
            raise _bad(source, key, f"entry {delay}: \"{p}\" must be a positive number; got {delay[p]!r}.")
    prob = delay.get("probability", 1.0)
    if not _number(prob) or not 0 <= prob <= 1:
        raise _bad(source, key, f"entry {delay}: \"probability\" must be a number from 0 to 1; got {prob!r}.")
    inst = delay.get("instances")
    if inst is not None and not (isinstance(inst, list) and all(_index(i) for i in inst)):
        raise _bad(source, key, f"entry {delay}: \"instances\" must be a list of instance numbers (0, 1, ...) "
                   f"or absent for every instance; got {inst!r}.")
    if dist == "file":
        if "column" in delay and not isinstance(delay["column"], str):
            raise _bad(source, key, f"entry {delay}: \"column\" must be a CSV column name.")
        read_latency_file(delay["path"], delay.get("column"))  # its content, too, before any work


def read_latency_file(path: str, column: Optional[str] = None) -> np.ndarray:
    """Latencies in ms from a file: one number per line, or a CSV with a header and ``column`` (read-only).
    The file is read once while it stays as it is: its values are kept under its path, modification time
    and size, so every draw of a ``"file"`` law does not parse it again, and an edited file is read anew."""
    try:
        stat = os.stat(path)
    except OSError:
        return _read_latency_file(path, column)  # the refusal naming the file
    key = (os.path.abspath(path), column, stat.st_mtime_ns, stat.st_size)
    return _FILES.get(key, lambda: _read_latency_file(path, column))


def _read_latency_file(path: str, column: Optional[str]) -> np.ndarray:
    import csv

    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        if column is not None:
            col = rows[0].index(column)
            values = [float(row[col]) for row in rows[1:] if row]
        else:
            values = [float(row[0]) for row in rows if row and row[0].strip()]
    except (OSError, ValueError, IndexError) as exc:
        raise ConfigError(f"Config key 'delays': the latency file '{path}' could not be read as milliseconds "
                          f"({type(exc).__name__}: {exc}). Fix: one number per line, or a CSV with a header and "
                          f"\"column\" naming the column.") from None
    arr = np.asarray(values, dtype=float)
    if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ConfigError(f"Config key 'delays': the latency file '{path}' must hold finite, non-negative "
                          f"milliseconds; it holds {arr.size} values.")
    arr.flags.writeable = False  # shared by every reader of the file
    return arr


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def sample_ms(delay: dict, instance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Delay (ms) per draw for ``instance`` (an instance or worker number per draw), from the delay model."""
    n = len(instance)
    dist = delay["dist"]
    if dist == "none":
        ms = np.zeros(n)
    elif dist == "constant":
        ms = np.full(n, float(delay["ms"]))
    elif dist == "exponential":
        ms = rng.exponential(delay["mean_ms"], n)
    elif dist == "shifted-exponential":
        ms = delay["shift_ms"] + rng.exponential(delay["mean_ms"], n)
    elif dist == "pareto":
        ms = delay["scale_ms"] * (1.0 + rng.pareto(delay["alpha"], n))
    elif dist == "file":
        ms = rng.choice(read_latency_file(delay["path"], delay.get("column")), n)
    else:  # check_delay refuses others
        raise ValueError(dist)
    hit = rng.random(n) < delay.get("probability", 1.0)
    if delay.get("instances") is not None:
        hit &= np.isin(instance, delay["instances"])
    return np.where(hit, ms, 0.0)
