"""Metric counters and the per-epoch metrics files (CSV + JSON lines).

Every F is scored by the error of its rebuilt (reconstructed) outputs against
F's own outputs, over the outputs that were unavailable:

* ``mse``: mean squared error per output element;
* ``nmse``: normalised MSE, ``mse`` divided by the variance of F's outputs on
  the split (per output coordinate over the split's inputs, averaged over
  coordinates), so 1.0 is what always answering F's mean output would score;
* ``rel_l2``: relative L2 error, ``||rebuilt - F(X)|| / ||F(X)||`` over all
  rebuilt outputs of the split.

A classifier (a labelled dataset, or ``"task": "classification"``) is also
scored by today's accuracies: reconstruction (argmax agrees with F's),
degraded-mode (argmax equals the label) and all-k (:func:`group_hits`).
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import torch

from train.report import whole_lines
from util.files import atomic_write_text

SPLITS = ("train", "val", "test")
FIELDS = ("loss", "recon_acc", "recon_top5", "degraded_acc", "degraded_top5", "base_acc", "group_acc")
ERROR_FIELDS = ("mse", "nmse", "rel_l2")  # every F: the error of the rebuilt outputs (module docstring)
COLUMNS = ["epoch", "seconds"] + [f"{s}_{f}" for s in SPLITS for f in FIELDS + ERROR_FIELDS]
# The columns of an F without classes: no accuracy at all.
REGRESSION_COLUMNS = ["epoch", "seconds"] + [f"{s}_{f}" for s in SPLITS for f in ("loss",) + ERROR_FIELDS]


def columns_for(classify: bool) -> list[str]:
    """The metrics-file columns of a classifier (accuracies and errors) or of any other F (errors)."""
    return COLUMNS if classify else REGRESSION_COLUMNS


def output_variance(fx: torch.Tensor) -> float:
    """The variance of F's outputs ``(N, n)`` over the N inputs, averaged over the n coordinates:
    the denominator of the normalised MSE."""
    return fx.double().var(0, unbiased=False).mean().item()


def error_metrics(rebuilt: torch.Tensor, target: torch.Tensor, variance: float | None = None) -> dict:
    """``{"mse", "rel_l2"[, "nmse"]}`` of ``rebuilt`` against ``target`` (same shape), in one go; the
    normalised MSE needs the ``variance`` of F's outputs (:func:`output_variance`)."""
    err = (rebuilt.double() - target.double()).pow(2).sum().item()
    ref = target.double().pow(2).sum().item()
    return _errors(err, ref, target.numel(), variance)


def _errors(sq_err: float, sq_ref: float, count: float, variance: float | None) -> dict:
    mse = sq_err / count if count else float("nan")
    out = {"mse": mse, "rel_l2": math.sqrt(sq_err / sq_ref) if sq_ref > 0 else float("nan")}
    if variance is not None:
        out["nmse"] = mse / variance if variance > 0 else float("nan")
    return out


