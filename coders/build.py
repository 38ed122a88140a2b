"""The builders of a code's parts: encoder and decoder, parity models, and the contract check.

Training (:class:`train.engine.CodedRun`), :func:`coders.code.load_code` (serving,
evaluation) and the whole-sweep preflight build coders through these functions,
so a coder is built, and refused, the same way wherever a code is made.
"""
from __future__ import annotations

import torch
from torch import nn

from typing import Optional

from base_models.fit import build_base_model
from util.shapes import coder_in_dim
from util.classpath import build, describe_exception, spec_name
from util.errors import ConfigError


def build_coders(spec, in_shape, n_out: int) -> tuple[nn.Module, nn.Module]:
    """The one builder of encoders and decoders: those of the run ``spec`` (a :class:`coders.form.RunSpec`),
    built by its form (:meth:`coders.form.CodeForm.build_coders`)."""
    return spec.code_form.build_coders(spec, in_shape, n_out)


def build_systematic_coders(spec, in_shape, n_out: int) -> tuple[nn.Module, nn.Module]:
    """Encoder and decoder of a systematic run, built as ``cls(k, r, in_dim, **args)``; a coder refusing k,
    r or the sizes becomes a ConfigError."""
    modules = []
    for which, cspec, dim in (("encoder", spec.encoder, coder_in_dim(in_shape)), ("decoder", spec.decoder, [-1, n_out])):
        try:
            modules.append(build(cspec, "enc_dec_types", spec.k, spec.r, dim))
        except ValueError as exc:
            raise ConfigError(f"Config key 'enc_dec_types': {which} {spec_name(cspec)} cannot serve k={spec.k}, "
                              f"r={spec.r} with input size {dim}: {exc} Fix: change k_vals/r_vals or the coder.") from None
        except TypeError as exc:
            raise ConfigError(f"Config key 'enc_dec_types': {which} {spec_name(cspec)} could not be built ({exc}). "
                              f"Fix: check its 'args' against its constructor (ec_k, ec_r, in_dim, ...).") from None
    return modules[0], modules[1]


def build_parity_models(cfg, spec, splits, base: nn.Module,
                        n_out: Optional[int] = None) -> nn.ModuleList:
    """The r parity models F_P of a run (architecture 'parity_model', else F's), each with ``n_out``
    outputs (F's output width; by default the dataset's class count or target width)."""
    arch = cfg.parity_model or spec.model
    models = []
    for _ in range(spec.r):
        m = build_base_model(arch, splits, "parity_model", out_size=n_out)
        if cfg.parity_model_init == "base":
            try:
                m.load_state_dict(base.state_dict())
            except RuntimeError:
                raise ConfigError("Config key 'parity_model_init': \"base\" copies F's weights, but the "
                                  f"parity model {spec_name(arch)} has a different architecture from F. "
                                  "Fix: use \"random\" or the same architecture.") from None
        models.append(m)
    return nn.ModuleList(models)


def probe_coders(encoder: nn.Module, decoder: nn.Module, k: int, r: int, d: int, n: int, device="cpu",
                 training_modes=(False, True), batch_sizes=(2, 3)) -> None:
    """Call E and D on random inputs of each of ``batch_sizes``, in each of ``training_modes`` (training
    mode with a backward pass), and compare their outputs with the contract in coders/coder.py. Any
    exception a coder raises is a ConfigError naming it. Each module's mode is handed back. With
    training mode among ``training_modes`` gradients and BatchNorm statistics change, so that is for
    throwaway modules (the preflight's own); evaluation mode alone (what every CodedRun checks on its
    real coders) changes nothing, and draws from no global random generator."""
    gen = torch.Generator().manual_seed(0)
    was = [(m, m.training) for m in (encoder, decoder)]
    try:
        for training in training_modes:
            for b in batch_sizes:
                _probe_once(encoder, decoder, k, r, d, n, b, training, gen, device)
    finally:
        for module, mode in was:
            module.train(mode)


def _probe_once(encoder, decoder, k, r, d, n, b, training, gen, device) -> None:
    available = torch.ones(b, k + r, dtype=torch.bool)
    available[:, :r] = False  # one decoding scenario: the first r outputs unavailable
    checks = (("encoder", encoder, (torch.randn(b, k, d, generator=gen),), (b, r, d)),
              ("decoder", decoder, (torch.randn(b, k + r, n, generator=gen),), (b, k, n)))
    for which, module, args, expected in checks:
        if which == "decoder" and getattr(module, "needs_availability", False):
            args = args + (available,)
        args = tuple(a.to(device) for a in args)
        name = type(module).__name__
        mode = "training" if training else "evaluation"
        module.train(training)
        try:
            with torch.set_grad_enabled(training):
                out = module(*args)
                if training and isinstance(out, torch.Tensor) and out.requires_grad:
                    out.float().sum().backward()
        except Exception as exc:
            raise ConfigError(
                f"Config key 'enc_dec_types': {which} {name} failed on an input of shape "
                f"{tuple(args[0].shape)} in {mode} mode: {describe_exception(exc)}. The contract in "
                f"coders/coder.py: an encoder maps (B, k, D) to (B, r, D), a decoder (B, k + r, n) to "
                f"(B, k, n), for any batch size B.") from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(
                f"Config key 'enc_dec_types': {which} {name} returned {got} in {mode} mode for an input "
                f"of shape {tuple(args[0].shape)}; the contract in coders/coder.py asks for {expected}.")
