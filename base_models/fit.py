"""Training, saving and loading the base model F.

``python -m base_models.fit --dataset mnist --model base-mlp`` trains F,
keeps the weights that score best on validation, and writes
``base_model_trained_files/<dataset>/<model>/model.pt`` (a plain state dict)
beside ``metrics.json`` (train / val / test accuracy). The learned-code
trainer calls :func:`load_or_train` and so reuses that file.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm import tqdm

from base_models import MODEL_ALIASES
from base_models.functions import construct
from datasets import Splits, load_dataset
from util.classpath import spec_name
from util.errors import ConfigError, UserError, exits_on_user_error
from util.files import atomic_save, atomic_write_text, remove_stale_temps
from util.hardware import count_subnormal, flush_denormals, resolve_device

DEFAULT_ROOT = "base_model_trained_files"


def build_base_model(spec: Any, splits: Splits, key: str = "models", seed: Optional[int] = None,
                     out_size: Optional[int] = None) -> nn.Module:
    """F for ``splits``; with ``seed``, its initial weights are drawn from that seed. A class is built
    with ``num_classes = out_size``, by default :func:`output_size` of ``splits``."""
    if seed is not None:
        torch.manual_seed(seed)
    return construct(spec, key, MODEL_ALIASES, splits.input_shape,
                     out_size if out_size is not None else output_size(splits))


def output_size(splits: Splits) -> Optional[int]:
    """What a base model class is built with as ``num_classes``: the classes of a labelled set, the
    target width of a regression set (1 for targets ``(N,)``), None for a domain (no targets)."""
    if splits.num_classes is not None:
        return splits.num_classes
    y = splits.train_y
    if y.dim() == 1:
        return 1
    return int(y.shape[1]) if y.dim() == 2 and y.shape[1] > 0 else None


def is_regression(splits: Splits) -> bool:
    """True when ``splits`` has no classes: F is trained with MSE on its float targets."""
    return splits.num_classes is None


def has_weights(model: nn.Module) -> bool:
    """False for a parameter-free F (a plain function): nothing to train, load or save."""
    return any(True for _ in model.parameters()) or any(True for _ in model.buffers())


def default_path(dataset: str, model: Any, root: str = DEFAULT_ROOT) -> Path:
    """``root/<dataset>/<model>/model.pt``; a shipped model's class path maps to its short name,
    so ``base-mlp`` and ``base_models.mlp.BaseMLP`` share one file."""
    short = {path: alias for alias, path in MODEL_ALIASES.items()}
    name = model if isinstance(model, str) else model.get("class", "")
    name = short.get(name, name)
    if "." in name:
        name = spec_name(name)
    return Path(root) / dataset / name / "model.pt"


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Outputs of ``model`` on ``x`` in eval mode, batched, on ``x``'s device."""
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x).argmax(1) == y).float().mean().item()


def mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean squared error of ``model`` against float targets ``y`` ``(N,)`` or ``(N, m)``."""
    return (predict(model, x) - y.reshape(len(y), -1)).pow(2).mean().item()


def load_state(model: nn.Module, path: Path, explicit: bool = False) -> nn.Module:
    """Load a state dict file into ``model``; a corrupt or mismatched file is a UserError.

    ``explicit``: the user named this file ('base_model_file'), so the fix is to name
    another, not to delete it for lcc to retrain.
    """
    fix = ("Fix: point 'base_model_file' at a state dict saved with torch.save (python -m base_models.fit "
           "writes one), or remove the key so lcc trains F itself." if explicit else
           "Fix: delete the file so lcc retrains it, or point 'base_model_file' at a valid state dict.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise UserError(
            f"Base-model weights '{path}'{' (config key base_model_file)' if explicit else ''} could not be read "
            f"as a state dict ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}). {fix}"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"Base-model weights '{path}' do not fit {type(model).__name__} on this dataset ({first}). "
            + ("Fix: point 'base_model_file' at weights of this model for this dataset." if explicit else
               "Fix: check that the file belongs to this dataset and model, or delete it so lcc retrains it.")
        ) from None
    report_subnormal(model, path)
    return model


_SUBNORMAL_REPORTED: set = set()  # weights files already reported, so a sweep says it once


def report_subnormal(model: nn.Module, path: Path) -> int:
    """Count the subnormal values in F's loaded weights and say so (once per file) when there are any."""
    n = count_subnormal(model.state_dict().values())
    key = str(Path(path).resolve())
    if n and key not in _SUBNORMAL_REPORTED:
        _SUBNORMAL_REPORTED.add(key)
        print(f"Note: the base-model weights '{path}' hold {n} subnormal values (non-zero, below about "
              f"1.2e-38). CPU arithmetic on them is many times slower; runs read them as zero unless the config "
              f"sets \"flush_denormal\": false.", file=sys.stderr)
    return n


