"""Starting or joining Ray, for the training sweep (train/ray_sweep.py) and for serving (serve/cluster/runtime.py)."""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Optional

from util.classpath import CODE_DIRS
from util.signals import Terminated, deferred, ignored, kill_left, ray_processes

ROOT = Path(__file__).resolve().parents[1]


def start_ray(address: Optional[str], num_cpus: Optional[int]) -> bool:
    """Join the cluster at ``address`` or start a local Ray; returns whether this call started it.

    Workers get this repository and the folders of user code (the run's
    ``code_dirs``) on their path; on a cluster these paths must exist on
    every node (shared storage), as README says.
    """
    import ray

    if ray.is_initialized():
        return False

    path = os.pathsep.join([str(ROOT), *CODE_DIRS] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = {"env_vars": {"PYTHONPATH": path}}
    started = False
    try:
        with deferred(), _own_sigterm() as rays:  # a signal now is raised once ray.init has returned
            try:
                if address:
                    ray.init(address=address, runtime_env=env, logging_level="ERROR", log_to_driver=False)
                else:
                    ray.init(num_cpus=num_cpus or os.cpu_count(), runtime_env=env, include_dashboard=False,
                             logging_level="ERROR", log_to_driver=False)
            finally:
                started = ray.is_initialized()
    except (KeyboardInterrupt, Terminated):
        if started:
            stop_ray()
        raise
    if rays and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:  # nobody handles SIGTERM: Ray's exit, as before
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, rays[-1])
    return True


@contextlib.contextmanager
def _own_sigterm():
    """ray.init installs a SIGTERM handler that exits without a word (and without stopping what it started):
    keep it from replacing ours while it runs."""
    from ray._private import utils

    install, wanted = getattr(utils, "set_sigterm_handler", None), []
    if install is not None:
        utils.set_sigterm_handler = wanted.append
    try:
        yield wanted
    finally:
        if install is not None:
            utils.set_sigterm_handler = install


def stop_ray() -> None:
    """Shut down the Ray this process started, its helper processes too, ignoring Ctrl-C meanwhile."""
    import ray

    with ignored():
        left = ray_processes()
        with contextlib.suppress(Exception):
            ray.shutdown()
        kill_left(left)
