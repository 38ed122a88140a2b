"""A trained code from its run folder: :func:`load_code`, whichever its form.

The computations themselves are the forms' (``coders/form.py``):
:class:`coders.systematic.Code` (k data + r parities, re-exported here, its
old home) and :class:`coders.nworker.NWorkerCode` (K inputs coded into N
worker inputs). :func:`load_code` rebuilds either from a run folder written
by ``train.py``, through the run's form, so training, evaluation and serving
hold the same computation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from coders.systematic import Code, freeze  # noqa: F401  (their old home: coders.code.Code, train.code.Code)


@dataclass
class TrainedCode:
    """A code loaded from a run folder, with what it was trained on."""

    code: nn.Module         # a Code, or an NWorkerCode for an N-worker run
    config: dict            # the run's resolved config.json
    splits: object          # datasets.Splits of the run's dataset (same seed, same split)
    epoch: int              # the checkpoint's epoch
    folder: Path


def load_code(folder: str | Path, checkpoint: str = "best.pt", device: str = "cpu",
              data_dir: Optional[str] = None) -> TrainedCode:
    """Rebuild the code of a ``train.py`` run folder from its ``config.json`` and ``checkpoint``.

    F's weights come from the file the run used; they are never trained here
    (a missing file is a UserError). ``data_dir`` overrides the run's dataset folder. The run's form
    (coders/form.py) builds its coders and its code: a systematic run gives a :class:`coders.systematic.Code`,
    an N-worker run a :class:`coders.nworker.NWorkerCode`, the one its training and evaluation ran.
    """
    from base_models.fit import build_base_model, check_weights_path, default_path, has_weights, load_state
    from datasets import load_data
    from util.checkpoint import load_checkpoint, load_module_state, tensors_digest
    from coders.config import expand_runs, load_code_config
    from coders.build import build_coders
    from util.errors import UserError
    from util.hardware import resolve_device

    cfg, folder = load_code_config(folder)
    (spec,) = expand_runs(cfg)  # of the run's form
    path = folder / checkpoint
    state = load_checkpoint(path)
    dev = resolve_device(device)
    splits = load_data(spec.dataset, data_dir or cfg.data_dir, False, cfg.val_size, cfg.seed, cfg.domains)
    base = build_base_model(spec.model, splits)
    weights = None  # a plain function F has no weights to load
    if has_weights(base):
        if cfg.base_model_file is not None:
            weights = check_weights_path(cfg.base_model_file, cfg.base_model_dir)
        else:
            weights = default_path(splits.name, spec.model, cfg.base_model_dir)
            if not weights.is_file():
                raise UserError(f"Run folder '{folder}' was trained around F's weights '{weights}', which no "
                                f"longer exist. Fix: run from the folder train.py ran in, or restore the weights file.")
        base = load_state(base, weights)
    recorded = state.get("config", {}).get("base_model_digest")
    if recorded is not None and recorded != tensors_digest(sorted(base.state_dict().items())):
        raise UserError(f"Run folder '{folder}' was trained around other weights of F than '{weights}' holds now "
                        f"(digest {recorded[:12]} then), so its encoder and decoder do not fit this F. Fix: restore "
                        f"the weights the run was trained with, or train the code again around these.")
    with torch.no_grad():
        n_out = base(splits.test_x[:1]).shape[1]
    encoder, decoder = build_coders(spec, splits.input_shape, n_out)
    code = spec.code_form.code(cfg, spec, base, encoder, decoder, splits, n_out)
    load_module_state(encoder, state["encoder"], "encoder", path)
    load_module_state(decoder, state["decoder"], "decoder", path)
    if getattr(code, "parity_models", None) is not None:
        load_module_state(code.parity_models, state["parity_models"], "parity models", path)
    code = code.to(dev).eval()
    code.requires_grad_(False)
    return TrainedCode(code, state.get("config", {}), splits, int(state.get("epoch", 0)), folder)
