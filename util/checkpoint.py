"""Atomic checkpoints holding everything a run needs to continue exactly."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from util.errors import UserError
from util.files import atomic_save, remove_stale_temps

FORMAT = 1
# What a run folder holds (besides its lock file, util/lock.py); each is written atomically.
RUN_FILES = ("current.pt", "best.pt", "metrics.csv", "metrics.jsonl", "config.json")
# Keys of a run's resolved config that must match for a checkpoint to be resumed.
IDENTITY_KEYS = ("dataset", "model", "k", "r", "loss", "encoder", "decoder",
                 "train_encoder", "train_decoder", "train_parity_model", "parity_model", "seed", "run_seed")
# Besides these, F's weights and the dataset's content are recorded when a run starts (see
# :func:`fingerprint`) and checked on every resume. Paths such as 'data_dir' and 'base_model_file'
# are not compared as strings, since the same files may be named another way (a relative path, a
# moved folder); what they hold is.
_DATA_DIGESTS: dict = {}
# What every checkpoint holds (train.engine.Trainer.state), with the kind of each value.
REQUIRED = {"epoch": int, "best_val": (int, float), "encoder": dict, "decoder": dict,
            "parity_models": (dict, type(None)), "optimizer": (dict, type(None)), "rng": dict, "config": dict}


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, dtypes, shapes and the bytes of ``named`` tensors, in the given order."""
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def fingerprint(base: torch.nn.Module, splits, base_model_path: str, data_path: str, data_key: Any = None,
                data_named: Optional[tuple[str, str]] = None) -> dict:
    """What a run's numbers depend on beyond its config: F's weights and the dataset's content
    (train, validation and test tensors), with the paths they came from for messages.
    ``data_key`` names the data for a per-process cache, so a sweep hashes each dataset once;
    ``data_named`` is (what ``data_path`` is, the config key that sets it) for messages, when
    not the dataset of 'data_dir' (a domain's file, say)."""
    data = _DATA_DIGESTS.get(data_key) if data_key is not None else None
    if data is None:
        data = tensors_digest((f"{s}_{xy}", getattr(splits, f"{s}_{xy}"))
                              for s in ("train", "val", "test") for xy in ("x", "y"))
        if data_key is not None:
            _DATA_DIGESTS[data_key] = data
    return {"base_model_digest": tensors_digest(sorted(base.state_dict().items())),
            "data_digest": data,
            "data_sizes": [len(splits.train_y), len(splits.val_y), len(splits.test_y)],
            "base_model_path": str(base_model_path), "data_path": str(data_path),
            **({"data_named": list(data_named)} if data_named else {})}


def check_fingerprint(saved: dict, now: dict, path: Path) -> None:
    """A UserError naming what changed when the run that wrote checkpoint ``path`` (config
    ``saved``) had another F or other data than this one (``now``). Checkpoints from before
    fingerprints were recorded are let through."""
    changes, keys = [], []
    if saved.get("base_model_digest") not in (None, now.get("base_model_digest")):
        changes.append(f"F's weights are not the ones the run started with ({_path_change(saved, now, 'base_model_path', 'F')}"
                       f"; weights digest {saved['base_model_digest'][:12]} then, {now['base_model_digest'][:12]} now)")
        keys.append("'base_model_file'")
    if saved.get("data_digest") not in (None, now.get("data_digest")):
        if saved.get("val_size") != now.get("val_size") or saved.get("data_sizes") != now.get("data_sizes"):
            where = (f"'val_size' was {_shown(saved.get('val_size'))}, now {_shown(now.get('val_size'))}: train/val/test images "
                     f"{saved.get('data_sizes')} then, {now.get('data_sizes')} now")
            keys.append("'val_size'")
        else:
            what, key = now.get("data_named") or ("the dataset", "'data_dir'")
            where = _path_change(saved, now, "data_path", what)
            keys.append(key if saved.get("data_path") != now.get("data_path") else f"{what}'s content")
        changes.append(f"{'the inputs are not the ones' if now.get('data_named') else 'the dataset is not the one'} "
                       f"the run started with ({where})")
    if changes:
        raise UserError(f"Checkpoint '{path}' was made by a run with other inputs: {'; and '.join(changes)}. "
                        f"Continuing would mix two runs in one metrics file. Fix: set {' and '.join(keys)} back "
                        f"to what the run started with, or start it again with --overwrite (or another 'save_dir').")


