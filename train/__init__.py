"""The config-driven trainer: losses, the training loop and its run folders, metrics, the command line.

Modules that moved to the layers below keep their old names (``from train.code
import load_code``, as older scripts write it): each old name is the very
module object of its new home, served by util.moved's import hook, so no file
stands at the old paths and git follows each move as a rename.
"""
from util.moved import keep_moved_names

keep_moved_names(__name__, {
    "code": "coders.code",            # Code, freeze, load_code: the computation, below training and serving
    "scenarios": "coders.scenarios",  # unavailability scenarios, part of the computation
    "checkpoint": "util.checkpoint",  # checkpoint files and digests
    "lock": "util.lock",              # the one-writer folder lock, used by base_models too
})
