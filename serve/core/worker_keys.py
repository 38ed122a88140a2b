"""The serving keys ``deadline_ms`` and ``perturb`` checked (serve/core/workers.py says what they do); apart
from it so that the config module can call the check without importing the plan."""
from __future__ import annotations

import math

from coders.perturb_config import DEFAULTS
from util.errors import ConfigError

PERTURB_KEYS = ("adversaries", "adversary", "adversary_scale", "adversary_target", "output_noise")


def check_worker_keys(cfg, source: str) -> None:
    """``deadline_ms`` and ``perturb``: their values, and a row that reads them."""
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{source}: config key '{key}' {msg}")

    rows = list(cfg.strategies) + [p.get("strategy") for p in cfg.policies if isinstance(p, dict)]
    for key in ("deadline_ms", "perturb"):
        if getattr(cfg, key) is not None and not any(decodes_only(name) for name in rows):
            raise bad(key, "is read only by the \"nworker\" strategy (an N-worker run's groups); no row of "
                           "'strategies' serves it. Fix: add \"nworker\" to 'strategies', or remove the key.")
    d = cfg.deadline_ms
    if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0):
        raise bad("deadline_ms", f"must be a number of milliseconds >= 0 after a group's close (or null: wait "
                                 f"for N - S outputs); got {d!r}.")
    if cfg.perturb is not None:
        perturbation(cfg.perturb, source)


def decodes_only(name) -> bool:
    """Whether strategy ``name`` answers every query by decoding its group (``nworker``): the strategies that
    ``deadline_ms`` and ``perturb`` apply to."""
    from serve.core.strategies import get

    try:
        kind = get(name)
    except ValueError:
        return False
    return kind.grouped and not kind.own_outputs


def perturbation(spec: dict, source: str = "serve config"):
    """The :class:`coders.perturb.Perturbation` of a ``perturb`` value; a ConfigError names the key."""
    from coders.perturb import Perturbation

    where = f"{source}: config key 'perturb'"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be an object of the training keys {', '.join(PERTURB_KEYS)}, e.g. "
                          f"{{\"adversaries\": 1, \"adversary\": \"gaussian\"}}; got {spec!r}.")
    unknown = sorted(set(spec) - set(PERTURB_KEYS))
    if unknown:
        raise ConfigError(f"{where} takes {', '.join(PERTURB_KEYS)} (as a training config does); unknown "
                          f"{', '.join(unknown)}. Fix: remove it.")
    values = {key: spec.get(key, DEFAULTS[key]) for key in PERTURB_KEYS}
    if values["adversary_target"] is not None and values["adversary"] != "swap":
        raise ConfigError(f"{where}: \"adversary_target\" is read only by the \"swap\" adversary. Fix: remove it, "
                          f"or set \"adversary\": \"swap\".")
    try:
        return Perturbation(values["adversaries"], values["adversary"], values["adversary_scale"],
                            values["adversary_target"], values["output_noise"])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
