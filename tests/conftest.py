"""Shared fixtures: where the real data and reference weights are, tiny digits configs, a killed run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# One torch thread for the suite and the processes it starts (they inherit OMP_NUM_THREADS), unless the caller
# set a count: its models are tiny, and torch's threads on a busy two-core machine wait on each other at every op
# (three epochs of the digits quickstart: 8-10 s on one thread, 50-70 s on two, at load 10). A test that needs
# more threads sets them itself (tests/test_denormals.py), and every test's count is handed back after it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _first_existing(*candidates):
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Folder with MNIST/ and FashionMNIST/ (``$LCC_DATA_DIR`` or ../shared/data)."""
    found = _first_existing(os.environ.get("LCC_DATA_DIR"), SHARED / "data")
    if found is None or not (found / "MNIST" / "raw").is_dir():
        pytest.skip("real MNIST files not present here; CI points LCC_DATA_DIR at ../shared/data")
    return found


@pytest.fixture(scope="session")
def small_mnist_dir(data_dir, tmp_path_factory) -> Path:
    """A data folder holding the first 1,200 training and 200 test images of the real MNIST, in MNIST's own
    file format: the reader, the splits and the models see MNIST, and a whole epoch takes a second or two."""
    import struct

    out = tmp_path_factory.mktemp("small_data")
    raw = out / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, count in (("train", 1200), ("t10k", 200)):
        for kind, header, item in (("images-idx3-ubyte", 16, 28 * 28), ("labels-idx1-ubyte", 8, 1)):
            with open(data_dir / "MNIST" / "raw" / f"{name}-{kind}", "rb") as f:
                head = bytearray(f.read(header))
                body = f.read(count * item)
            head[4:8] = struct.pack(">i", count)  # the item count, big-endian, after the 4-byte magic number
            (raw / f"{name}-{kind}").write_bytes(bytes(head) + body)
    return out


@pytest.fixture(scope="session")
def anchor_dir() -> Path:
    """Reference base-model weights (``$LCC_ANCHOR_DIR`` or ../shared/anchor_models)."""
    found = _first_existing(os.environ.get("LCC_ANCHOR_DIR"), SHARED / "anchor_models")
    if found is None:
        pytest.skip("reference weights not present here; CI has ../shared/anchor_models")
    return found


@pytest.fixture(scope="session")
def base_model_dir(tmp_path_factory) -> Path:
    """One folder of trained base models shared by the whole session (F on digits trains in a second)."""
    return tmp_path_factory.mktemp("base_models")


