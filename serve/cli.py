"""``python -m serve CONFIG.json [--set KEY=VALUE ...]``: serve trained codes under injected stragglers.

Every setting of the config (runs x rates x delays) runs each strategy on
the same seeded queries, then writes, under ``out_dir/<setting>/``:
``setting.json``, ``<strategy>/queries.csv`` (one row per query),
``<strategy>/requests.csv`` (one row per request an instance served),
``<strategy>/summary.json``, and ``cdf.png``; the summary tables are
printed as markdown (``python -m serve.report OUT_DIR`` prints them again).
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from serve.core.config import (ServeConfig, all_policies, expand_settings, load_serve_config, policy_name,
                          row_strategies)
from coders.config import parse_overrides
from coders.form import form_of
from serve.core.plan import (ROLE_F, build_plan, check_code_fits, check_failed_instances, code_layout,
                        make_queries, parity_per_model, pool_roles)
from serve.core.strategies import get as strategy_of, needs_backup, seed_index
from serve.core.results import RESULT_FILES, markdown_table, plot_cdf, summarize, write_strategy
from serve.core.workers import served_code, with_deadline
from util import signals
from util.errors import ConfigError, UserError, exits_on_user_error
from util.files import atomic_write_text, remove_stale_temps

EXIT_INTERRUPTED, EXIT_TERMINATED = signals.EXIT_INTERRUPTED, signals.EXIT_TERMINATED  # 128 + SIGINT, SIGTERM


def load_codes(cfg: ServeConfig) -> dict:
    """Each run folder's trained code, loaded once (a bad folder is a UserError before any serving)."""
    from coders.code import load_code

    codes = {}
    for run in cfg.runs:
        if run not in codes:
            codes[run] = load_code(run, cfg.checkpoint, "cpu", cfg.data_dir)
            codes[run].code = served_code(cfg, codes[run].code, run)  # with the config's 'perturb'
            codes[run].backup = load_backup(cfg, codes[run].splits) if needs_backup(cfg.strategies) else None
    return codes


def load_backup(cfg: ServeConfig, splits) -> torch.nn.Module:
    """The backup model of a strategy that needs one (``backup``), built for the run's dataset and loaded from its
    file."""
    from base_models.fit import build_base_model, load_state

    spec = cfg.backup_model
    try:
        model = build_base_model(spec["model"], splits, "backup_model")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Config key 'backup_model': {spec['model']!r} could not be built for {splits.name} "
                          f"({exc}).") from None
    try:
        model = load_state(model, Path(spec["file"]), explicit=True)
    except UserError as exc:
        raise ConfigError(f"Config key 'backup_model': {exc}") from None
    return model.eval().requires_grad_(False)


def check_failures(cfg: ServeConfig, codes: dict) -> None:
    for run, loaded in codes.items():
        k, r, _ = code_layout(loaded.code)
        check_code_fits(loaded.code, cfg.strategies, run, cfg.engine)
        check_code_fits(loaded.code, [p.strategy for p in all_policies(cfg)[len(cfg.strategies):]], run, cfg.engine,
                        "policies")
        check_failed_instances(cfg, k, r, row_strategies(cfg), run)
        check_live_f(cfg, k, r, row_strategies(cfg), run)
        if any(p.pool == "shared" for p in all_policies(cfg)) and getattr(loaded.code, "parity_models", None) is not None:
            raise ConfigError(f"Config key 'policies': \"pool\": \"shared\" serves parities on F's instances, but "
                              f"run '{run}' sends its parities through parity models. Fix: use \"pool\": "
                              f"\"split\" for this run (its data instances still balance among themselves).")
        if cfg.interference is not None:
            for i in cfg.interference["instances"]:
                if i >= cfg.instances:
                    raise ConfigError(f"Config key 'interference': instance {i} is not one of the {cfg.instances} "
                                      f"instances every strategy has (0..{cfg.instances - 1}).")


def serve_all(cfg: ServeConfig, out=None, finished: Optional[list] = None) -> list[tuple[dict, list[dict]]]:
    """Run every setting and strategy; returns ``[(setting record, [summary per strategy]), ...]``
    (``finished``: a list to which each setting's name is added once its files are written)."""
    from util.lock import folder_lock

    out = out or sys.stdout
    codes = load_codes(cfg)
    check_sizes(cfg, codes)
    check_failures(cfg, codes)
    settings = expand_settings(cfg)
    with folder_lock(cfg.out_dir, "serving results folder"):  # one writer; its temporaries are stale
        remove_result_temps(Path(cfg.out_dir))
        return _serve_settings(cfg, codes, settings, out, [] if finished is None else finished)