def _shown(value) -> str:
    return "null (the default)" if value is None else json.dumps(value)


def _path_change(saved: dict, now: dict, key: str, what: str) -> str:
    before, after = saved.get(key), now.get(key)
    if before == after:
        return f"{what} is still read from '{after}', whose content changed"
    return f"{what} was read from '{before}', now from '{after}'"


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
    check_contents(state, path)
    if expected is not None:
        saved = state.get("config", {})
        diff = [k for k in IDENTITY_KEYS if saved.get(k) != expected.get(k)]
        if diff:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {expected.get(k)!r}" for k in diff)
            raise UserError(f"Checkpoint '{path}' belongs to a different run ({detail}). "
                            f"Fix: resume with the config that made it, or rerun with --overwrite.")
        check_fingerprint(saved, expected, path)
    return state


def check_contents(state: dict, path: Path) -> None:
    """A UserError naming what ``path`` lacks of what every checkpoint holds (see REQUIRED), e.g. a file of
    the right format and config assembled elsewhere without the module weights."""
    missing = [key for key, kind in REQUIRED.items() if key not in state or not isinstance(state[key], kind)]
    if not missing:
        rng = state["rng"]
        missing = [f"rng.{key}" for key in ("torch", "shuffle", "cuda") if key not in rng]
    if missing:
        held = ", ".join(sorted(str(key) for key in state)) or "nothing"
        weights = [key for key in missing if key in ("encoder", "decoder", "parity_models")]
        what = f"the module weights {', '.join(weights)}" if weights else "what resuming needs"
        raise UserError(f"Checkpoint '{path}' lacks {what} (missing or of the wrong kind: {', '.join(missing)}; it "
                        f"holds {held}), so it cannot be loaded. Fix: use a checkpoint that train.py wrote for this "
                        f"run (the folder's best.pt or current.pt), or rerun with --overwrite to start again.")


def remove_partial_writes(folder: Path) -> None:
    """Delete the temporary files that a writer killed mid-write left in a run folder
    (call with the folder's lock held, so no live writer's file goes)."""
    remove_stale_temps(folder, RUN_FILES)


def load_module_state(module: torch.nn.Module, state: dict, what: str, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"Checkpoint '{path}': the saved {what} does not fit the configured one "
                        f"({str(exc).strip().splitlines()[0]}). Fix: use the config that made the "
                        f"checkpoint, or rerun with --overwrite.") from None


def refuse_occupied(folders: list[Path], total: int, busy_check: bool = True) -> None:
    """A UserError if any of ``folders`` (``total`` runs in all) already holds ``current.pt``, or
    (with ``busy_check``) is being written by another process now.

    Starting afresh over a checkpoint needs --overwrite, continuing it --resume;
    the command line checks every run of a sweep with this before any trains.
    """
    from util.lock import busy_error, holder

    for f in folders if busy_check else []:  # a folder another process is writing now: say so
        who = holder(f)
        if who is not None:
            raise busy_error(Path(f), who)
    taken = [str(f) for f in folders if (Path(f) / "current.pt").exists()]
    if not taken:
        return
    shown = ", ".join(f"'{f}'" for f in taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
    which = (f"The run folder {shown} already holds a checkpoint" if total == 1 else
             f"{len(taken)} of this config's {total} run folders already hold a checkpoint: {shown}")
    raise UserError(f"{which}. Fix: pass --resume to continue (finished runs are kept as they are), "
                    f"--overwrite to start again, or set another 'save_dir'.")
