"""The schema machinery every lcc config shares (training, serving, the map, domains).

A schema is a dataclass: each key declared once with its type and default.
:func:`validate_schema` builds it from a JSON object, refusing unknown keys
(with a did-you-mean), missing required keys and wrong types in a sentence that
names the key; :func:`key_error` is the shape of every value check's refusal;
:func:`read_json_config` reads a config file (a missing file, bad JSON or a key
given twice is refused naming the file); :func:`parse_overrides` reads the
``--set KEY=VALUE`` flags. The keys themselves live with what reads them:
the computation's in coders/config.py, training's in train/config.py,
serving's in serve/config.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from util.errors import ConfigError, UserError

Spec = Union[str, dict]  # a class path, or {"class": ..., "args": {...}}


def key_error(source: str, key: str, msg: str) -> ConfigError:
    """The refusal of one key's value: ``<source>: config key '<key>' <msg>``."""
    return ConfigError(f"{source}: config key '{key}' {msg}")


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


def required_keys(schema: type) -> list[str]:
    """The keys of ``schema`` without a default."""
    return [f.name for f in dataclasses.fields(schema) if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]


def validate_schema(raw: Any, schema: type, source: str = "config"):
    """Build the dataclass ``schema`` from ``raw`` after checking its keys and types.

    Unknown keys get a did-you-mean, missing required keys and wrong types a
    sentence naming the key. Value checks beyond types are the caller's.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a JSON object of keys; got {type(raw).__name__}.")
    hints = get_type_hints(schema)
    for key in raw:
        if key not in hints:
            close = difflib.get_close_matches(key, hints, n=1)
            maybe = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'.{maybe} Known keys: {', '.join(hints)}.")
    missing = [k for k in required_keys(schema) if k not in raw]
    if missing:
        raise ConfigError(f"{source}: missing required config key(s) {', '.join(missing)}. "
                          f"See the config reference in README.md.")
    for key, value in raw.items():
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{source}: config key '{key}' must be {_type_name(hints[key])}; "
                              f"got {json.dumps(value)}.")
    return schema(**raw)


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
