"""Resolving class-path strings such as ``"torch.nn.MSELoss"``.

Config files name every component by an importable path, either as a bare
string or as ``{"class": "pkg.mod.Name", "args": {...}}``.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
import sys
from typing import Any, Mapping

from util.errors import ConfigError, UserError


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
    except ModuleNotFoundError as exc:
        missing = module_name if exc.name in (None, module_name) or module_name.startswith(exc.name + ".") else exc.name
        if missing != module_name:  # the module exists, but something it imports does not
            raise ConfigError(
                f"Config key '{key}': module '{module_name}' (for '{path}') imports '{missing}', which is not "
                f"installed or not on the path ({where_raised(exc)}). Fix: install it, or correct that import."
            ) from None
        raise ConfigError(
            f"Config key '{key}': could not import module '{module_name}' for '{path}' ({exc}). "
            f"Check the spelling, or put your own module next to the config file or on PYTHONPATH.{hint}"
        ) from None
    except Exception as exc:  # a user's module can fail at import in any way: syntax, a NameError, ...
        raise ConfigError(
            f"Config key '{key}': importing module '{module_name}' (for '{path}') raised "
            f"{describe_exception(exc)}. Fix: correct that module; importing it alone "
            f"(python -c 'import {module_name}') shows the whole error."
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


def where_raised(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc`` (for a SyntaxError, the offending line)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "unknown place"


def describe_exception(exc: BaseException) -> str:
    """``"AttributeError: ... (at file.py:12)"``: one line for a one-paragraph message."""
    text = str(exc).strip().splitlines()
    first = text[0][:300] if text else ""
    return f"{type(exc).__name__}{': ' + first if first else ''} (at {where_raised(exc)})"


def call_user(key: str, what: str, fn: Any, *args: Any, fix: str = "", **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` where ``fn`` is a user's component: any exception it raises (other
    than a UserError, already worded for users) becomes one ConfigError naming the config ``key``
    and ``what`` failed, instead of a traceback."""
    try:
        return fn(*args, **kwargs)
    except UserError:
        raise
    except Exception as exc:
        raise ConfigError(f"Config key '{key}': {what} raised {describe_exception(exc)}."
                          f"{' Fix: ' + fix if fix else ''}") from None


def build(spec: Any, key: str, *args: Any, aliases: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
    """Resolve ``spec`` and call it with ``args``, the spec's own args and ``kwargs``."""
    path, spec_args = split_spec(spec, key)
    cls = import_class(path, key, aliases)
    return cls(*args, **{**spec_args, **kwargs})


def spec_name(spec: Any) -> str:
    """A short, file-system-safe name for a component spec: its class name, followed by its
    args when it has any (``MLPDecoder-hidden256``), so that two specs of one class with
    different args never share a run folder or a weights file. Args that do not read as a
    short safe name (nested values, odd characters) become a digest of their JSON."""
    if isinstance(spec, str):
        return spec.rpartition(".")[2]
    name = str(spec.get("class", "component")).rpartition(".")[2]
    args = spec.get("args") or {}
    if not args:
        return name
    text = "-".join(f"{key}{value if isinstance(value, str) else json.dumps(value)}"
                    for key, value in sorted(args.items()))
    if len(text) > 48 or not re.fullmatch(r"[A-Za-z0-9._+=-]+", text):
        text = "args" + hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
    return f"{name}-{text}"


# Folders of the config files read in this process. Each goes on sys.path, so a
# user's module beside a config imports by class path, and each run records
# them in its config.json, so resuming from the run folder alone finds it again.
CODE_DIRS: list[str] = []


def add_code_dir(folder: str) -> None:
    if folder not in CODE_DIRS:
        CODE_DIRS.append(folder)
    if folder not in sys.path:
        sys.path.insert(0, folder)
