"""A sweep on Ray: ``python train.py CONFIG.json --ray [ADDRESS]`` runs every run of the sweep as a Ray task.

The driver (this process) has already checked the whole sweep (preflight,
occupied folders, data) when :func:`run_sweep` is called, so bad input stops
the command before anything is submitted. It then:

1. trains the missing base models F, one task per (dataset, model), so that
   runs sharing an F never race to write its file;
2. submits one task per run, asking Ray for one GPU when the run trains on
   CUDA and for ``num_threads`` CPUs (1 when unset) otherwise;
3. prints each task's output as it comes, every line prefixed with
   ``[run i/N]``, and collects what each run returned.

Every task writes the run folder it writes in a sequential sweep (the
folders, the data and F's weights are read and written at the driver's
paths: on a cluster they must be on storage every node sees at the same path,
see README, Scaling out). A task whose worker dies (node lost, OOM kill,
SIGKILL) is retried by Ray up to :data:`MAX_RETRIES` times, and a retried
task always resumes from the run's ``current.pt``, so it loses at most the
epoch in progress and ends with the numbers of an uninterrupted run.
Errors raised by lcc itself (a diverged run, a checkpoint of another run)
are returned as results, never retried.

A small actor, :class:`Monitor`, carries the output lines to the driver and
counts each run's attempts (Ray does not tell a task that it is a retry).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Optional

from util.errors import RunDiverged, UserError

MAX_RETRIES = 3
# Test hook: a folder; each run's worker kills itself (SIGKILL) once, right after the
# first epoch is checkpointed, leaving a marker file there so that the retry goes on.
KILL_ENV = "LCC_RAY_TEST_KILL_DIR"


class Monitor:
    """Output lines of every task, waiting for the driver, and the number of starts of each run."""

    def __init__(self):
        self.lines: list[tuple[bool, str]] = []
        self.starts: dict[int, int] = {}

    def started(self, index: int) -> int:
        self.starts[index] = self.starts.get(index, 0) + 1
        return self.starts[index]

    def emit(self, lines: list[tuple[bool, str]]) -> None:
        self.lines.extend(lines)

    def drain(self) -> list[tuple[bool, str]]:
        lines, self.lines = self.lines, []
        return lines


class LineSender:
    """A text stream for a task's print()s: whole lines go to the monitor with the run's prefix.

    A carriage return starts the line again (what a progress bar redraws is dropped,
    only what stands after the last one is kept).
    """

    def __init__(self, monitor, prefix: str, is_err: bool):
        self.monitor, self.prefix, self.is_err = monitor, prefix, is_err
        self.buf = ""

    def write(self, text: str) -> int:
        self.buf += text
        *whole, self.buf = self.buf.split("\n")
        self.buf = self.buf.rpartition("\r")[2]
        lines = [line.rpartition("\r")[2] for line in whole]
        if lines:
            self.monitor.emit.remote([(self.is_err, f"{self.prefix} {line}") for line in lines if line.strip()])
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def close(self) -> None:
        """Send what is left and wait until the monitor has every line of this task (its calls run in order)."""
        import ray

        rest = [(self.is_err, f"{self.prefix} {self.buf}")] if self.buf.strip() else []
        self.buf = ""
        ray.get(self.monitor.emit.remote(rest))


def _die_after_first_epoch(run, kill_dir: str, index: int) -> None:
    """The test hook of :data:`KILL_ENV`: SIGKILL this worker once, after epoch 1 is checkpointed."""
    marker = Path(kill_dir) / f"run{index}.killed"
    finish_epoch = run.finish_epoch

    def finish_then_die(row, out):
        finish_epoch(row, out)
        if row["epoch"] == 1 and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    run.finish_epoch = finish_then_die


def run_task(monitor, index: int, total: int, cfg, spec, folder: Optional[str], resume: bool, overwrite: bool,
             only_test: bool, cwd: str, code_dirs: list[str], threads: int, kill_dir: Optional[str]) -> dict:
    """One run of the sweep on a worker; returns ``{"status": ..., "rows"/"metrics"/"message": ...}``."""
    import ray
    import torch

    from util.classpath import add_code_dir
    from train.engine import CodedRun

    attempt = ray.get(monitor.started.remote(index))
    prefix = f"[run {index}/{total}]"
    out, err = LineSender(monitor, prefix, False), LineSender(monitor, prefix, True)
    run = None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if not os.path.isdir(cwd):
                return {"status": "error", "message": (
                    f"--ray: the driver's working folder '{cwd}' does not exist on the node "
                    f"{os.uname().nodename}, so the run's relative paths (save_dir, data, F's weights) mean nothing "
                    f"there. Fix: put the checkout and the run folders on storage every node mounts at the same "
                    f"path (README, Scaling out).")}
            os.chdir(cwd)
            for d in code_dirs:
                add_code_dir(d)
            if cfg.num_threads is None:
                torch.set_num_threads(threads)
            if attempt > 1 and not only_test:
                # A retry after the worker died: continue from the last finished epoch, whatever
                # the first attempt was asked (a fresh start with --overwrite included).
                print(f"attempt {attempt}: the previous worker died; resuming from current.pt", file=out)
                resume, overwrite = True, False
            if cfg.device.startswith("cuda:") and ray.get_gpu_ids():
                cfg = dataclasses.replace(cfg, device="cuda")  # Ray shows the task its one GPU as cuda:0
            run = CodedRun(cfg, spec, Path(folder) if folder is not None else None)
            if only_test:
                run.load_state(run.folder / "best.pt")
                return {"status": "done", "metrics": run.evaluate("test"), "epoch": run.epoch,
                        "folder": str(run.folder)}
            if kill_dir:
                _die_after_first_epoch(run, kill_dir, index)
            rows = run.fit(resume=resume, overwrite=overwrite, out=out)
            return {"status": "done", "rows": rows, "folder": str(run.folder)}
    except RunDiverged as exc:
        return {"status": "diverged", "message": str(exc), "rows": run.log.rows() if run is not None else [],
                "folder": str(run.folder) if run is not None else folder}
    except UserError as exc:
        return {"status": "error", "message": str(exc)}
    finally:
        out.close()
        err.close()


def train_base_task(cfg, spec, cwd: str, code_dirs: list[str]) -> str:
    """Train the F of ``spec`` (stored at its default path), as the first run using it would."""
    from base_models.fit import load_or_train
    from datasets import load_data
    from util.classpath import add_code_dir

    os.chdir(cwd)
    for d in code_dirs:
        add_code_dir(d)
    splits = load_data(spec.dataset, cfg.data_dir, cfg.download, cfg.val_size, cfg.seed, cfg.domains)
    load_or_train(spec.model, splits, path=None, root=cfg.base_model_dir, device=cfg.device, seed=cfg.seed,
                  epochs=cfg.base_model_epochs, progress=False)
    return spec.describe()


def missing_base_models(cfg, runs) -> list:
    """One run per F that the sweep needs and that is not trained yet (default path, no 'base_model_file')."""
    if cfg.base_model_file is not None:
        return []
    from base_models.fit import build_base_model, default_path, has_weights
    from datasets import load_data

    missing = {}
    for spec in runs:
        splits = load_data(spec.dataset, cfg.data_dir, cfg.download, cfg.val_size, cfg.seed, cfg.domains)  # cached by check_data
        path = default_path(splits.name, spec.model, cfg.base_model_dir)
        if not path.exists() and str(path) not in missing and has_weights(build_base_model(spec.model, splits)):
            missing[str(path)] = spec  # a plain function F has no weights to train
    return list(missing.values())


def wants_gpu(device: str, ray) -> bool:
    if device.startswith("cuda"):
        return True
    return device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1


def unreachable(address: str) -> Optional[str]:
    """Why ``HOST:PORT`` (or ``ray://HOST:PORT``) cannot be reached within a few seconds, or None when it
    can or the address is one Ray resolves itself ("auto"): Ray would otherwise retry for minutes."""
    import socket

    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def connect(address: Optional[str]) -> bool:
    """Start the embedded local Ray (``address`` None) or join a cluster; returns whether it was started here."""
    from util.ray_cluster import start_ray

    why = unreachable(address) if address else None
    if why is not None:
        raise UserError(f"--ray {address}: nothing answers there ({why}), so no task was submitted. Fix: pass the "
                        f"address that 'ray start --head' printed (HOST:6379, or ray://HOST:10001 for Ray Client), "
                        f"--ray auto on a node of the cluster, or plain --ray for a local Ray.")
    try:
        return start_ray(address, None)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"--ray {address}: could not join a Ray cluster there ({str(exc).splitlines()[0]}). "
                        f"Fix: pass the address 'ray start --head' printed (e.g. --ray auto on a node of the "
                        f"cluster, or --ray ray://HOST:10001), or plain --ray for a local Ray.") from None


def run_sweep(cfg, runs, folder, address: Optional[str], resume: bool = False, overwrite: bool = False,
              only_test: bool = False, out=None, failed: Optional[list] = None) -> list:
    """Run ``runs`` of ``cfg`` as Ray tasks; same results, files and failures as :func:`train.cli.run_all`.

    ``folder`` is the run folder when the command was given one (a single run), else None.
    """
    out = out or sys.stdout
    started = connect(address)
    import ray

    from util.classpath import CODE_DIRS

    cwd, code_dirs = os.getcwd(), list(CODE_DIRS)
    monitor = None
    refs: dict = {}
    try:
        gpu = wants_gpu(cfg.device, ray)
        threads = cfg.num_threads or 1
        opts = {"num_cpus": threads, "num_gpus": 1 if gpu else 0}
        monitor = ray.remote(num_cpus=0)(Monitor).remote()
        base_jobs = missing_base_models(cfg, runs) if not only_test else []
        if base_jobs:
            train_base = ray.remote(max_retries=MAX_RETRIES, **opts)(train_base_task)
            print(f"training {len(base_jobs)} base model(s) F first, one task each", file=out, flush=True)
            for name in ray.get([train_base.remote(cfg, spec, cwd, code_dirs) for spec in base_jobs]):
                print(f"F trained for {name}", file=out, flush=True)
        task = ray.remote(max_retries=MAX_RETRIES, **opts)(run_task)
        kill_dir = os.environ.get(KILL_ENV) or None
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        print(f"{len(runs)} runs submitted to {where} ({opts['num_cpus']} CPU{'s' * (threads > 1)}"
              f"{' + 1 GPU' if gpu else ''} each)", file=out, flush=True)
        for i, spec in enumerate(runs, 1):
            ref = task.remote(monitor, i, len(runs), cfg, spec, str(folder) if folder is not None else None,
                              resume, overwrite, only_test, cwd, code_dirs, threads, kill_dir)
            refs[ref] = i
        results = collect(ray, monitor, refs, runs, out, failed)
    except KeyboardInterrupt:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
    return results


def collect(ray, monitor, refs: dict, runs, out, failed: Optional[list]) -> list:
    """Print the tasks' lines as they come and gather their results in run order."""
    results: dict[int, object] = {}
    errors: list[str] = []
    pending = list(refs)

    def show():
        for is_err, line in ray.get(monitor.drain.remote()):
            print(line, file=sys.stderr if is_err else out, flush=True)

    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        show()
        for ref in done:
            i = refs[ref]
            try:
                res = ray.get(ref)
            except ray.exceptions.RayError as exc:  # retries spent, or a bug in a task
                detail = str(exc).strip().splitlines()
                res = {"status": "lost", "message": detail[-1] if detail else type(exc).__name__}
                print(f"[run {i}/{len(runs)}] error: {''.join(traceback.format_exception_only(exc)).strip()}",
                      file=sys.stderr)
            status = res["status"]
            if status == "done":
                results[i] = res.get("rows", res.get("metrics"))
                if "metrics" in res:
                    import json

                    print(json.dumps({"run": res["folder"], "epoch": res["epoch"], **res["metrics"]}), file=out)
            elif status == "diverged":
                if failed is None:
                    raise RunDiverged(res["message"])
                print(f"[run {i}/{len(runs)}] error: {res['message']}", file=sys.stderr)
                failed.append(res["folder"])
                results[i] = res["rows"]
            elif status == "lost":
                folder = runs[i - 1].describe()
                if failed is None:
                    raise UserError(f"run {i} ({folder}) failed on Ray: {res['message']}")
                failed.append(f"{folder} (its task failed on Ray after {MAX_RETRIES} retries: {res['message']}; "
                              f"current.pt holds its last finished epoch, so --resume continues it)")
                results[i] = []
            else:
                errors.append(f"run {i}: {res['message']}")
                results[i] = None
    show()
    if errors:
        raise UserError(" ".join(errors))
    return [results[i] for i in sorted(results)]
