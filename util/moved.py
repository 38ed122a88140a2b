"""Old module names a rename moved, kept working without a file of the old name.

This is the project's one mechanism for old names (of modules; :func:`keep_moved_attributes` for
names that moved up a layer). A file at the old path would
be a copy to keep in step, and some old names cannot have a file at all: one
named like a package of the project (``base_models/train.py``,
``bench/base_models.py``) would hide that package from every script run in its
folder (tests/test_layout.py). So an import hook serves them: ``import old``
gives the new module itself (one object under both names, so patching either
acts on both), and ``python -m old`` runs the new module's file. The new home
may be in the same package (``"fit"``) or anywhere (``"coders.code"``), and
nothing is imported until the old name is.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

_MOVED: dict[str, str] = {}  # old full name -> new full name


class _MovedLoader(importlib.machinery.SourceFileLoader):
    def create_module(self, spec):
        return importlib.import_module(_MOVED[spec.name])

    def exec_module(self, module):  # already executed under its new name
        pass


class _MovedNames(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _MOVED:
            return None
        new = importlib.util.find_spec(_MOVED[fullname])
        if new is None or not new.origin:
            return None
        return importlib.util.spec_from_file_location(fullname, new.origin, loader=_MovedLoader(fullname, new.origin))


def keep_moved_names(package: str, moved: dict[str, str]) -> None:
    """Serve ``package.<old>`` as the module ``new`` for each ``old: new`` of ``moved`` (call from the
    package's ``__init__`` with its ``__name__``). A ``new`` without a dot is a module of the same
    package; one with a dot is a full module name."""
    for old, new in moved.items():
        _MOVED[f"{package}.{old}"] = new if "." in new else f"{package}.{new}"
    if not any(isinstance(f, _MovedNames) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedNames())  # before any other finder: an old name is always the moved module


def keep_moved_attributes(module: str, moved: dict[str, str]) -> None:
    """Serve ``module.<name>`` from the module ``moved[name]`` for names that moved to a module of a higher
    package (call from ``module`` with its ``__name__``): a name kept for users' scripts, imported only
    when it is asked for, so the module itself still imports nothing above it."""
    def __getattr__(name: str):
        if name in moved:
            return getattr(importlib.import_module(moved[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    sys.modules[module].__getattr__ = __getattr__
