"""Atomic checkpoints holding everything a run needs to continue exactly."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from util.errors import UserError
from util.util import atomic_save

FORMAT = 1
# Keys of a run's resolved config that must match for a checkpoint to be resumed.
IDENTITY_KEYS = ("dataset", "model", "k", "r", "loss", "encoder", "decoder",
                 "train_encoder", "train_decoder", "train_parity_model", "parity_model", "seed", "run_seed")


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_save({"format": FORMAT, **state}, path)


def load_checkpoint(path: Path, expected: dict | None = None) -> dict[str, Any]:
    """Read a checkpoint; a damaged file or one from another run is a UserError naming it."""
    if not path.is_file():
        raise UserError(f"Checkpoint '{path}' does not exist. Fix: train the run first, or check 'save_dir'.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise UserError(
            f"Checkpoint '{path}' could not be read ({type(exc).__name__}: {str(exc)[:200]}). "
            f"Fix: delete it (and resume from the other checkpoint in the folder) or rerun with --overwrite."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"Checkpoint '{path}' is not an lcc checkpoint of format {FORMAT}. "
                        f"Fix: delete it or rerun with --overwrite.")
    if expected is not None:
        saved = state.get("config", {})
        diff = [k for k in IDENTITY_KEYS if saved.get(k) != expected.get(k)]
        if diff:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {expected.get(k)!r}" for k in diff)
            raise UserError(f"Checkpoint '{path}' belongs to a different run ({detail}). "
                            f"Fix: resume with the config that made it, or rerun with --overwrite.")
    return state


def load_module_state(module: torch.nn.Module, state: dict, what: str, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"Checkpoint '{path}': the saved {what} does not fit the configured one "
                        f"({str(exc).strip().splitlines()[0]}). Fix: use the config that made the "
                        f"checkpoint, or rerun with --overwrite.") from None


def refuse_occupied(folders: list[Path], total: int) -> None:
    """A UserError if any of ``folders`` (``total`` runs in all) already holds ``current.pt``.

    Starting afresh over a checkpoint needs --overwrite, continuing it --resume;
    the command line checks every run of a sweep with this before any trains.
    """
    taken = [str(f) for f in folders if (Path(f) / "current.pt").exists()]
    if not taken:
        return
    shown = ", ".join(f"'{f}'" for f in taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
    which = (f"The run folder {shown} already holds a checkpoint" if total == 1 else
             f"{len(taken)} of this config's {total} run folders already hold a checkpoint: {shown}")
    raise UserError(f"{which}. Fix: pass --resume to continue (finished runs are kept as they are), "
                    f"--overwrite to start again, or set another 'save_dir'.")
