"""Old module names a rename moved, kept working without a file of the old name.

A file named like a package of the project (``base_models/train.py``,
``bench/base_models.py``) would hide that package from every script run in its
folder (tests/test_layout.py), so the old name is served by an import hook
instead: ``import old`` gives the new module itself (one object under both
names), and ``python -m old`` runs the new module's file.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

_MOVED: dict[str, tuple[str, str]] = {}  # old full name -> (new full name, its file)


class _MovedLoader(importlib.machinery.SourceFileLoader):
    def create_module(self, spec):
        return importlib.import_module(_MOVED[spec.name][0])

    def exec_module(self, module):  # already executed under its new name
        pass


class _MovedNames(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _MOVED:
            return None
        where = _MOVED[fullname][1]
        return importlib.util.spec_from_file_location(fullname, where, loader=_MovedLoader(fullname, where))


def keep_moved_names(package: str, package_file: str, moved: dict[str, str]) -> None:
    """Serve ``package.<old>`` as ``package.<new>`` for each ``old: new`` of ``moved`` (call from the
    package's ``__init__`` with its ``__name__`` and ``__file__``)."""
    from pathlib import Path

    for old, new in moved.items():
        _MOVED[f"{package}.{old}"] = (f"{package}.{new}", str(Path(package_file).with_name(new + ".py")))
    if not any(isinstance(f, _MovedNames) for f in sys.meta_path):
        sys.meta_path.append(_MovedNames())
