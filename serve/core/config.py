"""The serving config: one declared schema, shared by the Ray runtime and the simulator.

Every key is declared once in :class:`ServeConfig`, checked by the same
machinery as the training config (:func:`util.schema.validate_schema`:
unknown keys with a did-you-mean, wrong types), then by :func:`check_values`.
The lists ``runs``, ``rates`` and ``delays`` sweep: every combination is one
*setting*, and every setting runs each of ``strategies`` on the same seeded
arrivals and delays, so the strategies are compared on equal terms.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from serve.core import strategies
from serve.core.batching import check_batching
from serve.core.worker_keys import check_worker_keys
from util.errors import ConfigError
from util.latency import (COMMON_DELAY_KEYS, DISTRIBUTIONS, _bad, _index, _number, check_delay,  # noqa: F401
                           read_latency_file)
from util.schema import read_json_config, validate_schema

STRATEGIES = strategies.NAMES  # every registered strategy's name, read live (serve/core/strategies.py)
DEFAULT_STRATEGIES = strategies.default_names()  # those a config without 'strategies' compares
ENGINES = ("ray", "sim")
ROUTINGS = ("static", "jsq", "p2c")
POOLS = ("split", "shared")
MAX_WINDOW = 1_000_000  # latencies a percentile deferral keeps (memory: 8 bytes each)
MAX_INTERFERENCE = 64  # busy processes of 'interference' in all
MAX_THREADS = 1024     # torch threads per instance


@dataclass
class ServeConfig:
    runs: list[str]                     # run folders written by train.py (config.json + checkpoint), swept
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))  # compared in each setting
    rates: list[float] = field(default_factory=lambda: [50.0])  # query arrival rates (queries/s, Poisson), swept
    delays: list[dict] = field(default_factory=lambda: [{"dist": "none"}])  # injected delay models, swept
    num_queries: int = 1000             # queries per strategy and setting
    warmup_queries: int = 0             # leading queries served but left out of the figures
    instances: int = 2                  # m: instances serving queries without redundancy
    group_timeout_ms: float = 20.0      # longest a coded query waits for its group of k to fill
    slowdown: Optional[dict] = None     # {"fraction", "factor", "period_ms"}: instances slowed for periods
    interference: Optional[dict] = None  # {"instances": [i, ...], "processes": p}: real CPU competition (ray)
    failures: list[dict] = field(default_factory=list)  # [{"instance": i, "at_ms": t}]: fail-stop kills
    split: str = "test"                 # the dataset split the queries come from
    checkpoint: str = "best.pt"         # which checkpoint of each run folder is served
    seed: int = 0                       # same seed: same queries, arrivals, delays, slow periods
    engine: str = "ray"                 # "ray": real actors; "sim": the discrete-event simulator
    address: Optional[str] = None       # Ray cluster to join ("auto", "ray://host:10001"); null: a local Ray
    num_cpus: Optional[int] = None      # CPUs of the embedded local Ray (default: this machine's)
    instance_cpus: float = 0.0          # CPUs reserved per instance actor on the cluster (0: pack freely)
    instance_threads: int = 1           # torch threads inside each instance
    device: str = "cpu"                 # where instances run F: "cpu" or "cuda" (one GPU share per instance)
    flush_denormal: bool = True         # flush subnormal floats to zero in every instance (CPU speed)
    data_dir: Optional[str] = None      # dataset folder (default: the run's)
    out_dir: str = "serve_results"      # results go under out_dir/<setting>/<strategy>/
    plot: bool = True                   # latency CDF per setting (needs matplotlib)
    profile: Optional[str] = None       # sim: per-instance service times (ms) measured by a ray run, a CSV
    backup_model: Optional[dict] = None  # "backup": {"model": F-like class path or name, "file": its weights}
    service: dict = field(default_factory=lambda: {"dist": "constant", "ms": 1.0})  # sim: compute per request (ms)
    policies: list[dict] = field(default_factory=list)  # more rows beside 'strategies': PolicyConfig objects
    batch_size: int = 32                # most requests an instance takes in one call (1: no batching)
    batch_wait_ms: float = 0.0          # longest a batch's first request waits for more while its instance is free
    batch_inflight: int = 2             # calls an instance may have outstanding; later requests wait and batch
    batch_adaptive_ms: Optional[float] = None  # AIMD: adapt each instance's largest batch to this call latency
    app: dict = field(default_factory=dict)  # the HTTP service (python -m serve.app): keys of AppConfig below
    deadline_ms: Optional[float] = None  # nworker: decode a group from what arrived by its close + this (ms)
    perturb: Optional[dict] = None      # nworker: training's perturbation keys applied to the served outputs


@dataclass
class AppConfig:
    """The ``app`` section: what ``python -m serve.app`` serves, and its HTTP edge."""

    strategy: str = "coded"             # one of STRATEGIES; its instances, delays and failures as the benchmark's
    run: int = 0                        # which of 'runs' is served (0: the first)
    delay: int = 0                      # which of 'delays' is injected into the instances (0: the first)
    host: str = "127.0.0.1"             # address to listen on ("0.0.0.0": every interface)
    port: int = 8000                    # TCP port to listen on
    max_queue: int = 64                 # queries admitted and not yet answered; more get 503 + Retry-After
    max_batch: int = 64                 # inputs in one POST /predict/batch
    max_body_bytes: int = 1_048_576     # largest request body; larger gets 413 before it is parsed
    retry_after_s: int = 1              # the Retry-After an overloaded service sends with 503
    policy: Optional[str] = None        # the name of a 'policies' row to serve (its strategy, routing,
                                        # pool, cancel, defer) in place of 'strategy''s fixed layout
    pool_name: str = ""                 # "": this front end starts its own instances; a name: front ends on one
                                        # Ray cluster (address) that serve the same code under this name share
                                        # its instances (named Ray actors; the first starts them)


@dataclass
class PolicyConfig:
    """One entry of ``policies``: a strategy plus how its requests are routed, cancelled and deferred.

    A plain entry of ``strategies`` is the policy with every default below (today's fixed layouts).
    """

    strategy: str                       # none, equal-resources, replicate or coded
    name: Optional[str] = None          # its row and results folder (default: built from the keys below)
    routing: str = "static"             # "static": the strategy's fixed layout (round robin, fixed parity
                                        # instances); "jsq": the live instance with the fewest outstanding
                                        # requests; "p2c": the shorter queue of two live instances drawn at random
    pool: str = "split"                 # coded: "split": data on the m F instances, parity j on its own; "shared":
                                        # every instance holds F and serves data and parities (needs parities
                                        # that go through F: a learned code, not parity models)
    cancel: bool = False                # drop a request still queued once it cannot matter: a group's parities
                                        # (and a rebuilt query's data request) once every member is answered,
                                        # the losing copy of "replicate"
    defer: Optional[dict] = None        # coded: send a group's parities only if one of its data outputs is still
                                        # missing this long after the group closed; replicate: send the second
                                        # copy only if unanswered this long after arrival (hedged requests).
                                        # {"ms": t} or {"percentile": p, "window": n}: p-th percentile of the
                                        # last n first-request latencies (no delay until 50 are in)


@dataclass(frozen=True)
class Setting:
    """One combination of the swept lists."""

    index: int
    run: str
    rate: float
    delay: dict

    @property
    def name(self) -> str:
        return f"setting{self.index:02d}"

    def describe(self) -> str:
        return f"{self.run} | {self.rate:g} queries/s | delay {describe_delay(self.delay)}"


def describe_delay(delay: dict) -> str:
    params = ", ".join(f"{k}={v}" for k, v in delay.items() if k != "dist")
    return delay["dist"] + (f" ({params})" if params else "")


def check_service(service: dict, source: str) -> None:
    """``service``: a distribution like a delay model's, drawn for every request (no probability, no instances)."""
    if not isinstance(service, dict):
        raise _bad(source, "service", f"must be an object such as {{\"dist\": \"exponential\", \"mean_ms\": 1.0}}; "
                   f"got {service!r}.")
    shared = [key for key in ("probability", "instances") if key in service]
    if shared:
        raise _bad(source, "service", f"entry {service}: every request has a service time, so \"{shared[0]}\" "
                   f"does not apply; give only \"dist\" and its parameters.")
    check_delay(service, source, "service")


def check_values(cfg: ServeConfig, source: str, need_runs: bool = True) -> None:
    """Every value check beyond types; raises ConfigError naming the key and the fix.

    ``need_runs=False`` (the simulator's map, which sweeps k and r itself) accepts a config without run folders.
    """
    if not cfg.runs and need_runs:
        raise _bad(source, "runs", "must list at least one run folder written by train.py.")
    for run in cfg.runs:
        folder = Path(run)
        if not (folder / "config.json").is_file():
            raise _bad(source, "runs", f"names '{run}', which is not a run folder (no config.json there). Fix: "
                       f"give the folder train.py wrote, such as save/digits/base-mlp/k2/r1/MSELoss/MLPEncoder/"
                       f"MLPDecoder.")
        if not (folder / cfg.checkpoint).is_file():
            raise _bad(source, "checkpoint", f"'{cfg.checkpoint}' is not in the run folder '{run}'. Fix: train "
                       f"the run first, or set 'checkpoint' to a file the folder holds (best.pt, current.pt).")
    if not cfg.strategies or len(set(cfg.strategies)) < len(cfg.strategies) \
            or any(s not in strategies.REGISTRY for s in cfg.strategies):
        raise _bad(source, "strategies", f"must list distinct strategies from {', '.join(STRATEGIES)}; "
                   f"got {cfg.strategies}.")
    if not cfg.rates or any(not _number(r) or r <= 0 for r in cfg.rates):
        raise _bad(source, "rates", f"must list positive arrival rates in queries per second; got {cfg.rates}.")
    if not cfg.delays:
        raise _bad(source, "delays", "must list at least one delay model, e.g. [{\"dist\": \"none\"}].")
    for delay in cfg.delays:
        check_delay(delay, source)
    if cfg.num_queries < 1:
        raise _bad(source, "num_queries", f"must be 1 or more; got {cfg.num_queries}.")
    if not 0 <= cfg.warmup_queries < cfg.num_queries:
        raise _bad(source, "warmup_queries", f"must be from 0 to num_queries - 1; got {cfg.warmup_queries}.")
    if cfg.instances < 1:
        raise _bad(source, "instances", f"must be 1 or more; got {cfg.instances}.")
    if not _number(cfg.group_timeout_ms) or cfg.group_timeout_ms < 0:
        raise _bad(source, "group_timeout_ms", f"must be 0 or more; got {cfg.group_timeout_ms}.")
    if cfg.slowdown is not None:
        s = cfg.slowdown
        if set(s) != {"fraction", "factor", "period_ms"} or not all(_number(v) for v in s.values()) \
                or not 0 <= s["fraction"] <= 1 or s["factor"] < 1 or s["period_ms"] <= 0:
            raise _bad(source, "slowdown", f"must be null or {{\"fraction\": 0..1, \"factor\": >= 1, "
                       f"\"period_ms\": > 0}}; got {s}.")
    if cfg.interference is not None:
        i = cfg.interference
        if set(i) != {"instances", "processes"} or not isinstance(i["instances"], list) \
                or not all(_index(v) for v in i["instances"]) or not _index(i["processes"]) or i["processes"] < 1:
            raise _bad(source, "interference", f"must be null or {{\"instances\": [i, ...], \"processes\": "
                       f"p >= 1}}; got {i}.")
        if i["processes"] * len(i["instances"]) > MAX_INTERFERENCE:
            raise _bad(source, "interference", f"starts {i['processes']} busy processes on each of "
                       f"{len(i['instances'])} instances, more than {MAX_INTERFERENCE} in all, which would starve the "
                       f"machine rather than slow an instance. Fix: a few processes per instance (1-4).")
    for f in cfg.failures:
        if not isinstance(f, dict) or set(f) != {"instance", "at_ms"} or not _index(f["instance"]) \
                or not _number(f["at_ms"]) or f["at_ms"] < 0:
            raise _bad(source, "failures", f"entries must be {{\"instance\": i, \"at_ms\": t >= 0}}; got {f}.")
    if len({f["instance"] for f in cfg.failures}) < len(cfg.failures):
        raise _bad(source, "failures", "names one instance twice; an instance fails once.")
    backed = [s for s in cfg.strategies if strategies.get(s).needs_backup]
    if backed:
        b = cfg.backup_model
        if not (isinstance(b, dict) and set(b) == {"model", "file"} and isinstance(b["file"], str)
                and isinstance(b["model"], (str, dict))):
            raise _bad(source, "backup_model", f"must be {{\"model\": a base model name or class path, \"file\": "
                       f"its weights}} when 'strategies' holds \"{backed[0]}\"; got {b!r}.")
        if not Path(b["file"]).is_file():
            raise _bad(source, "backup_model", f"\"file\" '{b['file']}' does not exist. Fix: train one, e.g. "
                       f"python -m base_models.fit --dataset mnist --model logistic, and name its model.pt.")
    if cfg.split not in ("train", "val", "test"):
        raise _bad(source, "split", f"must be \"train\", \"val\" or \"test\"; got {cfg.split!r}.")
    if not 0 <= cfg.seed < 2 ** 63:
        raise _bad(source, "seed", f"must be an integer from 0 to 2**63 - 1; got {cfg.seed}.")
    if cfg.engine not in ENGINES:
        raise _bad(source, "engine", f"must be one of {', '.join(ENGINES)}; got {cfg.engine!r}.")
    if cfg.num_cpus is not None and cfg.num_cpus < 1:
        raise _bad(source, "num_cpus", f"must be 1 or more (or null); got {cfg.num_cpus}.")
    if not _number(cfg.instance_cpus) or cfg.instance_cpus < 0:
        raise _bad(source, "instance_cpus", f"must be 0 or more; got {cfg.instance_cpus}.")
    if not 1 <= cfg.instance_threads <= MAX_THREADS:
        raise _bad(source, "instance_threads", f"must be from 1 to {MAX_THREADS}; got {cfg.instance_threads}.")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise _bad(source, "device", f"must be \"cpu\" or \"cuda\"; got {cfg.device!r}.")
    if cfg.engine == "ray" and cfg.address is None and cfg.device != "cpu":  # a local Ray: this machine's GPUs
        from util.checks import check_device

        check_device(cfg.device, f"{source}: config key 'device'")
    check_service(cfg.service, source)
    check_batching(cfg, source)
    if cfg.engine == "sim" and cfg.interference is not None:
        raise _bad(source, "interference", "is real CPU competition beside Ray actors, which the simulator "
                   "(\"engine\": \"sim\") does not have. Fix: set it to null, and model slow instances with "
                   "'slowdown' or 'delays'.")
    check_policies(cfg, source)
    check_worker_keys(cfg, source)
    if cfg.profile is not None and not Path(cfg.profile).is_file():
        raise _bad(source, "profile", f"names '{cfg.profile}', which does not exist. Fix: point it at the "
                   f"profile.csv a ray run wrote under out_dir, or set it to null.")
    if not cfg.out_dir.strip():  # "" would write the settings' folders into the current directory
        raise _bad(source, "out_dir", f"must name a folder (e.g. {ServeConfig.out_dir!r}); got {cfg.out_dir!r}.")
    from util.checks import check_writable_folder

    check_writable_folder(cfg.out_dir, "out_dir", f"{source}: config key 'out_dir'")  # a file above it, too


def app_config(cfg: ServeConfig, source: str = "serve config") -> AppConfig:
    """The checked ``app`` section of ``cfg``; a ConfigError names the key and the fix."""
    app = validate_schema(cfg.app, AppConfig, f"{source}, section 'app'")
    key = "app." + "{}"
    if app.strategy not in strategies.REGISTRY:
        raise _bad(source, key.format("strategy"), f"must be one of {', '.join(STRATEGIES)}; got {app.strategy!r}.")
    if cfg.runs and not 0 <= app.run < len(cfg.runs):
        raise _bad(source, key.format("run"), f"must number one of the {len(cfg.runs)} 'runs' (0..{len(cfg.runs) - 1}); "
                   f"got {app.run}.")
    if not 0 <= app.delay < len(cfg.delays):
        raise _bad(source, key.format("delay"), f"must number one of the {len(cfg.delays)} 'delays' "
                   f"(0..{len(cfg.delays) - 1}); got {app.delay}.")
    if not 0 <= app.port < 65536:
        raise _bad(source, key.format("port"), f"must be a TCP port from 0 to 65535; got {app.port}.")
    for name in ("max_queue", "max_batch", "max_body_bytes", "retry_after_s"):
        if getattr(app, name) < 1:
            raise _bad(source, key.format(name), f"must be 1 or more; got {getattr(app, name)}.")
    if app.pool_name and (set(app.pool_name) - set(NAME_CHARS) or ":" in app.pool_name):
        raise _bad(source, key.format("pool_name"), f"must be a name of letters, digits and -_.+=; got "
                   f"{app.pool_name!r}. Fix: pick such a name (e.g. \"mnist-k2\"), the same one in every front end "
                   f"that should share the pool, or drop the key to give this front end its own instances.")
    if app.policy is not None:
        rows = {policy_name(p): p for p in all_policies(cfg)[len(cfg.strategies):]}
        if app.policy not in rows:
            names = ", ".join(repr(n) for n in rows) or "none: the config has no 'policies'"
            raise _bad(source, key.format("policy"), f"must name a row of 'policies' ({names}); got {app.policy!r}. "
                       f"Fix: use one of those names, or drop 'app.policy' to serve 'app.strategy'.")
        app = dataclasses.replace(app, strategy=rows[app.policy].strategy)
    if strategies.get(app.strategy).needs_backup and not isinstance(cfg.backup_model, dict):
        raise _bad(source, "backup_model", f"must be {{\"model\": ..., \"file\": ...}} when 'app.strategy' is "
                   f"\"{app.strategy}\".")
    return app


def app_policy(cfg: ServeConfig, app: AppConfig) -> Optional[PolicyConfig]:
    """The ``policies`` row ``app.policy`` names, or None (serve ``app.strategy``'s fixed layout)."""
    if app.policy is None:
        return None
    return next(p for p in all_policies(cfg)[len(cfg.strategies):] if policy_name(p) == app.policy)


POLICY_STRATEGIES = strategies.policy_names()  # the built-in strategies a 'policies' row may name
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.+="


def policy_from(raw: Any, source: str, index: int) -> PolicyConfig:
    """A checked :class:`PolicyConfig` from one entry of ``policies``."""
    where = f"{source}: 'policies[{index}]'"
    pol = validate_schema(raw, PolicyConfig, where)

    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where}: config key '{key}' {msg}")

    way = strategies.REGISTRY.get(pol.strategy)
    if way is not None and way.fixed_only:
        raise bad("strategy", f"\"{way.name}\" {way.fixed_only}. Fix: list \"{way.name}\" in 'strategies' "
                  f"instead of 'policies'.")
    if way is None or not way.policy_rows:
        raise bad("strategy", f"must be one of {', '.join(strategies.policy_names())}; got {pol.strategy!r}.")
    if pol.routing not in ROUTINGS:
        raise bad("routing", f"must be one of {', '.join(ROUTINGS)}; got {pol.routing!r}.")
    if pol.pool not in POOLS:
        raise bad("pool", f"must be one of {', '.join(POOLS)}; got {pol.pool!r}.")
    if pol.pool == "shared" and not way.shared_pool:
        pooled = " or ".join(f"\"{s.name}\"" for s in strategies.REGISTRY.values() if s.shared_pool)
        raise bad("pool", f"\"shared\" pools a code's data and parity instances; strategy {pol.strategy!r} has "
                  f"only F instances. Fix: drop 'pool', or use it with \"strategy\": {pooled}.")
    if pol.defer is not None:
        d = pol.defer
        fixed = set(d) == {"ms"} and _number(d["ms"]) and d["ms"] >= 0
        pct = set(d) == {"percentile", "window"} and _number(d["percentile"]) and 0 < d["percentile"] < 100 \
            and _index(d["window"]) and 1 <= d["window"] <= MAX_WINDOW
        if not (fixed or pct):
            raise bad("defer", f"must be null, {{\"ms\": t >= 0}} or {{\"percentile\": 0 < p < 100, \"window\": "
                      f"n from 1 to {MAX_WINDOW:,}}} (the latencies kept); got {d!r}.")
        if way.hedges is None:
            hedged = " or ".join(s.name for s in strategies.REGISTRY.values() if s.hedges and s.policy_rows)
            raise bad("defer", f"delays a redundant request (a code's parities, a replica's second copy); "
                      f"strategy {pol.strategy!r} sends none. Fix: drop 'defer', or use {hedged}.")
    if pol.name is not None and (not pol.name or any(c not in NAME_CHARS for c in pol.name)):
        raise bad("name", f"names a results folder: letters, digits and - _ . + = only; got {pol.name!r}.")
    return pol


