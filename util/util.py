"""The helpers the original write-ups import: ``from util.util import get_flattened_dim``.

The helpers themselves live in :mod:`util.shapes`, :mod:`util.hardware` and
:mod:`util.files`; this module keeps the write-ups' import path, so their
encoder snippet runs as a user's own module unchanged.

A module named like its package has one trap: a script run from inside
``util/`` (``python util/checkpoint.py``) puts ``util/`` first on ``sys.path``, so
``import util`` finds this file instead of the package, and every
``import util.files`` then fails. When that happens this file is imported
under the name ``util`` and stands in for the package: it gives itself the
package's folder as ``__path__``, so ``util.files`` and the other modules are
found as usual (tests/test_layout.py runs such a script).
"""
from __future__ import annotations

import os

if __name__ == "util":  # imported as the package itself (see above): find the package's modules here
    __path__ = [os.path.dirname(os.path.abspath(__file__))]

from util.files import TMP_SUFFIX, atomic_save, atomic_write_text, remove_stale_temps  # noqa: E402
from util.hardware import (count_subnormal, denormals_flushed, flush_denormals, keep_freed_memory,  # noqa: E402
                           resolve_device)
from util.shapes import get_flattened_dim  # noqa: E402

__all__ = ["get_flattened_dim", "resolve_device", "keep_freed_memory", "flush_denormals", "denormals_flushed",
           "count_subnormal", "atomic_save", "atomic_write_text", "remove_stale_temps", "TMP_SUFFIX"]
