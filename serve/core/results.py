"""Figures of a served strategy: what happened to each query, the per-query CSV, the summary, the latency CDF
and markdown tables.

Shared by the Ray runtime, the simulator and the HTTP load generator: each hands over an :class:`Outcome`
(arrays per query); the load generator has no frontend cost or request log to give, so it leaves those empty.
"""
from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from util.files import atomic_write_text

PERCENTILES = (50, 90, 99, 99.9)


@dataclass
class Outcome:
    """What happened to every query of one strategy (arrays of length N, times in seconds)."""

    arrival: np.ndarray
    done: np.ndarray
    reconstructed: np.ndarray
    retried: np.ndarray
    predicted: np.ndarray
    label: np.ndarray
    image: np.ndarray
    frontend_s: dict = field(default_factory=dict)  # seconds the frontend spent encoding, dispatching, decoding
    requests: dict = field(default_factory=dict)    # per request: instance, role, sent, done, compute, delay, ...
    answers: Optional[np.ndarray] = None  # how many times each query was answered (1 when all is well)
    outputs: Optional[np.ndarray] = None  # (N, n): each query's served answer (F's output or a reconstruction)
    used: Optional[np.ndarray] = None     # per query: the outputs its decode used (0: its own output answered it)
# Files written (atomically) under a serving or map out_dir; a killed write leaves "<name>.<random>.tmp".
RESULT_FILES = ("setting.json", "queries.csv", "requests.csv", "summary.json", "profile.csv", "map.csv")
SUMMARY_COLUMNS = [  # (key, header, format)
    ("strategy", "strategy", "{}"),
    ("instances", "instances", "{}"),
    ("p50_ms", "p50 (ms)", "{:.1f}"),
    ("p90_ms", "p90 (ms)", "{:.1f}"),
    ("p99_ms", "p99 (ms)", "{:.1f}"),
    ("p99.9_ms", "p99.9 (ms)", "{:.1f}"),
    ("max_ms", "max (ms)", "{:.1f}"),
    ("mean_ms", "mean (ms)", "{:.1f}"),
    ("gap_ms", "p99.9 - p50 (ms)", "{:.1f}"),
    ("reconstructed", "reconstructed (%)", "{:.2%}"),
    ("accuracy", "served top-1 (%)", "{:.2%}"),
    ("accuracy_reconstructed", "top-1 on reconstructed (%)", "{:.2%}"),
    ("throughput", "throughput (q/s)", "{:.1f}"),
    ("requests_per_query", "requests started / query", "{:.3f}"),
    ("busy_ms_per_query", "busy instance-ms / query", "{:.2f}"),
]


def summarize(outcome, strategy: str, instances: int, warmup: int = 0) -> dict:
    """The summary figures of one strategy; the first ``warmup`` queries are left out."""
    keep = slice(warmup, None)
    arrival, done = outcome.arrival[keep], outcome.done[keep]
    latency_ms = (done - arrival) * 1000.0
    recon = outcome.reconstructed[keep]
    correct = outcome.predicted[keep] == outcome.label[keep]
    out = {"strategy": strategy, "instances": instances, "queries": int(len(latency_ms))}
    for p in PERCENTILES:
        out[f"p{p:g}_ms"] = float(np.percentile(latency_ms, p))
    out["max_ms"] = float(latency_ms.max())
    out["mean_ms"] = float(latency_ms.mean())
    out["gap_ms"] = out["p99.9_ms"] - out["p50_ms"]
    out["reconstructed"] = float(recon.mean())
    # predictions of -1: none were made (no code given, or a strategy such as nworker whose code is not served)
    scored = bool((outcome.predicted[keep] >= 0).any())
    out["accuracy"] = float(correct.mean()) if scored else float("nan")
    out["accuracy_reconstructed"] = float(correct[recon].mean()) if recon.any() and scored else float("nan")
    span = float(done.max() - arrival.min())
    out["throughput"] = len(latency_ms) / span if span > 0 else float("nan")
    out["retried"] = float(np.mean(outcome.retried[keep]))
    used = getattr(outcome, "used", None)
    if used is not None and recon.any():  # the outputs a decode used, over the decoded queries
        out["outputs_used_mean"] = float(np.mean(used[keep][recon]))
    out.update(extra_work(getattr(outcome, "requests", None) or {}, len(outcome.arrival)))
    cost = getattr(outcome, "frontend_s", None) or {}
    for name, seconds in cost.items():
        out[f"frontend_{name}_us_per_query"] = 1e6 * seconds / len(outcome.arrival)
    return out


