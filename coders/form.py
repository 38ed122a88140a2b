"""Code forms: what kind of code a run trains, and every question that depends on it, asked in one place.

A config's ``"form"`` names one :class:`CodeForm` of :data:`FORMS`, the one registry:

* ``"systematic"`` (:class:`SystematicForm`): k data inputs + r parities; the data outputs are F's own
  answers, the decoder rebuilds the missing ones from any k of the k + r (:class:`coders.systematic.Code`).
* ``"nworker"`` (:class:`NWorkerForm`, docs/nworker.md): K inputs coded into N worker inputs, every answer
  rebuilt from any N - S worker outputs (:class:`coders.nworker.NWorkerCode`).

A form answers: which config keys it reads and their checks (:meth:`CodeForm.check`, :meth:`CodeForm.refuse`),
the sizes it sweeps beside k (:attr:`CodeForm.sizes`: r; N and S) and so how a config expands into
:class:`RunSpec` s (:func:`expand_runs`), each run's folder and config.json record, how its encoder, decoder
and code are built (:meth:`CodeForm.build_coders`, behind :func:`coders.build.build_coders`, and
:meth:`CodeForm.code`), which run class trains it
(:attr:`CodeForm.trainer`), how its report table looks (:meth:`CodeForm.columns`, :meth:`CodeForm.label`),
and, for serving, which loaded code is its (:meth:`CodeForm.holds`, :func:`form_of`), its layout
(:meth:`CodeForm.layout`) and the strategies that can serve it (:meth:`CodeForm.serves`).

A third form is one subclass of :class:`CodeForm` added to :data:`FORMS` (docs/extending.md). This module
imports no torch: the config (coders/config.py) asks it, and the builders are imported when a code is built.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from util.classpath import spec_name
from util.errors import ConfigError

Spec = Union[str, dict]


@dataclass(frozen=True)
class RunSpec:
    """One combination of a config's lists: what one run folder holds, for a code of any form.

    ``sizes`` are the form's sizes beside k, named by its :attr:`CodeForm.sizes` and read as attributes:
    ``spec.r`` of a systematic run, ``spec.n_workers`` and ``spec.stragglers`` of an N-worker one. An int
    given for ``sizes`` is a systematic run's r, so ``RunSpec(dataset, model, k, r, loss, encoder, decoder)``
    reads as it always did; :func:`NWorkerSpec` makes an N-worker one.
    """

    dataset: Spec
    model: Spec
    k: int
    sizes: Any
    loss: Spec
    encoder: Spec
    decoder: Spec
    run_seed: Optional[int] = None  # one of the config's 'seeds'; None when it sweeps none
    form: str = "systematic"

    def __post_init__(self):
        if isinstance(self.sizes, int):
            object.__setattr__(self, "sizes", (self.sizes,))
        names = form_named(self.form).sizes  # an unknown form is a KeyError naming the known ones
        if len(self.sizes) != len(names):
            raise ValueError(f"a {self.form} run has the sizes {', '.join(names)}; got {self.sizes}.")

    def __getattr__(self, name: str):
        values = self.__dict__
        if not name.startswith("_") and "form" in values and "sizes" in values:
            names = form_named(values["form"]).sizes
            if name in names:
                return values["sizes"][names.index(name)]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}"
                             + (f" (a {values['form']} run's sizes are k and "
                                f"{', '.join(form_named(values['form']).sizes)})" if "form" in values else ""))

    @property
    def code_form(self) -> "CodeForm":
        return form_named(self.form)

    def named_sizes(self) -> dict:
        """``{"r": 2}``, ``{"n_workers": 12, "stragglers": 1}``."""
        return dict(zip(self.code_form.sizes, self.sizes))

    def folder(self, save_dir: str) -> Path:
        """``save_dir/<dataset>/<model>/k<k>/<the form's sizes>/<loss>/<encoder>/<decoder>[/seed<s>]``."""
        parts = [spec_name(self.dataset), spec_name(self.model), f"k{self.k}",
                 *(f"{letter}{v}" for letter, v in zip(self.code_form.folder_letters, self.sizes)),
                 spec_name(self.loss), spec_name(self.encoder), spec_name(self.decoder)]
        if self.run_seed is not None:
            parts.append(f"seed{self.run_seed}")
        return Path(save_dir, *parts)

    def describe(self) -> str:
        return (f"{spec_name(self.dataset)} {spec_name(self.model)} {self.code_form.describe(self)}"
                + (f" seed={self.run_seed}" if self.run_seed is not None else ""))

    def train_seed(self, cfg) -> int:
        """The seed of this run's coder initialisation and data order."""
        return self.run_seed if self.run_seed is not None else cfg.seed

    def record(self) -> dict:
        """This run's choices as its config.json holds them (beside the whole config)."""
        return copy.deepcopy({"dataset": self.dataset, "model": self.model, "k": self.k, **self.named_sizes(),
                              "loss": self.loss, "encoder": self.encoder, "decoder": self.decoder,
                              "run_seed": self.run_seed, "form": self.form})