def _serve_settings(cfg: ServeConfig, codes: dict, settings: list, out, finished: list) -> list[tuple[dict, list[dict]]]:
    ours = False  # whether this call starts Ray (and so shuts it down, even when interrupted while starting)
    if cfg.engine == "ray":
        import ray

        ours = not ray.is_initialized()
    results = []
    try:
        if cfg.engine == "ray":
            from util.ray_cluster import start_ray

            start_ray(cfg.address, cfg.num_cpus)
            keep_sigterm()  # ray.init installs its own handler, which exits without a word
        pools = {}
        for setting in settings:
            loaded = codes[setting.run]
            results.append(serve_setting(cfg, setting, loaded, pools, out))
            finished.append(setting.name)
        for pool in pools.values():
            pool.shutdown()
    finally:
        if ours:
            from util.ray_cluster import stop_ray

            stop_ray()
    return results


def serve_setting(cfg: ServeConfig, setting, loaded, pools: dict, out) -> tuple[dict, list[dict]]:
    code = loaded.code
    k, r, need = code_layout(code)
    x, y = loaded.splits.split(cfg.split)
    with torch.no_grad():
        pad_output = code.base(torch.zeros(1, *x.shape[1:]))[0]
    queries = make_queries(cfg, setting.rate, y.numpy())
    folder = Path(cfg.out_dir) / setting.name
    policies = all_policies(cfg)
    names = [p.name or policy_name(p) for p in policies]
    record = {"name": setting.name, "describe": setting.describe(), "run": setting.run, "rate": setting.rate,
              "delay": setting.delay, "k": k, "r": r, "need": need, "strategies": names, "engine": cfg.engine,
              "seed": cfg.seed, "num_queries": cfg.num_queries, "instances": cfg.instances}
    shape = form_of(code).shape(k, r, need)
    print(f"== {setting.name}: {setting.describe()} ({shape}, m={cfg.instances}, engine {cfg.engine})",
          file=out, flush=True)
    summaries, curves, measured = [], {}, []
    for si, (policy, strategy) in enumerate(zip(policies, names)):
        # A policy draws its stragglers as the plain row of its strategy does, so the two compare like for like.
        index = si if si < len(cfg.strategies) else \
            cfg.strategies.index(policy.strategy) if policy.strategy in cfg.strategies else seed_index(policy.strategy)
        plan = with_deadline(build_plan(cfg, policy if si >= len(cfg.strategies) else policy.strategy, k, r,
                                        queries, setting.delay, index, need), cfg, code)
        if cfg.engine == "ray":
            outcome = run_on_ray(cfg, setting, loaded, plan, x, pad_output, pools)
            measured.append((plan.roles, outcome.requests))
        else:
            from serve.simulator.simulate import simulate

            outcome = simulate(plan, cfg, code=code, inputs=x, backup=loaded.backup)
        summary = summarize(outcome, strategy, plan.num_instances, cfg.warmup_queries)
        write_strategy(folder / strategy, outcome, summary)
        summaries.append(summary)
        curves[strategy] = ((outcome.done - outcome.arrival) * 1000.0)[cfg.warmup_queries:]
        print(f"  {strategy}: p50 {summary['p50_ms']:.1f} ms, p99.9 {summary['p99.9_ms']:.1f} ms, "
              f"reconstructed {summary['reconstructed']:.1%}, top-1 {'n/a' if math.isnan(summary['accuracy']) else format(summary['accuracy'], '.2%')}, "
              f"{summary['requests_per_query']:.2f} requests and {summary['busy_ms_per_query']:.2f} instance-ms "
              f"per query", file=out, flush=True)
    atomic_write_text(json.dumps(record, indent=2) + "\n", folder / "setting.json")
    if measured:  # what the simulator's "profile" key reads: compute and overhead per request and instance
        from serve.simulator.simulate import write_profile

        write_profile(folder / "profile.csv", measured)
    if cfg.plot:
        plot_cdf(curves, folder / "cdf.png", setting.describe())
    print(markdown_table(summaries), file=out, flush=True)
    return record, summaries