def extra_work(requests: dict, num_queries: int) -> dict:
    """What a strategy spent per query, over all its queries: requests sent, started (that held an instance)
    and cancelled before they started, and instance-milliseconds held. A request the runtime measured holds
    its instance for (compute + delay) x factor; one lost to a failure counts only where the simulator knows
    how long it ran."""
    inst = np.asarray(requests.get("instance", []))
    if num_queries == 0:
        return {}
    ok = np.asarray(requests.get("ok", np.zeros(len(inst), dtype=bool)), dtype=bool)
    if "busy" in requests:
        busy = np.asarray(requests["busy"], dtype=float)
        started = np.asarray(requests["started"], dtype=bool)
    else:
        held = (np.asarray(requests.get("compute", []), dtype=float) + np.asarray(requests.get("delay", []),
                dtype=float)) * np.asarray(requests.get("factor", []), dtype=float)
        busy = np.where(ok, held, 0.0) if len(inst) else np.zeros(0)
        started = ok
    cancelled = np.asarray(requests.get("cancelled", np.zeros(len(inst), dtype=bool)), dtype=bool)
    return {"requests_sent_per_query": len(inst) / num_queries,
            "requests_per_query": float(started.sum()) / num_queries,
            "cancelled_per_query": float(cancelled.sum()) / num_queries,
            "busy_ms_per_query": 1000.0 * float(np.nansum(busy)) / num_queries}


def queries_csv(outcome) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["query", "image", "arrival_s", "completion_s", "latency_ms", "reconstructed", "retried",
                "predicted", "label", "outputs_used"])
    used = getattr(outcome, "used", None)
    used = used if used is not None else np.zeros(len(outcome.arrival), dtype=int)
    for q in range(len(outcome.arrival)):
        w.writerow([q, int(outcome.image[q]), f"{outcome.arrival[q]:.6f}", f"{outcome.done[q]:.6f}",
                    f"{1000 * (outcome.done[q] - outcome.arrival[q]):.3f}", int(outcome.reconstructed[q]),
                    int(outcome.retried[q]), int(outcome.predicted[q]), int(outcome.label[q]), int(used[q])])
    return buf.getvalue()


def requests_csv(requests: dict) -> str:
    """Per request: instance, role (-1 F, j parity j), sent and done (s), compute, delay (ms), factor, ok."""
    buf = io.StringIO()
    w = csv.writer(buf)
    names = ["instance", "role", "sent_s", "done_s", "compute_ms", "delay_ms", "factor", "ok"]
    w.writerow(names)
    n = len(requests.get("instance", []))
    for i in range(n):
        w.writerow([int(requests["instance"][i]), int(requests["role"][i]), f"{requests['sent'][i]:.6f}",
                    f"{requests['done'][i]:.6f}", f"{1000 * requests['compute'][i]:.4f}",
                    f"{1000 * requests['delay'][i]:.3f}", f"{requests['factor'][i]:g}", int(requests["ok"][i])])
    return buf.getvalue()


def write_strategy(folder: Path, outcome, summary: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(queries_csv(outcome), folder / "queries.csv")
    if getattr(outcome, "requests", None):
        atomic_write_text(requests_csv(outcome.requests), folder / "requests.csv")
    atomic_write_text(json.dumps(summary, indent=2) + "\n", folder / "summary.json")


def markdown_table(rows: Sequence[dict], columns=SUMMARY_COLUMNS) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" if k == "strategy" else "---:" for k, _, _ in columns) + "|"]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            v = row.get(key)
            cells.append("n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_cdf(curves: dict, path: Path, title: str) -> Optional[Path]:
    """Latency CDF per strategy, with the tail on a log scale (1 - CDF down to 1e-3)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax, tail) = plt.subplots(1, 2, figsize=(11, 4))
    for name, latency_ms in curves.items():
        x = np.sort(latency_ms)
        cdf = np.arange(1, len(x) + 1) / len(x)
        ax.plot(x, cdf, label=name)
        tail.plot(x, 1.0 - cdf + 1.0 / len(x), label=name)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of queries answered")
    fig.suptitle(textwrap.fill(title, 110), fontsize=9)
    tail.set_yscale("log")
    tail.set_xscale("log")
    tail.set_xlabel("latency (ms)")
    tail.set_ylabel("fraction slower (1 - CDF)")
    tail.set_title("the tail, log scales", fontsize=9)
    for a in (ax, tail):
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_summaries(out_dir: Path) -> list[tuple[dict, list[dict]]]:
    """``[(setting, [summary per strategy]), ...]`` of every setting under ``out_dir``."""
    found = []
    for setting_file in sorted(Path(out_dir).glob("*/setting.json")):
        setting = json.loads(setting_file.read_text())
        rows = []
        for name in setting.get("strategies", []):
            path = setting_file.parent / name / "summary.json"
            if path.is_file():
                rows.append(json.loads(path.read_text()))
        found.append((setting, rows))
    return found


def report(out_dir: Path) -> str:
    parts = []
    for setting, rows in read_summaries(out_dir):
        parts.append(f"### {setting['name']}: {setting['describe']}\n\n{markdown_table(rows)}\n")
    return "\n".join(parts)
