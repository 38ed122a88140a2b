"""``python -m serve.map CONFIG.json [--set KEY=VALUE ...]``: where coding wins p99.9 at equal cost.

The config is a serving config (the simulator's keys: ``instances``,
``num_queries``, ``service`` or ``profile``, ``delays``, ``group_timeout_ms``,
``slowdown``, ``failures``, ``seed``, ``out_dir``, ``strategies``) plus a
``map`` object of sweep lists:

* ``loads``: utilisation of the equal-cost budget, i.e. arrival rate x mean
  work per request (service + injected delay) / B, where B = m + r ceil(m/k)
  is the coded strategy's instance count;
* ``straggler_rates``: the probability that a request gets the injected delay
  of the one model in ``delays`` (its own ``probability`` is replaced);
* ``k_vals``, ``r_vals``: the code's shape.

In every cell the strategies get the same B instances: ``coded`` m data +
r ceil(m/k) parity instances, ``equal-resources`` B, ``replicate`` B/2
pairs (rounded down); ``none`` keeps m and is shown for reference, but it
never wins (it has fewer instances). The table names the strategy with the
lowest p99.9 latency and the factor by which it beats the runner-up; the
heatmap (``out_dir/map.png``, one panel per k and r, load against straggler
rate) colours log2(best other p99.9 / coded p99.9): positive where coding
wins. ``out_dir/map.csv`` holds every figure.

The config's ``policies`` (shortest-queue routing, pooled instances,
cancellation, deferred parities, hedged copies: :mod:`serve.core.policy`) are
rows of their own, on the same B instances; with any, a second heatmap
(``out_dir/map_policies.png``) colours log2(best other p99.9 / best coded
p99.9) over every row, and each cell also records each row's requests
started and busy instance-milliseconds per query.
"""
from __future__ import annotations

import csv
import io
import itertools
import math
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from serve.core.config import ServeConfig, all_policies, policy_name, row_strategies, validate
from serve.core.plan import Queries, build_plan, parity_per_model
from serve.core.limits import mean_ms
from serve.core.results import extra_work
from serve.core.strategies import REGISTRY, seed_index
from serve.core.strategies import get as strategy_of
from serve.simulator.simulate import read_profile, simulate
from coders.config import read_json_config
from util.errors import ConfigError, exits_on_user_error
from util.files import atomic_write_text

MAP_KEYS = {
    "loads": ([0.2, 0.4, 0.6], "utilisations of the equal-cost budget, each above 0"),
    "straggler_rates": ([0.001, 0.01, 0.05], "probabilities of a straggling request, from 0 to 1"),
    "k_vals": ([2, 4], "numbers of data queries per group, each 1 or more"),
    "r_vals": ([1, 2], "numbers of parities per group, each 1 or more"),
}
REFUSED = {"runs": "the map sweeps k and r itself and runs no trained code",
           "rates": "the map derives arrival rates from \"map\": {\"loads\"}"}
EQUAL_COST = tuple(s.name for s in REGISTRY.values() if s.equal_cost)  # the built-in rows of the comparison


def coded_row(names) -> Optional[str]:
    """The first of ``names`` (strategies) that is the map's coded side, or None."""
    return next((s for s in names if strategy_of(s).map_coded), None)


