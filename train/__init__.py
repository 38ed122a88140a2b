"""The config-driven trainer: losses, the training loop and its run folders, metrics, the command line.

Modules that moved to the layers below keep their old names here. Each old
name (``train.code``, ...) is the very module object of its new home, not a
copy: ``from train.code import load_code`` (as older scripts write it) and a
test patching either name act on one module. No file stands at the old paths,
so git follows each move as a rename.
"""
import importlib as _importlib
import sys as _sys

MOVED = {
    "train.code": "coders.code",            # Code, freeze, load_code: the computation, below training and serving
    "train.config": "coders.config",        # the run config schema, which load_code reads too
    "train.scenarios": "coders.scenarios",  # unavailability scenarios, part of the computation
    "train.checkpoint": "util.checkpoint",  # checkpoint files and digests
    "train.lock": "util.lock",              # the one-writer folder lock, used by base_models too
}

for _old, _new in MOVED.items():
    _module = _importlib.import_module(_new)
    _sys.modules.setdefault(_old, _module)
    globals()[_old.rpartition(".")[2]] = _module