def NWorkerSpec(dataset, model, k: int, n_workers: int, stragglers: int, loss, encoder, decoder,
                run_seed: Optional[int] = None) -> RunSpec:
    """The N-worker :class:`RunSpec` (the old name of that spec, kept for users' scripts)."""
    return RunSpec(dataset, model, k, (n_workers, stragglers), loss, encoder, decoder, run_seed, "nworker")


def expand_runs(cfg) -> list[RunSpec]:
    """Every combination of the config's lists, in a stable order: dataset, model, k, the form's sizes,
    loss, [encoder, decoder], seed."""
    form = form_named(cfg.form)
    lists = [getattr(cfg, key) for key in form.sweep_keys]
    return [RunSpec(dataset, model, k, tuple(sizes), loss, enc, dec, seed, form.name)
            for dataset, model, k, *sizes, loss, (enc, dec), seed in itertools.product(
                cfg.datasets, cfg.models, cfg.k_vals, *lists, cfg.losses, cfg.enc_dec_types, cfg.seeds or [None])]


class CodeForm:
    """One form of code (module docstring). Subclasses set the attributes and override what differs."""

    name: str = ""
    sizes: tuple = ()            # a run's sizes beside k, as config.json names them
    sweep_keys: tuple = ()       # the config's list keys sweeping them, in the same order
    folder_letters: tuple = ()   # their run folders' prefixes (k<k>/r<r>, k<k>/n<N>/s<S>)
    trainer: str = ""            # the class path of the training run (train/, above this floor: named, not imported)
    probe: str = ""              # the class path of the function (cfg, runs) that probes a sweep's coders before any
                                 # data (train.preflight.preflight calls it)
    on_ray: bool = True          # whether train.py --ray runs its sweeps
    probe_with_data: bool = True  # whether train.preflight.check_data probes its coders once the data's sizes
                                  # are known
    best_by: str = "val_recon_acc"  # the metrics column a classifier's best validation epoch is picked by
    parity_models: bool = True   # whether a code of this form may hold parity models (else F on every coded input)
    all_coded: bool = False      # whether every slot of a group is a coded input (no query answered by F as it is)
    strategies: tuple = ()       # the serving strategies that need a code of this form

    def __repr__(self) -> str:
        return f"<code form {self.name!r}>"

    # -- the config ------------------------------------------------------------------------------------
    def check(self, cfg, bad) -> None:
        """Raise ``bad(key, msg)`` (a ConfigError) for a value of this form's keys that cannot run."""

    def refuse(self, cfg, bad) -> None:
        """Raise ``bad(key, msg)`` for a key only this form reads, set in a config of another form."""

    def run_keys(self) -> dict:
        """config.json's one-run keys -> the config's list keys (how a run folder is read back as a config)."""
        return {"dataset": "datasets", "model": "models", "k": "k_vals", **dict(zip(self.sizes, self.sweep_keys)),
                "loss": "losses"}

    def describe(self, spec: RunSpec) -> str:
        """A run's sizes, loss and coders, as the sweep's lines and errors name it."""
        raise NotImplementedError

    # -- the code --------------------------------------------------------------------------------------
    def build_coders(self, spec: RunSpec, in_shape, n_out: int):
        raise NotImplementedError

    def code(self, cfg, spec: RunSpec, base, encoder, decoder, splits=None, n_out: Optional[int] = None):
        """The whole computation of ``spec`` around F ``base``, as training built it (parity models
        are built, not loaded: load their weights into ``code.parity_models``)."""
        raise NotImplementedError

    # -- the report ------------------------------------------------------------------------------------
    def columns(self, columns: list, errors: list) -> list:
        """The report table's columns for this form's runs, from the systematic table's ``columns`` and
        the rebuilt outputs' ``errors`` columns."""
        return columns

    def record_keys(self) -> tuple:
        """The keys a run's config.json must hold for the report to table it."""
        return ("dataset", "model", "k", *self.sizes, "loss", "encoder", "decoder")

    def label(self, row: dict) -> str:
        """A run's sizes in a plot title or a line: ``k=8 r=2``."""
        return " ".join(f"{key}={row[key]}" for key in ("k", *self.sizes))

    # -- serving ---------------------------------------------------------------------------------------
    def holds(self, code) -> bool:
        """Whether the loaded ``code`` is of this form."""
        raise NotImplementedError

    def layout(self, code) -> tuple[int, int, int]:
        """``(k, r, need)`` of a loaded code as serving lays it out: k queries, k + r slots per group,
        decoded from ``need`` of them."""
        raise NotImplementedError

    def shape(self, k: int, r: int, need: int) -> str:
        """The layout in words, as serving prints it."""
        raise NotImplementedError

    def serves(self, strategy: str) -> bool:
        """Whether ``strategy`` can serve a code of this form: any but those that need another form's code."""
        return not any(strategy in f.strategies for f in FORMS.values() if f is not self)

    def check_servable(self, code, run: str) -> None:
        """Raise a ConfigError naming 'runs' when serving cannot lay ``code`` out."""