def train_base_model(model: nn.Module, splits: Splits, *, epochs: int = 20, batch_size: int = 128,
                     lr: float = 1e-3, device: str = "auto", seed: int = 0,
                     progress: bool = True) -> tuple[nn.Module, dict]:
    """Train ``model`` with Adam and cross entropy (MSE on a regression set); return it with its
    best-on-validation weights.

    The data stays on the device as tensors; each step indexes a random batch.
    """
    dev = resolve_device(device)
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model = model.to(dev)
    tx, ty = splits.train_x.to(dev), splits.train_y.to(dev)
    vx, vy = splits.val_x.to(dev), splits.val_y.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    regression = is_regression(splits)
    if regression:  # float targets: mean squared error, and the best epoch is the lowest validation MSE
        mse_loss = nn.MSELoss()
        loss_fn = lambda out, y: mse_loss(out, y.reshape(len(y), -1))  # noqa: E731
        score = lambda x, y: -mse(model, x, y)  # noqa: E731
    else:
        loss_fn = nn.CrossEntropyLoss()
        score = lambda x, y: accuracy(model, x, y)  # noqa: E731
    best_val, best_state, best_epoch = -math.inf, None, 0
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(tx), generator=gen).to(dev)
        steps = range(0, len(tx), batch_size)
        bar = tqdm(steps, desc=f"F epoch {epoch}/{epochs}", leave=False, disable=not progress)
        for i in bar:
            idx = perm[i:i + batch_size]
            loss = loss_fn(model(tx[idx]), ty[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        val = score(vx, vy)
        if progress:
            print(f"F epoch {epoch}: val {'mse' if regression else 'acc'} {abs(val):.4f}", file=sys.stderr)
        if val > best_val:
            best_val, best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    opt.zero_grad(set_to_none=True)  # the last step's gradients are no part of F
    model.eval()
    metrics = {
        "dataset": splits.name,
        "model": type(model).__name__,
        "epochs": epochs,
        "best_epoch": best_epoch,
        **({"train_mse": mse(model, tx, ty), "val_mse": -best_val,
            "test_mse": mse(model, splits.test_x.to(dev), splits.test_y.to(dev))} if regression else
           {"train_acc": accuracy(model, tx, ty), "val_acc": best_val,
            "test_acc": accuracy(model, splits.test_x.to(dev), splits.test_y.to(dev))}),
        "seconds": round(time.time() - t0, 2),
        "seed": seed,
        "val_size": len(splits.val_y),
        "val_split": splits.val_fingerprint(),  # which images F never trained on
    }
    return model, metrics


def save_base_model(model: nn.Module, metrics: dict, path: Path) -> None:
    atomic_save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    atomic_write_text(json.dumps(metrics, indent=2) + "\n", path.with_name("metrics.json"))


def warn_split_mismatch(model: nn.Module, path: Path, splits: Splits, seed: int) -> nn.Module:
    """Warn when F (per the ``metrics.json`` beside ``path``) was trained on part of this run's validation split.

    Another seed or ``val_size`` holds out other images, some of which F then
    trained on: F's validation accuracy reads high and the best-validation epoch
    is picked on images F has learned. Test figures are not affected.
    """
    try:
        info = json.loads(path.with_name("metrics.json").read_text())
    except (OSError, ValueError):
        return model  # weights from elsewhere (e.g. the reference files): nothing recorded
    recorded = info.get("val_split") if isinstance(info, dict) else None
    if recorded and recorded != splits.val_fingerprint():
        print(f"Warning: the base model '{path}' was trained with seed {info.get('seed')} and "
              f"{info.get('val_size')} validation images, a different split from this run's (seed {seed}, "
              f"{len(splits.val_y)} validation images), so part of this run's validation set was in F's "
              f"training set: validation accuracy is inflated and best-epoch selection is biased (test "
              f"figures are not). Fix: use seed {info.get('seed')} and the same val_size, or retrain F for "
              f"this split (python -m base_models.fit --dataset {splits.name} --seed {seed} --val-size "
              f"{len(splits.val_y)} --force) or "
              f"point 'base_model_file' at weights trained on it.", file=sys.stderr)
    return model


def check_weights_path(path: str, root: str = DEFAULT_ROOT) -> Path:
    """``path`` as a Path when it is a file; else the error for config key 'base_model_file'."""
    p = Path(path)
    if p.is_dir():
        names = sorted(q.name for q in p.iterdir())[:5]
        raise ConfigError(
            f"Config key 'base_model_file': '{p}' is a folder, not a weights file (it holds: "
            f"{', '.join(names) or 'nothing'}). Fix: point it at the state-dict file itself."
        )
    if not p.exists():
        raise ConfigError(
            f"Config key 'base_model_file': '{p}' does not exist. Fix: correct the path, or remove the "
            f"key so lcc trains F itself and stores it under '{root}/'."
        )
    return p


def load_or_train(spec: Any, splits: Splits, *, path: Optional[str] = None, root: str = DEFAULT_ROOT,
                  device: str = "auto", seed: int = 0, epochs: int = 20, progress: bool = True) -> nn.Module:
    """F for ``splits``: loaded from ``path`` (or the default file), trained first when missing.

    An explicit ``path`` that does not exist is an error rather than a reason
    to train, since the user asked for those weights.
    """
    model = build_base_model(spec, splits, seed=seed)
    if not has_weights(model):  # a plain function: F is what it computes
        return model
    if path is not None:
        p = check_weights_path(path, root)
        return warn_split_mismatch(load_state(model, p, explicit=True), p, splits, seed)
    p = default_path(splits.name, spec, root)
    if p.exists():
        return warn_split_mismatch(load_state(model, p), p, splits, seed)
    if progress:
        print(f"No trained base model at '{p}': training {type(model).__name__} on {splits.name} first.",
              file=sys.stderr)
    with weights_writer(p, wait=True):
        if p.exists():  # another process trained it while this one waited
            return warn_split_mismatch(load_state(model, p), p, splits, seed)
        model, metrics = train_base_model(model, splits, epochs=epochs, device=device, seed=seed, progress=progress)
        save_base_model(model, metrics, p)
    return model.cpu()


@contextlib.contextmanager
def weights_writer(path: Path, wait: bool):
    """Hold the lock of the folder of F's weights file ``path`` (util/lock.py) while F is
    trained into it, so one process writes it; a kill's temporary files are removed once the
    lock is ours. ``wait``: wait for another writer to finish (train.py, which then loads
    what it wrote) instead of stopping with a UserError naming it (``python -m base_models.fit``)."""
    from util.lock import FolderBusy, FolderLock

    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(folder)
    told = False
    while True:
        try:
            lock.acquire("base model folder")
            break
        except FolderBusy as exc:
            if not wait:
                raise
            if not told:
                print(f"waiting: {exc}", file=sys.stderr)
                told = True
            time.sleep(1.0)
    try:
        remove_stale_temps(folder, [Path(path).name, "metrics.json"])
        yield
    finally:
        lock.release()


FLAGS = {"datasets": "--dataset", "val_size": "--val-size", "data_dir": "--data-dir", "models": "--model",
         "seed": "--seed"}


def name_flags(message: str) -> str:
    """A message naming train.py's config keys, reworded with this command's flags."""
    for key, flag in FLAGS.items():
        message = message.replace(f"Config key '{key}'", f"Flag {flag}").replace(f"config key '{key}'", f"flag {flag}")
        message = message.replace(f"'{key}'", flag)
    return message


def build_flagged(model: str, splits, **kwargs) -> nn.Module:
    """F of ``--model``, its refusals naming the flag (build_base_model names train.py's config key)."""
    try:
        return build_base_model(model, splits, "models", **kwargs)
    except ConfigError as exc:
        raise ConfigError(name_flags(str(exc))) from None


@exits_on_user_error
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m base_models.fit", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="base-mlp", help="short name or class path")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="seed of the validation split and of F's initial weights")
    ap.add_argument("--val-size", type=int, default=None,
                    help="validation images held out of training (default N/12, as in train.py)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--no-download", action="store_true")
    ap.add_argument("--root", default=DEFAULT_ROOT, help="where trained weights are written")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--force", action="store_true", help="retrain even if the weights file exists")
    args = ap.parse_args(argv)
    flush_denormals(True)  # as train.py's runs do by default: subnormals slow CPU arithmetic many times
    if args.epochs < 1 or args.batch_size < 1:
        ap.error("--epochs and --batch-size must be 1 or more")
    if not 0 <= args.seed < 2 ** 63:
        ap.error("--seed must be from 0 to 2**63 - 1")
    if args.val_size is not None and args.val_size < 1:
        ap.error("--val-size must be 1 or more")
    if not (math.isfinite(args.lr) and args.lr > 0):
        ap.error(f"--lr must be a positive number; got {args.lr}")
    from util.checks import check_device, check_writable_folder

    if args.device != "auto":
        check_device(args.device, "--device")
    check_writable_folder(args.root, "--root", "--root")
    try:
        splits = load_dataset(args.dataset, args.data_dir, download=not args.no_download, val_size=args.val_size,
                              seed=args.seed)
    except ConfigError as exc:  # the dataset code names train.py's config keys; here the user typed flags
        raise ConfigError(name_flags(str(exc))) from None
    path = default_path(args.dataset, args.model, args.root)
    if path.exists() and not args.force:
        print(f"{path} exists; reusing it (pass --force to retrain).")
        model = load_state(build_flagged(args.model, splits), path)
        if is_regression(splits):
            print(f"test mse {mse(model, splits.test_x, splits.test_y):.4f}")
        else:
            print(f"test acc {accuracy(model, splits.test_x, splits.test_y):.4f}")
        return 0
    model = build_flagged(args.model, splits, seed=args.seed)
    with weights_writer(path, wait=False):
        model, metrics = train_base_model(model, splits, epochs=args.epochs, batch_size=args.batch_size,
                                          lr=args.lr, device=args.device, seed=args.seed)
        save_base_model(model, metrics, path)
    print(json.dumps(metrics))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
