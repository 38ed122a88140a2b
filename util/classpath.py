"""Resolving class-path strings such as ``"torch.nn.MSELoss"``.

Config files name every component by an importable path, either as a bare
string or as ``{"class": "pkg.mod.Name", "args": {...}}``.
"""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from util.errors import ConfigError


def split_spec(spec: Any, key: str) -> tuple[str, dict]:
    """Return ``(path, args)`` for a bare string or a ``{"class", "args"}`` dict.

    Never mutates ``spec``; ``key`` names the config key in error messages.
    """
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"class", "args"}
        if "class" not in spec or unknown:
            raise ConfigError(
                f"Config key '{key}': a component given as an object needs exactly the keys "
                f"'class' (a class path string) and optionally 'args' (an object of keyword "
                f"arguments); got keys {sorted(spec)}."
            )
        args = spec.get("args", {})
        if not isinstance(spec["class"], str) or not isinstance(args, Mapping):
            raise ConfigError(
                f"Config key '{key}': 'class' must be a string and 'args' an object; got {spec!r}."
            )
        return spec["class"], dict(args)
    raise ConfigError(
        f"Config key '{key}': expected a class path string like 'torch.nn.MSELoss' or an object "
        f"{{\"class\": ..., \"args\": {{...}}}}; got {type(spec).__name__} {spec!r}."
    )


def import_class(path: str, key: str, aliases: Mapping[str, str] | None = None) -> Any:
    """Import ``path`` (after looking it up in ``aliases``) and return the object it names.

    Raises :class:`ConfigError` naming ``key`` and the string when it does not import.
    """
    if aliases and path in aliases:
        path = aliases[path]
    module_name, _, attr = path.rpartition(".")
    hint = f" Short names accepted here: {', '.join(sorted(aliases))}." if aliases else ""
    if not module_name:
        raise ConfigError(
            f"Config key '{key}': '{path}' is not a class path; write it as 'module.ClassName' "
            f"(for example 'coders.mlp.MLPEncoder').{hint}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"Config key '{key}': could not import module '{module_name}' for '{path}' ({exc}). "
            f"Check the spelling, or put your own module next to the config file or on PYTHONPATH.{hint}"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        public = [n for n in dir(module) if not n.startswith("_")]
        import difflib

        close = difflib.get_close_matches(attr, public, n=1)
        maybe = f" Did you mean '{module_name}.{close[0]}'?" if close else ""
        raise ConfigError(
            f"Config key '{key}': module '{module_name}' has no attribute '{attr}'.{maybe}{hint}"
        ) from None


def build(spec: Any, key: str, *args: Any, aliases: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
    """Resolve ``spec`` and call it with ``args``, the spec's own args and ``kwargs``."""
    path, spec_args = split_spec(spec, key)
    cls = import_class(path, key, aliases)
    return cls(*args, **{**spec_args, **kwargs})


def spec_name(spec: Any) -> str:
    """A short, file-system-safe name for a component spec (its class name)."""
    path = spec if isinstance(spec, str) else spec.get("class", "component")
    return path.rpartition(".")[2]
