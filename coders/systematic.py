"""The systematic form's computation: k data inputs + r parities -> F or the parity models -> decode.

:class:`Code` holds the frozen F, the encoder, the decoder and the optional
parity models, and nothing else: no data, no optimizer, no files. Training
(:class:`train.engine.CodedRun`), evaluation and serving (``serve/``) all call
these same methods, so a code behaves identically wherever it runs. The
N-worker form's computation is :class:`coders.nworker.NWorkerCode`; which
form a run has, and how its code is put together, is ``coders/form.py``'s.

Shapes, with B groups, k data inputs and r parities per group and n outputs
of F: data ``(B, k, C, H, W)``, parities ``(B, r, C, H, W)``, outputs
``(B, k + r, n)`` (data outputs first), availability ``(B, k + r)`` boolean.
Inputs of any other shape work the same way (:func:`util.shapes.coder_in_dim`): vectors
``(B, k, D)`` are encoded as they are, and an input ``(C, *rest)`` of two or
more dimensions as C channels of ``prod(rest)`` values each.
"""
from __future__ import annotations

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