def read_map_config(path: str | Path, overrides: Optional[dict] = None) -> tuple[ServeConfig, dict]:
    path = Path(path)
    source = f"map config '{path}'"
    raw = read_json_config(path, "such as conf/map/stragglers.json")
    if isinstance(raw, dict) and overrides:
        raw = {**raw, **overrides}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a JSON object of keys.")
    raw = dict(raw)
    sweep = raw.pop("map", {})
    for key, why in REFUSED.items():
        if key in raw:
            raise ConfigError(f"{source}: config key '{key}' does not apply to the map: {why}. Fix: remove it.")
    cfg = validate({**raw, "engine": "sim"}, source, need_runs=False)
    if not isinstance(sweep, dict):
        raise ConfigError(f"{source}: config key 'map' must be an object with the lists "
                          f"{', '.join(MAP_KEYS)}; got {sweep!r}.")
    unknown = set(sweep) - set(MAP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: config key 'map.{sorted(unknown)[0]}' is unknown; the map sweeps "
                          f"{', '.join(MAP_KEYS)}.")
    lists = {}
    for key, (default, what) in MAP_KEYS.items():
        values = sweep.get(key, default)
        ok = isinstance(values, list) and values and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if ok and key == "loads":
            ok = all(v > 0 for v in values)
        elif ok and key == "straggler_rates":
            ok = all(0 <= v <= 1 for v in values)
        elif ok:
            ok = all(isinstance(v, int) and v >= 1 for v in values)
        if not ok:
            raise ConfigError(f"{source}: config key 'map.{key}' must be a non-empty list of {what}; got "
                              f"{values!r}.")
        lists[key] = [float(v) for v in values] if key in ("loads", "straggler_rates") else list(values)
    if len(cfg.delays) != 1:
        raise ConfigError(f"{source}: config key 'delays' must hold exactly one delay model for the map (the "
                          f"straggler's delay; its probability is swept by 'map.straggler_rates'); got "
                          f"{len(cfg.delays)}.")
    if cfg.delays[0]["dist"] == "none":
        raise ConfigError(f"{source}: config key 'delays' gives no delay (\"dist\": \"none\"), so no request can "
                          f"straggle. Fix: a delay model such as {{\"dist\": \"constant\", \"ms\": 50}}.")
    rows = [strategy_of(p.strategy) for p in all_policies(cfg)]
    if not any(s.map_coded for s in rows) or not any(s.equal_cost and not s.map_coded for s in rows):
        coded = " or ".join(f"\"{s.name}\"" for s in REGISTRY.values() if s.map_coded)
        plain = ", ".join(f"\"{s.name}\"" for s in REGISTRY.values() if s.equal_cost and not s.map_coded)
        raise ConfigError(f"{source}: config key 'strategies' must include {coded} and one of {plain} (or "
                          f"'policies' of them) for the map to compare; got {cfg.strategies}.")
    check_map(cfg, lists, source)
    return cfg, lists


def cell_instances(cfg: ServeConfig, strategy: str, k: int, r: int) -> int:
    """The m a strategy is given in a cell: B/2 pairs for ``replicate``, ``instances`` otherwise (see run_cell;
    :meth:`serve.core.strategies.Strategy.map_instances`)."""
    budget = cfg.instances + r * parity_per_model(cfg.instances, k)
    return max(strategy_of(strategy).map_instances(cfg.instances, budget), 1)