def check_live_f(cfg: ServeConfig, k: int, r: int, strategies, run: str = "", instances_of=None) -> None:
    """Refuse a strategy whose every F instance fails: the queries after the last failure could not be
    answered (``instances_of(strategy)``: its m, when not ``cfg.instances``, as in the map)."""
    failed = {f["instance"] for f in cfg.failures}
    for strategy in strategies:
        m = instances_of(strategy) if instances_of else cfg.instances
        f_instances = [i for i, role in enumerate(pool_roles(strategy, m, k, r)) if role == ROLE_F]
        if set(f_instances) <= failed:
            where = f" for run '{run}'" if run else ""
            raise ConfigError(f"Config key 'failures': every instance holding F under strategy '{strategy}'{where} "
                              f"(k={k}, r={r}: instances {f_instances[0]}..{f_instances[-1]}) fails, so the queries "
                              f"arriving after the last failure could not be answered. Fix: keep at least one of "
                              f"them live, or drop strategy '{strategy}'.")


def measured_compute_s(code, x) -> float:
    """F's compute time on one query (the median of a few), the least work an instance does per request."""
    with torch.no_grad():
        one = x[:1]
        code.base(one)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            code.base(one)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


SIZE_KEYS = {  # the config key behind each part of a plan's memory (serve.core.limits.plan_bytes), and its fix
    "num_queries": ("num_queries", "lower 'num_queries'."),
    "parities": ("num_queries", "lower 'num_queries'."),
    "groups": ("num_queries", "lower 'num_queries'."),
    "instances": ("instances", "lower 'instances'."),
    "slowdown": ("slowdown", "a longer 'period_ms' in 'slowdown' (its table holds one cell per period and instance)."),
}


def check_sizes(cfg: ServeConfig, codes: dict) -> None:
    """Memory, actors and load of every setting, refused with the figure before any work (serve/core/limits.py)."""
    from serve.core.limits import (MAX_LOAD, check_load, check_plan_sizes, check_ray_actors, instance_count,
                              mean_delay_ms, slow_factor, strategy_load)
    cfg = replace(cfg, strategies=row_strategies(cfg))  # a policy's plan and load are its strategy's
    shapes = sorted({code_layout(c.code)[:2] for c in codes.values()})
    durations = [cfg.num_queries / rate + cfg.group_timeout_ms / 1000.0 for rate in cfg.rates]
    check_plan_sizes(cfg, shapes, durations, lambda s, k, r: instance_count(s, cfg.instances, k, r)[0], SIZE_KEYS)
    if cfg.engine == "ray":  # the pool: the most F, parity and backup actors any strategy needs
        counts = [instance_count(s, cfg.instances, k, r) for k, r in shapes for s in cfg.strategies]
        check_ray_actors(cfg, sum(max(c[i] for c in counts) for i in (1, 2, 3)))
    for setting in expand_settings(cfg):
        loaded = codes[setting.run]
        k, r, _ = code_layout(loaded.code)
        if cfg.engine == "ray":
            compute_ms = 1000.0 * measured_compute_s(loaded.code, loaded.splits.test_x)
        elif cfg.profile:
            from serve.simulator.simulate import read_profile

            compute_ms = float(np.nanmean(read_profile(cfg.profile)["compute_ms"]))
        else:
            compute_ms = least_mean_ms(cfg.service, "service")
        delay_ms = mean_delay_ms(setting.delay, lambda d: least_mean_ms(d, "delays"))
        work_s = (compute_ms + delay_ms) * slow_factor(cfg.slowdown) / 1000.0
        # The keys that set the load: the rate, and whichever of the delay and the service is most of the work.
        label = "Config key 'rates'" + (" with 'delays'" if delay_ms > compute_ms else
                                         " with 'service'" if cfg.engine == "sim" and not cfg.profile else "")
        for strategy in cfg.strategies:
            total, num_f, _, _ = instance_count(strategy, cfg.instances, k, r)
            load = strategy_load(strategy, setting.rate, work_s, k, r, total, num_f)
            check_load(load, f"strategy '{strategy}'", f"{setting.name} ({setting.describe()})", label,
                       f"an arrival rate of at most {setting.rate * MAX_LOAD / load:.3g} queries/s for this setting, "
                       f"or more 'instances'.")


