"""Benchmarks that print figures (not tests): ``python -m bench.speed``."""
from util.moved import keep_moved_names

# ``python -m bench.base_models`` (the command before the rename) runs bench.base_model_fit.
keep_moved_names(__name__, {"base_models": "base_model_fit"})
