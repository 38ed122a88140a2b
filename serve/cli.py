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
import sys
from pathlib import Path
from typing import Optional

import torch

from serve.config import STRATEGIES, ServeConfig, all_policies, expand_settings, load_serve_config, policy_name
from serve.plan import ROLE_F, build_plan, check_failed_instances, make_queries, parity_per_model, pool_roles
from serve.results import markdown_table, plot_cdf, summarize, write_strategy
from coders.config import parse_overrides
from util.errors import ConfigError, UserError, exits_on_user_error
from util.files import atomic_write_text


def load_codes(cfg: ServeConfig) -> dict:
    """Each run folder's trained code, loaded once (a bad folder is a UserError before any serving)."""
    from coders.code import load_code

    codes = {}
    for run in cfg.runs:
        if run not in codes:
            codes[run] = load_code(run, cfg.checkpoint, "cpu", cfg.data_dir)
            codes[run].backup = load_backup(cfg, codes[run].splits) if "backup" in cfg.strategies else None
    return codes


def load_backup(cfg: ServeConfig, splits) -> torch.nn.Module:
    """The backup model of strategy "backup", built for the run's dataset and loaded from its file."""
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
        check_failed_instances(cfg, loaded.code.k, loaded.code.r, cfg.strategies, run)
        if any(p.pool == "shared" for p in all_policies(cfg)) and loaded.code.parity_models is not None:
            raise ConfigError(f"Config key 'policies': \"pool\": \"shared\" serves parities on F's instances, but "
                              f"run '{run}' sends its parities through parity models. Fix: use \"pool\": "
                              f"\"split\" for this run (its data instances still balance among themselves).")
        if cfg.interference is not None:
            for i in cfg.interference["instances"]:
                if i >= cfg.instances:
                    raise ConfigError(f"Config key 'interference': instance {i} is not one of the {cfg.instances} "
                                      f"instances every strategy has (0..{cfg.instances - 1}).")


def serve_all(cfg: ServeConfig, out=None) -> list[tuple[dict, list[dict]]]:
    """Run every setting and strategy; returns ``[(setting record, [summary per strategy]), ...]``."""
    out = out or sys.stdout
    codes = load_codes(cfg)
    check_failures(cfg, codes)
    settings = expand_settings(cfg)
    started = False
    if cfg.engine == "ray":
        from util.ray_cluster import start_ray

        started = start_ray(cfg.address, cfg.num_cpus)
    results = []
    try:
        pools = {}
        for setting in settings:
            loaded = codes[setting.run]
            results.append(serve_setting(cfg, setting, loaded, pools, out))
        for pool in pools.values():
            pool.shutdown()
    finally:
        if started:
            import ray

            ray.shutdown()
    return results


def serve_setting(cfg: ServeConfig, setting, loaded, pools: dict, out) -> tuple[dict, list[dict]]:
    code = loaded.code
    k, r = code.k, code.r
    x, y = loaded.splits.split(cfg.split)
    with torch.no_grad():
        pad_output = code.base(torch.zeros(1, *x.shape[1:]))[0]
    queries = make_queries(cfg, setting.rate, y.numpy())
    folder = Path(cfg.out_dir) / setting.name
    policies = all_policies(cfg)
    names = [p.name or policy_name(p) for p in policies]
    record = {"name": setting.name, "describe": setting.describe(), "run": setting.run, "rate": setting.rate,
              "delay": setting.delay, "k": k, "r": r, "strategies": names, "engine": cfg.engine,
              "seed": cfg.seed, "num_queries": cfg.num_queries, "instances": cfg.instances}
    print(f"== {setting.name}: {setting.describe()} (k={k}, r={r}, m={cfg.instances}, engine {cfg.engine})",
          file=out, flush=True)
    summaries, curves, measured = [], {}, []
    for si, (policy, strategy) in enumerate(zip(policies, names)):
        # A policy draws its stragglers as the plain row of its strategy does, so the two compare like for like.
        index = si if si < len(cfg.strategies) else \
            cfg.strategies.index(policy.strategy) if policy.strategy in cfg.strategies else STRATEGIES.index(policy.strategy)
        plan = build_plan(cfg, policy if si >= len(cfg.strategies) else policy.strategy, k, r, queries,
                          setting.delay, index)
        if cfg.engine == "ray":
            outcome = run_on_ray(cfg, setting, loaded, plan, x, pad_output, pools)
            measured.append((plan.roles, outcome.requests))
        else:
            from serve.sim import simulate

            outcome = simulate(plan, cfg, code=code, inputs=x, backup=loaded.backup)
        summary = summarize(outcome, strategy, plan.num_instances, cfg.warmup_queries)
        write_strategy(folder / strategy, outcome, summary)
        summaries.append(summary)
        curves[strategy] = ((outcome.done - outcome.arrival) * 1000.0)[cfg.warmup_queries:]
        print(f"  {strategy}: p50 {summary['p50_ms']:.1f} ms, p99.9 {summary['p99.9_ms']:.1f} ms, "
              f"reconstructed {summary['reconstructed']:.1%}, top-1 {summary['accuracy']:.2%}, "
              f"{summary['requests_per_query']:.2f} requests and {summary['busy_ms_per_query']:.2f} instance-ms "
              f"per query", file=out, flush=True)
    atomic_write_text(json.dumps(record, indent=2) + "\n", folder / "setting.json")
    if measured:  # what the simulator's "profile" key reads: compute and overhead per request and instance
        from serve.sim import write_profile

        write_profile(folder / "profile.csv", measured)
    if cfg.plot:
        plot_cdf(curves, folder / "cdf.png", setting.describe())
    print(markdown_table(summaries), file=out, flush=True)
    return record, summaries


def run_on_ray(cfg: ServeConfig, setting, loaded, plan, x, pad_output, pools: dict):
    from serve.runtime import Frontend, PolicyFrontend, Pool

    code = loaded.code
    if setting.run not in pools:
        policies = all_policies(cfg)
        num_f = max(sum(1 for role in pool_roles(p.strategy, cfg.instances, code.k, code.r, p.pool) if role == ROLE_F)
                    for p in policies)
        per = parity_per_model(cfg.instances, code.k)
        split_coded = any(p.strategy == "coded" and p.pool == "split" for p in policies)
        pools[setting.run] = Pool(code, cfg, num_f, [per if split_coded else 0] * code.r,
                                  loaded.backup, code.r * per if "backup" in cfg.strategies else 0)
    pool = pools[setting.run]
    actors = pool.actors_for(plan.roles)
    if plan.dynamic:
        frontend = PolicyFrontend(plan, actors, code, x, pad_output)
    else:
        frontend = Frontend(plan, actors, code, x, pad_output)
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
    serve_all(cfg)
    return 0