def least_mean_ms(dist: dict, key: str) -> float:
    """A distribution's mean in ms; for a Pareto with no mean (alpha <= 1), its least value, a lower bound
    that is enough to refuse a rate no instance count could serve."""
    from serve.core.limits import mean_ms

    if dist["dist"] == "pareto" and dist["alpha"] <= 1:
        return float(dist["scale_ms"])
    return mean_ms(dist, key)


def remove_result_temps(out_dir: Path) -> None:
    """Remove what a killed results write left under ``out_dir`` (called with its lock held)."""
    if out_dir.is_dir():
        for folder in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
            remove_stale_temps(folder, RESULT_FILES)


Terminated = signals.Terminated  # serve.cli.Terminated, as before
_raise_terminated = signals.raise_terminated
_SIGTERM_OWNED = False  # main() handles SIGTERM; a library caller of serve_all keeps its own handler


def keep_sigterm() -> None:
    if _SIGTERM_OWNED and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def stops_cleanly(work, out_dir: str, command: str, finished: Optional[list] = None) -> int:
    """Run ``work()``; Ctrl-C and SIGTERM end it with one line and exit 130 / 143, after every ``finally``
    (Ray's shutdown, the folder lock) has run. Files of finished settings are complete (atomic writes);
    ``finished``, when given, is the list ``work`` adds each finished setting's name to, and the line
    says how many there are."""
    global _SIGTERM_OWNED
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in signals.STOPS} if main_thread else {}
    signals.raising()
    _SIGTERM_OWNED = main_thread

    def said() -> str:
        if finished is not None and not finished:
            return f"no setting had finished, so nothing under '{out_dir}' is complete"
        done = f"the {len(finished)} setting(s)" if finished else "the settings"
        return f"{done} already finished are complete under '{out_dir}'; rerun {command} to serve them all again"

    try:
        work()
        return 0
    except KeyboardInterrupt:
        print(f"\ninterrupted (Ctrl-C): {said()}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"terminated (SIGTERM): {said()}", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        _SIGTERM_OWNED = False
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_on_ray(cfg: ServeConfig, setting, loaded, plan, x, pad_output, pools: dict):
    from serve.core.batching import batching_of
    from serve.cluster.runtime import Frontend, Pool

    code = loaded.code
    k, r, _ = code_layout(code)
    if setting.run not in pools:
        policies = all_policies(cfg)
        num_f = max(sum(1 for role in pool_roles(p.strategy, cfg.instances, k, r, p.pool) if role == ROLE_F)
                    for p in policies)
        per = parity_per_model(cfg.instances, k)
        split_coded = any(strategy_of(p.strategy).counts(cfg.instances, k, r)[2] and p.pool == "split"
                          for p in policies)  # parity instances (never an N-worker run's)
        with signals.deferred():  # actors starting: a signal is raised once they have
            pools[setting.run] = Pool(code, cfg, num_f, [per] * r if split_coded else [],
                                      loaded.backup, r * per if needs_backup(cfg.strategies) else 0)
    pool = pools[setting.run]
    actors = pool.actors_for(plan.roles)
    frontend = Frontend(plan, actors, code, x, pad_output, batching=batching_of(cfg))  # fixed layouts, policies
    outcome = frontend.run(cfg.interference)
    pool.replace_dead({actors[i] for i in frontend.dead})
    return outcome


def config_command(argv: Optional[list[str]], prog: str, doc: str, example: str) -> tuple[str, dict]:
    """``(config path, --set overrides)`` of a command that takes a serving config."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    ap.add_argument("config", help=f"JSON serving config, e.g. {example}")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (repeatable, VALUE in JSON), e.g. --set num_queries=100")
    args = ap.parse_args(argv)
    return args.config, parse_overrides(args.overrides)


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    cfg = load_serve_config(*config_command(argv, "python -m serve", __doc__, "conf/serve/digits.json"))
    if cfg.engine == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ConfigError("Config key 'engine': \"ray\" needs Ray, which is not installed. Fix: "
                              "pip install -e \".[serve]\", or set \"engine\": \"sim\".") from None
    finished: list = []
    return stops_cleanly(lambda: serve_all(cfg, finished=finished), cfg.out_dir, "python -m serve", finished)