@pytest.fixture
def digits_config(tmp_path, base_model_dir):
    """Write a small digits config with ``overrides`` and return its path."""

    def make(**overrides) -> Path:
        cfg = {
            "num_epoch": 2,
            "k_vals": [2],
            "enc_dec_types": [["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]],
            "datasets": ["digits"],
            "models": ["base-mlp"],
            "losses": ["torch.nn.MSELoss"],
            "train_encoder": True,
            "train_parity_model": False,
            "train_decoder": True,
            "batch_size": 16,
            "save_dir": str(tmp_path / "save"),
            "base_model_dir": str(base_model_dir),
            "device": "cpu",
            "progress": False,
        }
        cfg.update(overrides)
        path = tmp_path / "config.json"
        path.write_text(json.dumps(cfg))
        return path

    return make


def _train_once(tmp_path_factory, name: str, cfg: dict) -> str:
    """Train ``cfg`` (quietly) into a fresh session folder; the run folder of its one run."""
    from train.cli import run_all

    tmp = tmp_path_factory.mktemp(name)
    path = tmp / "train.json"
    path.write_text(json.dumps({**cfg, "save_dir": str(tmp / "save"), "device": "cpu", "progress": False}))
    with open(os.devnull, "w") as quiet:
        run_all(str(path), {}, out=quiet)
    return str(next((tmp / "save").rglob("best.pt")).parent)


@pytest.fixture(scope="session")
def digits_run_folder(tmp_path_factory, base_model_dir) -> str:
    """A run folder of a digits learned code (k = 2, r = 1, two epochs), trained once per session."""
    return _train_once(tmp_path_factory, "digits_run", {
        "num_epoch": 2, "k_vals": [2], "enc_dec_types": [["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]],
        "datasets": ["digits"], "models": ["base-mlp"], "losses": ["torch.nn.MSELoss"], "batch_size": 16,
        "base_model_dir": str(base_model_dir)})


@pytest.fixture(scope="session")
def nworker_run_folder(tmp_path_factory, base_model_dir) -> str:
    """A run folder of a digits N-worker Berrut code (K = 2, N = 3, S = 1; nothing to train), made once per session."""
    return _train_once(tmp_path_factory, "nworker_run", {
        "form": "nworker", "num_epoch": 0, "k_vals": [2], "n_workers": [3], "stragglers": [1],
        "enc_dec_types": [["coders.nworker.BerrutEncoder", "coders.nworker.BerrutDecoder"]],
        "datasets": ["digits"], "models": ["base-mlp"], "losses": ["mse"], "epoch_groups": "disjoint",
        "base_model_dir": str(base_model_dir)})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups off the items
def pytest_collection_modifyitems(session, config, items):
    """The tests that use the session's Ray run on one process, one after another.

    In one process (the default) the modules that use it run last: its idle daemons take a share of the two
    cores for as long as it lives, so it should not live beside the CPU-bound rest of the suite. Under
    pytest-xdist (``-n 2 --dist loadgroup``, README) those tests form one group, ``ray``: one worker starts one Ray
    and runs them all (the largest group goes out first), while the other worker takes the rest a test at a
    time and the first joins it when the group is done."""
    def module(item):
        return item.nodeid.split("::", 1)[0]

    on_ray = [i for i in items if "local_ray" in getattr(i, "fixturenames", ())
              or any(m.args == ("ray",) for m in i.iter_markers("xdist_group"))]  # asks for it when it runs
    ray_modules = {module(i) for i in on_ray}
    items[:] = ([i for i in items if module(i) not in ray_modules]
                + [i for i in items if module(i) in ray_modules])
    for item in on_ray:
        item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray (2 CPUs) for the whole session, started by the first test that needs it and shut down at
    the end: ``ray.init`` costs about 10 s, and five modules use it (run last, see above). The code under test
    joins it (``start_ray`` returns False for a Ray already started) and so never shuts it down; a test must not
    either."""
    ray = pytest.importorskip("ray")
    from util.ray_cluster import start_ray, stop_ray

    for attempt in range(3):
        try:
            start_ray(None, 2)
            break
        except Exception:  # Ray's own start on an overloaded machine ("the current node timed out during startup")
            stop_ray()  # what it started of itself
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


SUITE_POOL = "suite"  # the name of the session's shared pool of instances


@pytest.fixture(scope="session")
def suite_pool(local_ray, digits_run_folder, tmp_path_factory):
    """Four F instances and one parity instance of ``digits_run_folder`` (enough for every strategy at m = 2,
    k = 2, r = 1) on the session's Ray, started once for every module that serves on a pool of its own making
    (test_app, test_serve, test_batching, test_policies; use ``digits_pool``): each start of an instance is a
    Ray worker importing torch, seconds each on this machine. A named pool (``SUITE_POOL``), so a second front
    end can attach to it. A test that kills an instance replaces it (``Pool.replace_dead``) before the next
    uses the pool."""
    from coders.code import load_code
    from serve.config import validate
    from serve.runtime import Pool

    cfg = validate({"runs": [digits_run_folder], "instances": 2, "num_cpus": 2, "plot": False,
                    "out_dir": str(tmp_path_factory.mktemp("pool") / "out")})
    pool = Pool(load_code(digits_run_folder).code, cfg, 4, [1], name=SUITE_POOL)
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def digits_pool(suite_pool):
    """The session's shared pool (``suite_pool``), each instance idle when a module starts: what an earlier
    module left running on it (a straggler's injected delay, a copy nobody waited for) has finished."""
    suite_pool.wait_ready(suite_pool.f + [a for row in suite_pool.parity for a in row])
    return suite_pool


def _threads_handed_back():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# Runs with 'num_threads', serving instances and the torchrun and Ray tests set torch's thread
# count, which is process-wide: it is handed back after every test and every module (a module's
# own fixtures may set it before its first test), so no test's numbers depend on the tests before it.
keep_torch_threads = pytest.fixture(autouse=True)(_threads_handed_back)
keep_torch_threads_per_module = pytest.fixture(scope="module", autouse=True)(_threads_handed_back)


def _without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.fixture
def killed_and_resumed(tmp_path):
    """``run(make_config, num_epoch)``: train one config to the end in a process of its own, and the same
    config again in another process killed with SIGKILL (no clean-up: the worst case) after its second
    epoch, then ``--resume``d. Returns both runs' metrics rows without their timings. Every run is a
    process of its own, as a user's are, so no process setting an earlier test changed tells them apart."""
    from train.metrics import MetricsLog

    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def train(path, *args, **popen):
        cmd = [sys.executable, "train.py", str(path), *args]
        if popen:
            return subprocess.Popen(cmd, cwd=ROOT, env=env, **popen)
        return subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)

    def run(make_config, num_epoch: int) -> tuple[list[dict], list[dict]]:
        train(make_config(num_epoch=num_epoch, save_dir=str(tmp_path / "full")))
        full = MetricsLog(next((tmp_path / "full").rglob("metrics.jsonl")).parent).rows()
        path = make_config(num_epoch=num_epoch, save_dir=str(tmp_path / "killed"))
        proc = train(path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, log = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            log = log or next((tmp_path / "killed").rglob("metrics.jsonl"), None)
            if log is not None and len(log.read_text().splitlines()) >= 3:  # epochs 0-2 are in
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait()
        if proc.returncode == 0:
            pytest.fail("the run finished before it could be killed; make it longer")
        train(path, "--resume")
        return _without_seconds(full), _without_seconds(MetricsLog(log.parent).rows())

    return run