def topk_hits(scores: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Hit counts of ``scores`` ``(M, n)`` against T columns of class indices ``targets`` ``(M, T)``.

    Returns ``(T, 2)``: per target column, the top-1 and the top-k hits. One
    ``topk`` serves every column (this runs on every training step).
    """
    k = min(k, scores.shape[1])
    hit = scores.topk(k, dim=1).indices[:, :, None] == targets[:, None, :]  # (M, k, T)
    return torch.stack([hit[:, 0].sum(0), hit.any(1).sum(0)], 1)


def group_hits(recon: torch.Tensor, base_out: torch.Tensor, labels: torch.Tensor,
               unavailable: torch.Tensor) -> torch.Tensor:
    """``[correct, answers]`` over all k answers of every group in every scenario: F's own output
    where it is available, the reconstruction where it is not, against the labels.

    ``recon`` ``(S, B, k, n)``, ``base_out`` ``(B, k, n)``, ``labels`` ``(B, k)``, ``unavailable`` ``(S, k)``.
    This is how a group's k queries are served when r outputs are missing (the measure of
    ApproxIFER's tables); degraded-mode accuracy counts the reconstructed answers alone.
    """
    served = torch.where(unavailable[:, None, :, None], recon, base_out.unsqueeze(0))
    correct = (served.argmax(-1) == labels.unsqueeze(0)).sum()
    return torch.stack([correct.float(), correct.new_tensor(served[..., 0].numel()).float()])


class Tally:
    """Running sums over reconstructed (unavailable) outputs of one split, and over all k answers
    of its groups (:func:`group_hits`, evaluation only).

    Sums stay on the device and are read once, in :meth:`result`, so counting
    never makes a GPU wait. ``classify=False`` (an F without classes) counts
    the errors only; labels are then ignored.
    """

    # [loss * M, recon top-1, recon top-5, degraded top-1, degraded top-5, group correct, group answers,
    #  squared error, squared target, output elements]
    WIDTH = 10

    def __init__(self, classify: bool = True):
        self.classify = classify
        self.sums = None
        self.n = 0

    def add(self, recon: torch.Tensor, base_out: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """``recon`` and ``base_out`` are ``(M, n)``, ``labels`` ``(M,)``, for the M reconstructions."""
        recon, base_out = recon.detach(), base_out.detach()
        m = len(recon)
        if self.classify:
            targets = torch.stack([base_out.detach().argmax(1), labels], 1)
            hits = topk_hits(recon, targets, 5).flatten().float()
        else:
            hits = recon.new_zeros(4, dtype=torch.float32)
        errors = torch.stack([(recon - base_out).double().pow(2).sum(), base_out.double().pow(2).sum()]).float()
        row = torch.cat([(torch.as_tensor(loss).detach().float() * m).reshape(1).to(recon.device), hits,
                         recon.new_zeros(2, dtype=torch.float32), errors,
                         recon.new_tensor([float(recon.numel())], dtype=torch.float32)])
        self.sums = row if self.sums is None else self.sums + row
        self.n += m

    def add_groups(self, hits: torch.Tensor) -> None:
        """Count :func:`group_hits` ``[correct, answers]``."""
        row = torch.cat([hits.new_zeros(5), hits.float(), hits.new_zeros(3)])
        self.sums = row if self.sums is None else self.sums + row

    def result(self, prefix: str, base_acc: float | None = None, out_var: float | None = None) -> dict:
        """The split's row entries ``<prefix>_<field>``: loss, the errors (``nmse`` when ``out_var``, the
        variance of F's outputs, is given) and, for a classifier, the accuracies (F's own: ``base_acc``)."""
        sums = self.sums.tolist() if self.sums is not None else [0.0] * self.WIDTH
        n = max(self.n, 1)
        out = {f"{prefix}_loss": sums[0] / n}
        if self.classify:
            for key, v in zip(FIELDS[1:5], sums[1:5]):
                out[f"{prefix}_{key}"] = v / n
            out[f"{prefix}_base_acc"] = base_acc
            if sums[6] > 0:
                out[f"{prefix}_group_acc"] = sums[5] / sums[6]
        for key, v in _errors(sums[7], sums[8], sums[9], out_var).items():
            out[f"{prefix}_{key}"] = v
        return out


class MetricsLog:
    """One row per epoch in ``metrics.csv`` and ``metrics.jsonl``; rows past a resumed epoch are dropped.

    ``metrics.jsonl`` is the record (the CSV is its copy for spreadsheets). Rows
    are appended as whole lines; a rewrite goes through a temporary file and a
    rename, so a process killed at any moment leaves every finished epoch's row.
    """

    NAMES = ("metrics.csv", "metrics.jsonl")

    def __init__(self, folder: Path, columns: list[str] = COLUMNS):
        self.csv = folder / "metrics.csv"
        self.jsonl = folder / "metrics.jsonl"
        self.columns = columns  # of the CSV (columns_for); the JSON lines hold whatever a row holds

    def rows(self) -> list[dict]:
        """The rows of ``metrics.jsonl``, up to its last whole line (a kill mid-append leaves half a one)."""
        if not self.jsonl.exists():
            return []
        return [json.loads(line) for line in whole_lines(self.jsonl.read_text()) if line.strip()]

    def truncate(self, last_epoch: int) -> None:
        """Keep rows up to ``last_epoch`` (the checkpoint's), rewriting both files atomically."""
        kept = [r for r in self.rows() if r["epoch"] <= last_epoch]
        # The record first: a kill between the two leaves a CSV that the next resume rewrites again.
        atomic_write_text("".join(json.dumps(row) + "\n" for row in kept), self.jsonl)
        out = io.StringIO(newline="")
        writer = csv.DictWriter(out, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        for row in kept:
            writer.writerow({c: _fmt(row.get(c)) for c in self.columns})
        atomic_write_text(out.getvalue(), self.csv)

    def append(self, row: dict) -> None:
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({c: _fmt(row.get(c)) for c in self.columns})
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def _fmt(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def summary_line(row: dict, num_epoch: int) -> str:
    """The epoch's one line: accuracies for a classifier's row, the errors of the rebuilt outputs
    for any other F's (a row without ``*_recon_acc`` prints no accuracy)."""
    parts = [f"epoch {row['epoch']}/{num_epoch}"]
    classify = any(f"{s}_recon_acc" in row for s in SPLITS)
    if row.get("train_loss") is not None:
        if classify:
            parts.append(f"train loss {row['train_loss']:.4g} recon {100 * row['train_recon_acc']:.2f}%")
        else:
            parts.append(f"train loss {row['train_loss']:.4g} mse {row['train_mse']:.4g}")
    for s in ("val", "test"):
        if classify and row.get(f"{s}_recon_acc") is not None:
            parts.append(f"{s} recon {100 * row[f'{s}_recon_acc']:.2f}% degraded "
                         f"{100 * row[f'{s}_degraded_acc']:.2f}% (F {100 * row[f'{s}_base_acc']:.2f}%)")
        elif not classify and row.get(f"{s}_mse") is not None:
            parts.append(f"{s} mse {row[f'{s}_mse']:.4g} nmse {row.get(f'{s}_nmse', float('nan')):.4g} "
                         f"rel-L2 {row[f'{s}_rel_l2']:.4g}")
    parts.append(f"{row['seconds']:.2f}s")
    return " | ".join(parts)