def check_map(cfg: ServeConfig, lists: dict, source: str) -> None:
    """What every cell needs, checked before the first: a group of k can fill, requests do some work, the
    loads can be served, the plans fit in memory, and every strategy keeps a live F instance."""
    from serve.cli import SIZE_KEYS, check_live_f
    from serve.core.limits import MAX_LOAD, check_plan_sizes, instance_count
    from serve.core.plan import check_failed_instances

    big = [k for k in lists["k_vals"] if k > cfg.num_queries]
    if big:
        raise ConfigError(f"{source}: config key 'map.k_vals' holds k={big[0]}, more than the {cfg.num_queries:,} "
                          f"queries of a cell ('num_queries'), so no group of k could ever fill. Fix: k_vals of "
                          f"at most num_queries.")
    for rate in lists["straggler_rates"]:
        if mean_work_ms(cfg, rate) <= 0:
            what = f"profile '{cfg.profile}'" if cfg.profile else "'service'"
            raise ConfigError(f"{source}: config key 'service': {what} gives requests no compute time and straggler "
                              f"rate {rate:g} adds no delay, so a load cannot set an arrival rate (it would be "
                              f"infinite). Fix: a service time above 0 ms, or straggler rates above 0.")
    for load in lists["loads"]:
        if load > MAX_LOAD:
            raise ConfigError(f"{source}: config key 'map.loads' holds {load:g}: at a load above {MAX_LOAD:g} the "
                              f"queues grow for the whole run, so every strategy's latency would measure the run's "
                              f"length, not the strategy. Fix: loads of at most {MAX_LOAD:g} (below 1 for a steady "
                              f"state).")
        if load > 1:
            print(f"warning: 'map.loads' holds {load:g} (above 1): the queues grow for the whole run, and the "
                  f"latencies of those cells grow with num_queries.", file=sys.stderr)
    cells = [(k, r) for k in lists["k_vals"] for r in lists["r_vals"]]
    # Every row's strategy, the policies' too (a policy's plan is its strategy's plan, as large).
    cfg = replace(cfg, strategies=row_strategies(cfg))
    durations = []
    for k, r in cells:
        budget = cfg.instances + r * parity_per_model(cfg.instances, k)
        for rate in lists["straggler_rates"]:
            durations += [cfg.num_queries * mean_work_ms(cfg, rate) / 1000.0 / (load * budget)
                          for load in lists["loads"]]
    check_plan_sizes(cfg, cells, [max(durations)], lambda s, k, r: instance_count(s, cell_instances(cfg, s, k, r), k, r)[0],
                     {**SIZE_KEYS, "groups": ("map.k_vals", "smaller 'map.k_vals' (or fewer 'num_queries')."),
                      "parities": ("map.r_vals", "smaller 'map.r_vals' (or fewer 'num_queries').")})
    for k, r in cells:
        for strategy in cfg.strategies:
            check_failed_instances(replace(cfg, instances=cell_instances(cfg, strategy, k, r)), k, r, [strategy])
        check_live_f(cfg, k, r, cfg.strategies, instances_of=lambda s: cell_instances(cfg, s, k, r))


def mean_work_ms(cfg: ServeConfig, straggler_rate: float) -> float:
    """Mean time a request holds an instance: compute plus the expected injected delay."""
    if cfg.profile:
        compute = read_profile(cfg.profile)["compute_ms"]
        base = float(np.nanmean(compute))
    else:
        base = mean_ms(cfg.service, "service")
    return base + straggler_rate * mean_ms(cfg.delays[0], "delays")


def run_cell(cfg: ServeConfig, load: float, rate_s: float, k: int, r: int) -> dict:
    m = cfg.instances
    budget = m + r * parity_per_model(m, k)
    work_s = mean_work_ms(cfg, rate_s) / 1000.0
    arrival_rate = load * budget / work_s
    delay = {**cfg.delays[0], "probability": rate_s}
    n = cfg.num_queries
    arrivals = np.cumsum(np.random.default_rng([cfg.seed, 0]).exponential(1.0 / arrival_rate, n))
    queries = Queries(arrivals, np.zeros(n, dtype=int), np.zeros(n, dtype=int))
    row: dict[str, Any] = {"load": load, "straggler_rate": rate_s, "k": k, "r": r, "budget": budget,
                           "arrival_rate": arrival_rate}
    kinds = {}
    for i, policy in enumerate(all_policies(cfg)):
        name = policy_name(policy)
        strategy = policy.strategy
        kinds[name] = strategy_of(strategy)
        scfg = replace(cfg, instances=cell_instances(cfg, strategy, k, r))
        plan = build_plan(scfg, policy if i >= len(cfg.strategies) else strategy, k, r, queries, delay,
                          seed_index(strategy))
        out = simulate(plan, scfg)
        latency = (out.done - out.arrival)[cfg.warmup_queries:] * 1000.0
        work = extra_work(out.requests, n)
        row[f"{name}_instances"] = plan.num_instances
        row[f"{name}_p50_ms"] = float(np.percentile(latency, 50))
        row[f"{name}_p99.9_ms"] = float(np.percentile(latency, 99.9))
        row[f"{name}_requests"] = work["requests_per_query"]
        row[f"{name}_busy_ms"] = work["busy_ms_per_query"]
    contenders = sorted((row[f"{s}_p99.9_ms"], s) for s in kinds if kinds[s].equal_cost)
    row["winner"] = contenders[0][1]
    row["factor"] = contenders[1][0] / contenders[0][0] if len(contenders) > 1 else float("nan")
    coded_name = coded_row(cfg.strategies)
    plain = [(row[f"{s}_p99.9_ms"], s) for s in cfg.strategies if strategy_of(s).equal_cost and s != coded_name]
    row["coded_gain"] = min(plain)[0] / row[f"{coded_name}_p99.9_ms"] if plain and coded_name else float("nan")
    coded = [(p, s) for p, s in contenders if kinds[s].map_coded]
    others = [(p, s) for p, s in contenders if not kinds[s].map_coded]
    row["best_coded"], row["best_other"] = min(coded)[1], min(others)[1]
    row["policy_gain"] = min(others)[0] / min(coded)[0]
    return row


