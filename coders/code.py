"""The coded computation itself: encode -> F or the parity models -> decode.

:class:`Code` holds the frozen F, the encoder, the decoder and the optional
parity models, and nothing else: no data, no optimizer, no files. Training
(:class:`train.engine.CodedRun`), evaluation and serving (``serve/``) all call
these same methods, so a code behaves identically wherever it runs.
:func:`load_code` rebuilds one from a run folder written by ``train.py``.

Shapes, with B groups, k data inputs and r parities per group and n outputs
of F: data ``(B, k, C, H, W)``, parities ``(B, r, C, H, W)``, outputs
``(B, k + r, n)`` (data outputs first), availability ``(B, k + r)`` boolean.
Inputs of any other shape work the same way (:func:`util.shapes.coder_in_dim`): vectors
``(B, k, D)`` are encoded as they are, and an input ``(C, *rest)`` of two or
more dimensions as C channels of ``prod(rest)`` values each.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from coders.scenarios import apply_scenarios, enumerate_scenarios


def freeze(model: nn.Module) -> nn.Module:
    """Freeze F for real: no gradients, eval mode (BatchNorm statistics stay put)."""
    model.requires_grad_(False)
    return model.eval()


class Code(nn.Module):
    """F, E, D and the parity models of one trained code; see the module docstring for shapes."""

    def __init__(self, base: nn.Module, encoder: nn.Module, decoder: nn.Module,
                 parity_models: Optional[nn.ModuleList], k: int, r: int):
        super().__init__()
        self.base = freeze(base)
        self.encoder, self.decoder, self.parity_models = encoder, decoder, parity_models
        self.k, self.r = k, r
        # Every scenario of r unavailable outputs, the decoder's training cases.
        self.register_buffer("scenarios", enumerate_scenarios(k, r), persistent=False)

    def train(self, mode: bool = True) -> "Code":
        super().train(mode)
        self.base.eval()  # F never leaves eval mode
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, k, C, H, W) -> (B, r, C, H, W)``, channels folded into the encoder's batch; vectors
        ``(B, k, D) -> (B, r, D)`` go to the encoder as they are (one channel)."""
        if x.dim() == 3:
            return self.encoder(x)
        b, k, c = x.shape[:3]
        spatial = x.shape[3:]
        flat = x.reshape(b, k, c, -1).transpose(1, 2).reshape(b * c, k, -1)
        parities = self.encoder(flat)
        return parities.reshape(b, c, self.r, -1).transpose(1, 2).reshape(b, self.r, c, *spatial)

    def parity_model(self, j: int) -> nn.Module:
        """The model that parity ``j`` goes through: parity model j, or F itself."""
        return self.base if self.parity_models is None else self.parity_models[j]

    def parity_outputs(self, parities: torch.Tensor) -> torch.Tensor:
        """``(B, r, C, H, W) -> (B, r, n)``: F itself, or parity model j on parity j."""
        b = parities.shape[0]
        if self.parity_models is None:
            return self.base(parities.reshape(b * self.r, *parities.shape[2:])).view(b, self.r, -1)
        return torch.stack([m(parities[:, j]) for j, m in enumerate(self.parity_models)], 1)

    def decode(self, outputs: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """``(B, k + r, n)`` outputs, ``(B, k + r)`` availability -> ``(B, k, n)`` reconstructions.

        Unavailable outputs are zeroed here, whatever they hold, so the decoder
        sees exactly what it saw in training.
        """
        masked = outputs * available.unsqueeze(-1).to(outputs.dtype)
        if getattr(self.decoder, "needs_availability", False):
            return self.decoder(masked, available)
        return self.decoder(masked)

    def decode_scenarios(self, outputs: torch.Tensor) -> torch.Tensor:
        """``(B, k + r, n)`` -> reconstructions ``(S, B, k, n)`` for all S scenarios in one call."""
        b = outputs.shape[0]
        s = self.scenarios.shape[0]
        dec_in = apply_scenarios(outputs, self.scenarios)
        if getattr(self.decoder, "needs_availability", False):
            out = self.decoder(dec_in, self.scenarios.repeat_interleave(b, 0))
        else:
            out = self.decoder(dec_in)
        return out.view(s, b, self.k, -1)

    def forward_groups(self, x: torch.Tensor, fx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data ``(B, k, C, H, W)`` and F's outputs on it ``(B, k, n)`` -> (reconstructions
        ``(S, B, k, n)`` over every scenario, parity outputs ``(B, r, n)``)."""
        fp = self.parity_outputs(self.encode(x))
        return self.decode_scenarios(torch.cat([fx, fp], 1)), fp

    @torch.no_grad()
    def forward(self, x: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """The whole coded computation on data ``(B, k, C, H, W)`` when only the outputs marked
        in ``available`` ``(B, k + r)`` arrive: ``(B, k, n)``, each data output either F's own
        (available) or the decoder's reconstruction (unavailable)."""
        b = x.shape[0]
        fx = self.base(x.flatten(0, 1)).view(b, self.k, -1)
        fp = self.parity_outputs(self.encode(x))
        recon = self.decode(torch.cat([fx, fp], 1), available)
        return torch.where(available[:, :self.k, None], fx, recon)


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
    (a missing file is a UserError). ``data_dir`` overrides the run's dataset folder. An N-worker run
    (``"form": "nworker"``) gives a :class:`coders.nworker.NWorkerCode`, the one its training and
    evaluation ran.
    """
    from base_models.fit import build_base_model, check_weights_path, default_path, has_weights, load_state
    from datasets import load_data
    from util.checkpoint import load_checkpoint, load_module_state, tensors_digest
    from coders.config import expand_runs, load_code_config
    from coders.build import build_coders, build_parity_models
    from util.errors import UserError
    from util.hardware import resolve_device

    cfg, folder = load_code_config(folder)
    (spec,) = expand_runs(cfg)
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
    if cfg.form == "nworker":  # the literature's form (coders/nworker.py): K inputs coded into N worker inputs
        from coders.nworker import NWorkerCode, build_nworker_coders

        k, n, s = cfg.k_vals[0], cfg.n_workers[0], cfg.stragglers[0]
        encoder, decoder = build_nworker_coders(*cfg.enc_dec_types[0], k, n, splits.input_shape, n_out)
        parity = None
    else:
        encoder, decoder = build_coders(spec, splits.input_shape, n_out)
        parity = build_parity_models(cfg, spec, splits, base, n_out) if cfg.train_parity_model else None
    load_module_state(encoder, state["encoder"], "encoder", path)
    load_module_state(decoder, state["decoder"], "decoder", path)
    if parity is not None:
        load_module_state(parity, state["parity_models"], "parity models", path)
    code = (NWorkerCode(base, encoder, decoder, k, n, s) if cfg.form == "nworker"
            else Code(base, encoder, decoder, parity, spec.k, spec.r)).to(dev).eval()
    code.requires_grad_(False)
    return TrainedCode(code, state.get("config", {}), splits, int(state.get("epoch", 0)), folder)