class SystematicForm(CodeForm):
    name = "systematic"
    sizes, sweep_keys, folder_letters = ("r",), ("r_vals",), ("r",)
    trainer = "train.engine.CodedRun"
    probe = "train.preflight.probe_sweep_coders"
    strategies = ("coded",)

    def describe(self, spec):
        return f"k={spec.k} r={spec.r} {spec_name(spec.loss)} {spec_name(spec.encoder)}/{spec_name(spec.decoder)}"

    def build_coders(self, spec, in_shape, n_out):
        from coders.build import build_systematic_coders

        return build_systematic_coders(spec, in_shape, n_out)

    def code(self, cfg, spec, base, encoder, decoder, splits=None, n_out=None):
        from coders.build import build_parity_models
        from coders.systematic import Code

        parity = build_parity_models(cfg, spec, splits, base, n_out) if cfg.train_parity_model else None
        return Code(base, encoder, decoder, parity, spec.k, spec.r)

    def holds(self, code):
        return getattr(code, "n_workers", None) is None

    def layout(self, code):
        return code.k, code.r, code.k

    def shape(self, k, r, need):
        return f"k={k}, r={r}"


class NWorkerForm(CodeForm):
    name = "nworker"
    sizes = sweep_keys = ("n_workers", "stragglers")
    folder_letters = ("n", "s")
    trainer = "train.nworker_perturbed.PerturbedNWorkerRun"  # the plain N-worker run when nothing is perturbed
    probe = "train.nworker.probe_nworker_coders"
    on_ray = False
    probe_with_data = False  # train.nworker.probe_nworker_coders probes them, before any data
    best_by = "val_degraded_acc"  # the accuracy of all K answers over every straggler pattern (ApproxIFER's)
    parity_models = False
    all_coded = True
    strategies = ("nworker",)

    def check(self, cfg, bad):
        """The N-worker keys listed, with 0 <= S < N and K <= N in every combination; the perturbation keys'
        values (coders/perturb_config.py)."""
        for key in self.sweep_keys:
            if not getattr(cfg, key):
                raise bad(key, f"must list at least one value when 'form' is \"{self.name}\" (e.g. \"{key}\": "
                               f"{[10] if key == 'n_workers' else [1]}).")
        if any(n < 1 for n in cfg.n_workers):
            raise bad("n_workers", f"must hold integers of 1 or more; got {cfg.n_workers}.")
        if any(s < 0 for s in cfg.stragglers) or max(cfg.stragglers) >= min(cfg.n_workers):
            raise bad("stragglers", f"must hold integers S with 0 <= S < N for every N of 'n_workers' (at least "
                                    f"one worker answers); got stragglers {cfg.stragglers} with n_workers "
                                    f"{cfg.n_workers}.")
        if min(cfg.n_workers) < max(cfg.k_vals):
            raise bad("n_workers", f"must hold N >= K for every K of 'k_vals' (each of the K inputs needs a "
                                   f"worker's answer at least; serving refuses such a run); got n_workers "
                                   f"{cfg.n_workers} with k_vals {cfg.k_vals}. Fix: raise n_workers or lower k_vals.")
        if cfg.max_patterns < 1:
            raise bad("max_patterns", f"must be 1 or more; got {cfg.max_patterns}.")
        from coders.perturb_config import check_perturbation_keys

        check_perturbation_keys(cfg, bad)

    def refuse(self, cfg, bad):
        from coders.perturb_config import refuse_perturbation_keys

        refuse_perturbation_keys(cfg, bad)
        for key in self.sweep_keys:
            if getattr(cfg, key) is not None:
                raise bad(key, f"is read only by the N-worker form; this config's 'form' is {cfg.form!r}. Fix: "
                               f"set \"form\": \"{self.name}\", or remove '{key}' (the systematic form uses r_vals).")

    def describe(self, spec):
        return (f"K={spec.k} N={spec.n_workers} S={spec.stragglers} "
                f"{spec_name(spec.encoder)}/{spec_name(spec.decoder)}")

    def build_coders(self, spec, in_shape, n_out):
        from coders.nworker import build_nworker_coders

        return build_nworker_coders(spec.encoder, spec.decoder, spec.k, spec.n_workers, in_shape, n_out)

    def code(self, cfg, spec, base, encoder, decoder, splits=None, n_out=None):
        from coders.nworker import NWorkerCode

        return NWorkerCode(base, encoder, decoder, spec.k, spec.n_workers, spec.stragglers)

    def columns(self, columns, errors):
        """K, N, S for k, r; no all-k column (every answer is rebuilt, so the degraded accuracy is that of all
        K answers); a classifier's rebuilt-output errors after the accuracy lost."""
        out = []
        for key, head, kind in columns:
            if key == "k":
                out.append(("k", "K", kind))
            elif key == "r":
                out += [("n_workers", "N", "str"), ("stragglers", "S", "str")]
            elif key == "test_degraded_acc":
                out.append((key, "test acc, all K answers (%)", kind))
            elif key == "acc_lost":
                out += [(key, "accuracy lost vs F (points)", kind)] + list(errors)
            elif key not in ("test_group_acc",):
                out.append((key, head, kind))
        return out

    def label(self, row):
        return f"K={row['k']} N={row['n_workers']} S={row['stragglers']}"

    def holds(self, code):
        return getattr(code, "n_workers", None) is not None

    def layout(self, code):
        return code.k, code.n_workers - code.k, code.n_workers - code.stragglers

    def shape(self, k, r, need):
        return f"K={k}, N={k + r}, S={k + r - need}"

    def check_servable(self, code, run):
        if code.n_workers < code.k:
            raise ConfigError(f"Config key 'runs': run '{run}' codes K = {code.k} queries into N = {code.n_workers} "
                              f"< K worker inputs, which serving cannot lay out on its instances (a group of K "
                              f"queries sends N coded inputs). Fix: serve an N-worker run with N >= K.")


FORMS: dict[str, CodeForm] = {form.name: form for form in (SystematicForm(), NWorkerForm())}  # the one registry


def form_named(name: str) -> CodeForm:
    """The form a config's ``"form"`` names; a KeyError naming the known ones otherwise."""
    try:
        return FORMS[name]
    except (KeyError, TypeError):
        raise KeyError(f"no code form {name!r}; the forms are {', '.join(FORMS)}") from None


def form_of_record(config: dict) -> CodeForm:
    """The form of a run folder's config.json (one written before forms existed is systematic)."""
    name = config.get("form")
    return FORMS[name] if isinstance(name, str) and name in FORMS else FORMS["systematic"]


def form_of(code) -> CodeForm:
    """The form of a loaded code (:class:`coders.systematic.Code`, :class:`coders.nworker.NWorkerCode`, or a
    wrapper of one)."""
    return next(form for form in FORMS.values() if form.holds(code))


def check_forms(cfg, bad) -> None:
    """The config's own form checks its keys; every other form refuses the keys only it reads."""
    form_named(cfg.form).check(cfg, bad)
    for other in FORMS.values():
        if other.name != cfg.form:
            other.refuse(cfg, bad)
