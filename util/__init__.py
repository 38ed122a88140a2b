"""Small shared helpers: class-path resolution, shapes, devices, atomic files."""

from util.moved import keep_moved_names

# The training report moved beside what it reports (train/report.py); `python -m util.report` and
# `from util import report` still work. A string, not an import: util stands below train.
keep_moved_names(__name__, {"report": "train.report"})