def policy_name(pol: PolicyConfig) -> str:
    """A policy's row name: its ``name``, or the strategy and every key that differs from the default."""
    if pol.name:
        return pol.name
    parts = [pol.strategy]
    if pol.routing != "static":
        parts.append(pol.routing)
    if pol.pool != "split":
        parts.append("pooled")
    if pol.cancel:
        parts.append("cancel")
    if pol.defer is not None:
        parts.append(f"defer{pol.defer['ms']:g}ms" if "ms" in pol.defer else f"defer-p{pol.defer['percentile']:g}")
    return "+".join(parts)


def all_policies(cfg: ServeConfig) -> list[PolicyConfig]:
    """Every row a setting compares: each of ``strategies`` as a plain policy, then ``policies``."""
    plain = [PolicyConfig(strategy=s, name=s) for s in cfg.strategies]
    return plain + [policy_from(raw, "serve config", i) for i, raw in enumerate(cfg.policies)]


def row_strategies(cfg: ServeConfig) -> list[str]:
    """Every strategy some row runs, once each: ``strategies``, then those only ``policies`` use (for the
    checks made before any work, which a policy's plan must pass as its strategy's does)."""
    return list(dict.fromkeys(p.strategy for p in all_policies(cfg)))


def check_policies(cfg: ServeConfig, source: str) -> None:
    names = list(cfg.strategies)
    for i, raw in enumerate(cfg.policies):
        names.append(policy_name(policy_from(raw, source, i)))
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _bad(source, "policies", f"gives two rows the name {dup[0]!r} (a strategy's own row, or a policy's "
                   f"name built from its keys). Fix: give one of them a distinct \"name\".")


