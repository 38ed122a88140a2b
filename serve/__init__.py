"""Serving trained codes: a Ray runtime with injected stragglers, and a simulator (``python -m serve``)."""
