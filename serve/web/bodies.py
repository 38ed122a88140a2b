"""Binary request bodies for the HTTP service (serve/web/app.py): raw float32 and .npy, read without a JSON parse.

* ``application/octet-stream``: the inputs as raw little-endian float32, one after another. The shape is the
  ``X-Shape`` header or the ``shape`` query parameter (``784``, ``1,28,28``, or ``32,1,28,28`` for 32 inputs),
  else the body must hold a whole number of F's inputs. ``X-Dtype``, when sent, must be ``float32``.
* ``application/x-npy``: a NumPy ``.npy`` file (``np.save``; no pickles) of floats, cast to float32.

Either holds one input in F's shape (or flat) or, for ``/predict/batch``, a leading count of them. A wrong
length, a truncated body, a shape that is not F's, a dtype other than float32, or non-finite numbers get a
4xx naming what was wrong, before any instance sees the request.
"""
from __future__ import annotations

import io
import math

import numpy as np

RAW = ("application/octet-stream",)
NPY = ("application/x-npy", "application/npy")
LITTLE_FLOAT32 = np.dtype("<f4")


class BodyError(Exception):
    """(HTTP status, one-line reason); serve.web.app turns it into its BadInput."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_shape(text: str, where: str) -> tuple:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise BodyError(400, f"{where} {text!r} is not a shape such as 1,28,28 (comma-separated sizes)") from None
    if not dims or any(d < 1 for d in dims):
        raise BodyError(400, f"{where} {text!r} is not a shape of positive sizes")
    return dims


def fit_shape(arr: np.ndarray, shape: tuple, batch: bool, where: str) -> np.ndarray:
    """``arr`` as (n, *shape): one input in F's ``shape`` or flat, or (batch) n of them."""
    size = math.prod(shape)
    if arr.shape in (shape, (size,)):
        return arr.reshape(1, *shape)
    if batch and arr.ndim >= 1 and arr.shape[0] >= 1 and arr.shape[1:] in (shape, (size,)):
        return arr.reshape(arr.shape[0], *shape)
    lead = "[n] + " if batch else ""
    raise BodyError(422, f"{where} has shape {list(arr.shape)}; F takes {list(shape)} (or {size} numbers flat)"
                         f"{', with a leading count n of inputs' if batch else ''} ({lead}{list(shape)})")


def binary_inputs(kind: str, body: bytes, headers, query, shape: tuple, batch: bool) -> np.ndarray:
    """The inputs of a binary body as float32 (n, *shape); BodyError when malformed."""
    if kind in RAW:
        dtype = headers.get("x-dtype")
        if dtype is not None and dtype.strip().lower() not in ("float32", "<f4", "f4"):
            raise BodyError(415, f"X-Dtype {dtype!r} is not served; raw bodies are little-endian float32 "
                                 f"(X-Dtype: float32), or send .npy (application/x-npy) of any float type")
        given = headers.get("x-shape") or query.get("shape")
        size = math.prod(shape)
        if len(body) % 4:
            raise BodyError(422, f"the body is {len(body)} bytes, not a whole number of float32 (4 bytes each): "
                                 f"truncated?")
        count = len(body) // 4
        if given is not None:
            dims = parse_shape(given, "the shape")
            if math.prod(dims) != count:
                raise BodyError(422, f"the shape {list(dims)} needs {4 * math.prod(dims)} bytes of float32; the body "
                                     f"is {len(body)} bytes")
        elif count == 0 or count % size:
            raise BodyError(422, f"the body is {len(body)} bytes, not a whole number of F's inputs ({size} float32, "
                                 f"{4 * size} bytes each); give the shape in X-Shape if it is not that")
        else:
            dims = (count // size, *shape)
        arr = np.frombuffer(body, dtype=LITTLE_FLOAT32).reshape(dims)
        if given is None:  # a whole number of F's inputs: fit already
            return checked(arr, batch, "the raw body")
        where = "the raw body"
    else:
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise BodyError(400, f"the body is not a .npy array ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
            raise BodyError(422, f"the .npy array holds {getattr(arr, 'dtype', type(arr).__name__)}; F takes numbers "
                                 f"(float32, or any float or integer type, cast to float32)")
        where = "the .npy array"
        with np.errstate(over="ignore"):
            arr = arr.astype(np.float32)
    return checked(fit_shape(arr, shape, batch, where), batch, where)


def checked(out: np.ndarray, batch: bool, where: str) -> np.ndarray:
    if not batch and len(out) != 1:
        raise BodyError(422, f"/predict takes one input, got {len(out)}; use /predict/batch")
    bad = ~np.isfinite(out)
    if bad.any():
        raise BodyError(422, f"{where} holds {int(bad.sum())} non-finite numbers (NaN, infinity, or beyond float32)")
    return out