def validate(raw: Any, source: str = "serve config", need_runs: bool = True) -> ServeConfig:
    if not need_runs and isinstance(raw, dict):
        raw = {"runs": [], **raw}
    cfg = validate_schema(raw, ServeConfig, source)
    check_values(cfg, source, need_runs)
    app_config(cfg, source)
    return cfg


def load_serve_config(path: str | Path, overrides: Optional[dict] = None) -> ServeConfig:
    """Read and check a serving config file; ``overrides`` (``--set``) replace its keys first."""
    path = Path(path)
    raw = read_json_config(path, "such as conf/serve/digits.json")
    if isinstance(raw, dict) and overrides:
        raw = {**raw}
        for key, value in overrides.items():
            head, dot, tail = key.partition(".")  # "app.port=8001" sets one key of a section
            if dot and isinstance(raw.get(head, {}), dict):
                raw[head] = {**raw.get(head, {}), tail: value}
            else:
                raw[key] = value
    return validate(raw, source=f"serve config '{path}'")


def expand_settings(cfg: ServeConfig) -> list[Setting]:
    """Every combination of ``runs`` x ``rates`` x ``delays``, in a stable order."""
    return [Setting(i, run, float(rate), delay) for i, (run, rate, delay)
            in enumerate(itertools.product(cfg.runs, cfg.rates, cfg.delays))]