def sweep(cfg: ServeConfig, lists: dict, out=None, partial: Optional[Path] = None) -> list[dict]:
    """Every cell; with ``partial``, the CSV of the cells so far is rewritten after each one."""
    out = out or sys.stdout
    rows = []
    names = row_names(cfg)
    for k, r, load, rate_s in itertools.product(lists["k_vals"], lists["r_vals"], lists["loads"],
                                                lists["straggler_rates"]):
        rows.append(run_cell(cfg, load, rate_s, k, r))
        print(format_row(rows[-1], names), file=out, flush=True)
        if partial is not None:
            write_csv(rows, partial)
    return rows


def row_names(cfg: ServeConfig) -> list[str]:
    return [policy_name(p) for p in all_policies(cfg)]


def header(strategies: list[str]) -> str:
    cols = ["k", "r", "load", "straggler rate", "instances (B)"] + [f"{s} p99.9 (ms)" for s in strategies] + \
        ["wins p99.9", "by (x runner-up)"]
    return "| " + " | ".join(cols) + " |\n|" + "|".join("---:" for _ in cols) + "|"


def format_row(row: dict, strategies: list[str]) -> str:
    cells = [row["k"], row["r"], f"{row['load']:g}", f"{row['straggler_rate']:g}", row["budget"]] + \
        [f"{row[f'{s}_p99.9_ms']:.1f}" for s in strategies] + [row["winner"], f"{row['factor']:.2f}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


def plot_map(rows: list[dict], lists: dict, path: Path, title: str, gain: str = "coded_gain",
             label: str = "log2(best other p99.9 / coded p99.9)", text=None) -> Optional[Path]:
    """One panel per (k, r): load (rows) x straggler rate (columns), colour log2 of ``gain`` (best other /
    coded); ``text(row)`` is each cell's label (default: the winner and its factor over the runner-up)."""
    text = text or (lambda row: f"{row['winner'][:3]}\n{row['factor']:.2f}x")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ks, rs, loads, rates = lists["k_vals"], lists["r_vals"], lists["loads"], lists["straggler_rates"]
    fig, axes = plt.subplots(len(ks), len(rs), figsize=(3.2 * len(rs) + 1.2, 2.6 * len(ks) + 0.8), squeeze=False)
    index = {(row["k"], row["r"], row["load"], row["straggler_rate"]): row for row in rows}
    limit = max(1.0, max(abs(math.log2(row[gain])) for row in rows if row[gain] > 0))
    image = None
    for a, k in enumerate(ks):
        for b, r in enumerate(rs):
            ax = axes[a][b]
            grid = np.array([[math.log2(index[(k, r, ld, rt)][gain]) for rt in rates] for ld in loads])
            image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, origin="lower", aspect="auto")
            for i, ld in enumerate(loads):
                for j, rt in enumerate(rates):
                    row = index[(k, r, ld, rt)]
                    ax.text(j, i, text(row), ha="center", va="center", fontsize=6,
                            color="white" if abs(grid[i, j]) > 0.6 * limit else "black")
            ax.set_xticks(range(len(rates)), [f"{v:g}" for v in rates], fontsize=7)
            ax.set_yticks(range(len(loads)), [f"{v:g}" for v in loads], fontsize=7)
            ax.set_title(f"k = {k}, r = {r}", fontsize=9)
            if a == len(ks) - 1:
                ax.set_xlabel("straggler rate", fontsize=8)
            if b == 0:
                ax.set_ylabel("load", fontsize=8)
    fig.suptitle(textwrap.fill(title, 90), fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label=label)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    from serve.cli import config_command, stops_cleanly

    cfg, lists = read_map_config(*config_command(argv, "python -m serve.map", __doc__, "conf/map/stragglers.json"))
    d = cfg.delays[0]
    params = ", ".join(f"{key}={v}" for key, v in d.items() if key not in ("dist", "probability"))
    service = f"profile {cfg.profile}" if cfg.profile else \
        f"{cfg.service['dist']} service ({', '.join(f'{a}={v}' for a, v in cfg.service.items() if a != 'dist')})"
    title = (f"m = {cfg.instances} data instances, {service}, stragglers {d['dist']} ({params}), "
             f"{cfg.num_queries:,} queries per cell")
    return stops_cleanly(lambda: run_map(cfg, lists, title), cfg.out_dir, "python -m serve.map")


