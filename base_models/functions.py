"""Any differentiable function as a base model F, and the shipped example functions.

A config may name a plain torch function as F::

    "models": ["base_models.functions.x_sin_x"]
    "models": [{"class": "base_models.functions.lorenz_flow", "args": {"time": 0.2}}]
    "models": ["my_funcs.my_kernel"]          # my_funcs.py beside the config file

The function takes a batch of inputs ``(B, *in_shape)`` (the domain's or the
dataset's input shape) and returns one output per input, ``(B, ...)``; the
outputs are flattened to rows ``(B, n)``, the shape every coder and metric
sees. The function must be written in torch operations so that the encoder's
gradients flow through it (F itself has no parameters and is never trained).
The ``args`` of a spec are passed to the function as keyword arguments on
every call. :class:`FunctionModel` is the module that wraps such a function.

Classes (``nn.Module`` subclasses) are built as today:
``cls(in_shape=..., num_classes=n, **args)``, where ``num_classes`` is the
number of classes of a labelled dataset, the target width of a regression set
(1 for a target per row), and is left out on a domain, which has no targets.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from util.classpath import import_class, split_spec


class FunctionModel(nn.Module):
    """A plain function ``fn(x, **kwargs)`` as a frozen, parameter-free base model: ``(B, ...) -> (B, n)``."""

    def __init__(self, fn: Callable[..., torch.Tensor], **kwargs: Any):
        super().__init__()
        self.fn = fn
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x, **self.kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{self.name} returned a {type(out).__name__}, not a tensor")
        if out.dim() == 0 or out.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name} returned shape {tuple(out.shape)} for a batch of {x.shape[0]} inputs "
                             f"of shape {tuple(x.shape[1:])}; it must return one output per input, (B, ...)")
        return out.reshape(x.shape[0], -1)

    @property
    def name(self) -> str:
        return f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', repr(self.fn))}"

    def extra_repr(self) -> str:
        return self.name + "".join(f", {k}={v!r}" for k, v in self.kwargs.items())


def is_plain_function(obj: Any) -> bool:
    """True for a callable that is F itself (not a class, nor a builder taking ``in_shape``)."""
    if isinstance(obj, type) or not callable(obj):
        return False
    try:
        return "in_shape" not in inspect.signature(obj).parameters
    except (TypeError, ValueError):  # builtins without a signature: torch.sin, say
        return True


def construct(spec: Any, key: str, aliases: dict, in_shape: Sequence[int], num_classes: Optional[int]) -> nn.Module:
    """The base model named by ``spec``: a :class:`FunctionModel` around a plain function, or
    ``cls(in_shape=in_shape, num_classes=num_classes, **args)`` (``num_classes`` left out when None)."""
    path, args = split_spec(spec, key)
    obj = import_class(path, key, aliases)
    if is_plain_function(obj):
        return FunctionModel(obj, **args)
    kwargs = {"in_shape": tuple(in_shape)}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return obj(**{**args, **kwargs})


# -- shipped example functions ---------------------------------------------------------------------


def x_sin_x(x: torch.Tensor) -> torch.Tensor:
    """``x * sin(x)``, element-wise: LeTCC's (NeurIPS 2024) test function. ``(B, 1) -> (B, 1)``."""
    return x * torch.sin(x)


def lorenz_flow(x: torch.Tensor, time: float = 0.1, steps: int = 10, sigma: float = 10.0, rho: float = 28.0,
                beta: float = 8.0 / 3.0) -> torch.Tensor:
    """Where the Lorenz-63 system carries a state after ``time``: ``(B, 3) -> (B, 3)``.

    A small nonlinear physics kernel with a vector output: ``steps`` classical
    Runge-Kutta (RK4) steps of ``dx/dt = sigma (y - x)``, ``dy/dt = x (rho - z) - y``,
    ``dz/dt = x y - beta z``. With the default constants the system is chaotic, so
    nearby states drift apart within ``time`` and the map is far from linear.
    """
    def field(s: torch.Tensor) -> torch.Tensor:
        a, b, c = s.unbind(-1)
        return torch.stack([sigma * (b - a), a * (rho - c) - b, a * b - beta * c], -1)

    h = time / steps
    s = x
    for _ in range(steps):
        k1 = field(s)
        k2 = field(s + 0.5 * h * k1)
        k3 = field(s + 0.5 * h * k2)
        k4 = field(s + h * k3)
        s = s + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
    return s
