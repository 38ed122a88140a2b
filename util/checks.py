"""Checks of a machine's resources that every command makes before any work: devices, folders."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from util.errors import ConfigError


def check_device(name: str, label: str = "Config key 'device'") -> None:
    """Refuse a device torch cannot hold tensors on; ``label`` names the key or flag in the message."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{label}: {name!r} is not a device name; use \"auto\", \"cpu\" "
                          f"or \"cuda\".") from None
    if dev.type == "meta":
        raise ConfigError(f"{label}: \"meta\" tensors hold shapes but no values, so nothing can be "
                          "trained on them. Fix: use \"auto\", \"cpu\" or \"cuda\".")
    try:
        if dev.type == "cuda":  # no allocation: that would open a CUDA context on GPU 0 in every process
            if not torch.cuda.is_available():
                raise RuntimeError("no usable GPU")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise RuntimeError(f"this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
        elif dev.type != "cpu":
            (torch.ones(2, device=dev) + 1).sum().item()
    except Exception as exc:
        raise ConfigError(f"{label}: torch cannot use {name!r} on this machine "
                          f"({type(exc).__name__}: {str(exc).split('. ')[0][:160]}). Fix: use \"auto\" (CUDA when "
                          f"present, else the CPU) or \"cpu\".") from None


def check_writable_folder(path: str, key: str, label: Optional[str] = None) -> None:
    """``path`` is a folder lcc may create files in, or could be created as one; ``label`` names
    the key or flag in the message (default: the config key ``key``)."""
    label = label or f"Config key '{key}'"
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{label}: '{p}' is a file, not a folder. Fix: point '{key}' at a folder "
                          f"(it is created when missing).")
    existing = p
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{label}: '{p}' cannot be created, since '{existing}' is a file. Fix: "
                          f"choose another folder for '{key}'.")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{label}: '{existing}' is not writable by this user, so lcc cannot write "
                          f"{'under ' if existing != p else ''}'{p}'. Fix: choose a folder you can write to.")