def run_map(cfg: ServeConfig, lists: dict, title: str) -> None:
    from serve.cli import remove_result_temps
    from util.lock import folder_lock

    out = Path(cfg.out_dir)
    with folder_lock(out, "map results folder"):  # one writer; its temporaries are stale
        remove_result_temps(out)
        print(f"{title}\n", flush=True)
        print(header(row_names(cfg)), flush=True)
        rows = sweep(cfg, lists, partial=out / "map.partial.csv")
        write_csv(rows, out / "map.csv")
        (out / "map.partial.csv").unlink()
        coded_name = coded_row(cfg.strategies)
        wins = sum(row["winner"] == coded_name for row in rows)
        print(f"\n{coded_row(REGISTRY)} wins p99.9 in {wins} of {len(rows)} cells; figures in {out / 'map.csv'}")
        if cfg.policies:
            near = sum(row["policy_gain"] >= 1 / 1.1 for row in rows)
            print(f"the best coded policy has the lowest p99.9, or is within 10% of it, in {near} of {len(rows)} "
                  f"cells")
            print("\n" + policy_table(rows, lists))
        if cfg.plot and coded_name and plot_map(rows, lists, out / "map.png", title):
            print(f"heatmap: {out / 'map.png'}")
        if cfg.plot and cfg.policies and plot_map(
                rows, lists, out / "map_policies.png", title + " | best coded policy against best other",
                gain="policy_gain", label="log2(best other p99.9 / best coded p99.9)",
                text=lambda row: f"{row['policy_gain']:.2f}x"):
            print(f"heatmap of the policies: {out / 'map_policies.png'}")


def policy_table(rows: list[dict], lists: dict) -> str:
    """Markdown: per (k, r) and load, each straggler rate's best-other p99.9 / best-coded p99.9 (bold where
    the best coded policy is within 10% of the lowest), with the two rows' names."""
    rates = lists["straggler_rates"]
    lines = ["| k, r | load | " + " | ".join(f"stragglers {v:g}" for v in rates) + " |",
             "|---|---:|" + "---|" * len(rates)]
    index = {(row["k"], row["r"], row["load"], row["straggler_rate"]): row for row in rows}
    for k, r in itertools.product(lists["k_vals"], lists["r_vals"]):
        for load in lists["loads"]:
            cells = []
            for rate in rates:
                row = index[(k, r, load, rate)]
                gain = row["policy_gain"]
                text = f"{gain:.2f}x ({short(row['best_coded'])} / {short(row['best_other'])})"
                cells.append(f"**{text}**" if gain >= 1 / 1.1 else text)
            lines.append(f"| {k}, {r} | {load:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def short(name: str) -> str:
    """A row name small enough for a heatmap cell."""
    for strategy in REGISTRY.values():
        name = name.replace(strategy.name, strategy.label)
    return name.replace("+cancel", "+c").replace("+pooled", "+pool")


if __name__ == "__main__":
    raise SystemExit(main())
