"""Starting or joining Ray, for the training sweep (train/ray_sweep.py) and for serving (serve/runtime.py)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from util.classpath import CODE_DIRS

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
    if address:
        ray.init(address=address, runtime_env=env, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), runtime_env=env, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)
    return True
