"""The hostile-input lists of the hardening rounds, re-run each time: bad bodies, bad keys, signal offsets.

Each list is what a round of trying the service and the commands as a hostile
user found (issue 32 and the rounds before it), so the next round starts from
them. The bodies run here in-process through the service's own body reading
and parsing (no Ray, no HTTP: cheap); ``tests/test_app.py`` sends the same
lists over HTTP to a served code and checks the service stays healthy after
each. A new finding goes into its list.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from util.signals import alive

SHAPE = (1, 8, 8)  # the digits F of the suite's served run

# (body, Content-Type, status, a piece of the reason, a piece the reason must not hold)
BAD_BODIES = [
    (b"[1, 2", "application/json", 400, "not JSON", None),
    (b"[[1, 2], [3]]", "application/json", 422, "not an array of numbers", None),
    (b'["a"]', "application/json", 422, "kind string", None),
    (json.dumps([0.5] * 63).encode(), "application/json", 422, "shape [63]", None),
    (json.dumps([[0.5] * 8] * 8).encode(), "application/json", 422, "shape [8, 8]", None),
    (("[NaN" + ", 0" * 63 + "]").encode(), "application/json", 422, "non-finite", None),
    (json.dumps([1e39] * 64).encode(), "application/json", 422, "non-finite", None),
    (b'{"inputs": []}', "application/json", 422, "only \"input\"", None),
    (b"\x89PNG not really", "image/png", 422, "not an image", None),
    (b"<xml/>", "application/xml", 415, "application/xml", None),
    (json.dumps([0.5] * 64 * 200).encode(), "application/json", 413, "max_body_bytes", None),
    # issue 32: strings, booleans, nulls and mixed types were read as numbers (or null as "non-finite")
    (json.dumps(["0.1"] * 64).encode(), "application/json", 422, "64 values of kind string", None),
    (json.dumps([True] * 64).encode(), "application/json", 422, "64 values of kind boolean", None),
    (json.dumps([0.1] * 63 + ["1e3"]).encode(), "application/json", 422, "1 value of kind string (\"1e3\")", None),
    (json.dumps([None] * 64).encode(), "application/json", 422, "kind null", "non-finite"),
    (json.dumps([0.5] * 62 + [False, {"a": 1}]).encode(), "application/json", 422, "boolean, object", None),
    (json.dumps({"input": [[["0.5"] * 8] * 8]}).encode(), "application/json", 422, "kind string", None),
    (b"[" + b"1" + b"0" * 400 + b"]", "application/json", 422, "beyond float32", None),
    # issue 32: nested 1,000 deep was a RecursionError and a 500; a few levels too deep reach numpy's 64-dim limit
    (b"[" * 1000 + b"]" * 1000, "application/json", 422, "nests", None),  # by the parser's limit, or the shape's
    (b"[" * 200 + b"0.5" + b"]" * 200, "application/json", 422, "nests arrays more than 3 deep", None),
]

BAD_BATCH_BODIES = [
    (json.dumps([["0.5"] * 64]).encode(), 422, "input 0 holds 64 values of kind string"),
    (json.dumps({"inputs": [[0.5] * 64, [None] * 64]}).encode(), 422, "input 1 holds 64 values of kind null"),
    (json.dumps({"inputs": [[0.5] * 64, [0.5] * 3]}).encode(), 422, "input 1 has shape [3]"),
    (b"[" * 1000 + b"]" * 1000, 422, "nests"),
    (json.dumps([[[[[0.5]]]]]).encode(), 422, "input 0 nests arrays more than 3 deep"),
    (b"[]", 422, "non-empty JSON array"),
]

MAX_BODY = 4096  # app.max_body_bytes of the services these lists are sent to


class Request:
    """What the body readers use of a request: its headers and its body, streamed in pieces."""

    def __init__(self, body: bytes, kind: str):
        self.body, self.headers = body, {"content-type": kind, "content-length": str(len(body))}

    async def stream(self):
        for i in range(0, len(self.body), 1000):
            yield self.body[i:i + 1000]


def read(body: bytes, kind: str, batch: bool):
    """The inputs the service reads from ``body``, or its refusal (BadInput)."""
    from serve.app import parse_inputs, read_body

    async def go():
        request = Request(body, kind)
        return await parse_inputs(request, await read_body(request, MAX_BODY), SHAPE, "digits", batch, 64)

    return asyncio.run(go())


@pytest.mark.parametrize("body,kind,status,reason,absent", BAD_BODIES, ids=[f"{i}" for i in range(len(BAD_BODIES))])
def test_every_bad_body_is_refused_with_its_status_and_a_one_line_reason(body, kind, status, reason, absent):
    from serve.app import BadInput

    with pytest.raises(BadInput) as refused:
        read(body, kind, batch=False)
    assert refused.value.status == status, refused.value.reason
    assert reason in refused.value.reason and "\n" not in refused.value.reason
    assert absent is None or absent not in refused.value.reason


def test_every_bad_batch_is_refused_naming_the_input():
    from serve.app import BadInput

    for body, status, reason in BAD_BATCH_BODIES:
        with pytest.raises(BadInput) as refused:
            read(body, "application/json", batch=True)
        assert (refused.value.status, reason in refused.value.reason) == (status, True), refused.value.reason


def test_numbers_in_the_shape_or_flat_are_read_as_they_were_sent():
    x = np.random.default_rng(0).uniform(-3, 3, 64).astype(np.float32)
    for body in (json.dumps(x.tolist()), json.dumps({"input": x.reshape(SHAPE).tolist()})):
        (got,) = read(body.encode(), "application/json", batch=False)
        assert got.shape == SHAPE and np.array_equal(got.ravel(), x)
    ints = read(json.dumps([[1] * 64, [[[2] * 8] * 8]]).encode(), "application/json", batch=True)
    assert [float(a.mean()) for a in ints] == [1.0, 2.0]


def test_a_bad_head_is_named_by_its_content_length():
    from serve.edge import bad_head_reason

    assert bad_head_reason(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n") == \
        "Content-Length 'abc' is not a number of bytes"
    assert "not a number" in bad_head_reason(b"POST / HTTP/1.1\r\ncontent-length: -5\r\n\r\n")
    assert "disagree" in bad_head_reason(b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n")
    assert "not valid HTTP" in bad_head_reason(b"GARBAGE\r\n\r\n")


# -- bad keys and flags: exit 2, one paragraph naming the key (or flag, or file), before any work -----------

TRAIN = {"num_epoch": 1, "k_vals": [2], "enc_dec_types": [["coders.mlp.MLPEncoder", "coders.mlp.MLPDecoder"]],
         "datasets": ["digits"], "models": ["base-mlp"], "losses": ["mse"], "device": "cpu", "progress": False}

# (overrides of TRAIN, pieces of the message)
BAD_TRAIN_KEYS = [
    ({"optimizer": {"class": "torch.optim.Adam", "args": {"lr": float("inf")}}}, ["'optimizer'", "'lr' is inf"]),
    ({"optimizer": {"class": "torch.optim.Adam", "args": {"lr": float("-inf")}}}, ["'optimizer'", "'lr' is -inf"]),
    ({"optimizer": {"class": "torch.optim.Adam", "args": {"lr": float("nan")}}}, ["'optimizer'", "nan"]),
    ({"optimizer": {"class": "torch.optim.Adam", "args": {"lr": -1}}}, ["'optimizer'", "learning rate"]),
    ({"optimizer": {"class": "torch.optim.SGD", "args": {"lr": 0.1, "momentum": float("inf")}}},
     ["'optimizer'", "'momentum' is inf"]),
    ({"optimizer": {"class": "torch.optim.Adam", "args": {"lr": 1e-3, "betas": [0.9, float("inf")]}}},
     ["'optimizer'", "'betas'"]),
]


def refused(main, argv: list, capsys) -> str:
    """The one-line message of a command refused with exit 2 (and no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("overrides,needles", BAD_TRAIN_KEYS, ids=[str(i) for i in range(len(BAD_TRAIN_KEYS))])
def test_a_bad_training_key_is_refused_up_front(overrides, needles, tmp_path, capsys):
    from train.cli import main

    path = tmp_path / "c.json"
    path.write_text(json.dumps({**TRAIN, **overrides, "save_dir": str(tmp_path / "save"),
                                "base_model_dir": str(tmp_path / "base")}))  # Infinity and NaN as JSON writes them
    message = refused(main, [str(path)], capsys)
    assert all(n in message for n in needles), message
    assert not (tmp_path / "save").exists() and not (tmp_path / "base").exists()


def test_base_model_fit_names_its_flag(capsys):
    from base_models.fit import main

    message = refused(main, ["--dataset", "digits", "--model", "nope"], capsys)
    assert message.startswith("error: Flag --model: 'nope'") and "Config key" not in message


def test_resume_after_a_domain_file_changed_names_that_file_and_leaves_the_lock_alone(tmp_path, capsys, monkeypatch):
    import datasets.domains
    import util.checkpoint
    from train.cli import main

    rows = tmp_path / "x.npy"
    np.save(rows, np.linspace(-3, 3, 60, dtype=np.float32).reshape(60, 1))
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**TRAIN, "datasets": ["line"], "models": ["base_models.functions.x_sin_x"],
                                "domains": {"line": {"sampler": "file", "path": str(rows), "n_val": 8, "n_test": 8}},
                                "enc_dec_types": [[{"class": "coders.mlp.MLPEncoder", "args": {"hidden": 8}},
                                                   {"class": "coders.mlp.MLPDecoder", "args": {"hidden": 8}}]],
                                "batch_size": 8, "num_threads": 1, "data_dir": str(tmp_path / "no-data"),
                                "save_dir": str(tmp_path / "save"), "base_model_dir": str(tmp_path / "base")}))
    assert main([str(path)]) == 0
    capsys.readouterr()
    np.save(rows, np.linspace(-2, 2, 60, dtype=np.float32).reshape(60, 1))  # the domain file changes
    monkeypatch.setattr(datasets.domains, "_DRAWN", {})  # as in a new process: drawn and hashed afresh
    monkeypatch.setattr(util.checkpoint, "_DATA_DIGESTS", {})
    (lock,) = (tmp_path / "save").rglob(".lock")
    before = (lock.stat().st_mtime_ns, lock.read_bytes())
    message = refused(main, [str(path), "--resume"], capsys)
    assert f"domain 'line''s file is still read from '{rows}', whose content changed" in message, message
    assert "'data_dir'" not in message and "the dataset" not in message
    assert (lock.stat().st_mtime_ns, lock.read_bytes()) == before, "a refused --resume rewrote the lock"


def test_f_giving_nan_is_counted_over_the_whole_split(tmp_path, capsys):
    """F = log(x) on [-1, 3): its non-finite outputs are counted in every batch of the split, not the first."""
    from train.cli import main

    (tmp_path / "hostile_funcs.py").write_text("import torch\n\n\ndef log_of(x):\n    return torch.log(x)\n")
    rows = tmp_path / "x.npy"
    np.save(rows, np.linspace(-1, 3, 400, endpoint=False, dtype=np.float32).reshape(400, 1))  # 100 of them < 0
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**TRAIN, "datasets": ["line"], "models": ["hostile_funcs.log_of"],
                                "domains": {"line": {"sampler": "file", "path": str(rows), "n_val": 40, "n_test": 40}},
                                "eval_batch_size": 16, "save_dir": str(tmp_path / "save"),
                                "base_model_dir": str(tmp_path / "base")}))
    sys.path.insert(0, str(tmp_path))
    try:
        message = refused(main, [str(path)], capsys)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("hostile_funcs", None)
    from datasets.domains import DomainSpec, sample_domain

    x = sample_domain("line", DomainSpec(sampler="file", path=str(rows), n_val=40, n_test=40), seed=0).train_x
    bad = int((x <= 0).sum())  # log of 0 is -inf, of a negative number NaN
    assert bad > 16  # more than one evaluation batch holds them
    assert f"NaN or infinite values on {bad} of the 320 train inputs" in message, (bad, message)


def test_a_failed_download_leaves_no_empty_dataset_folder(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    from datasets.sources import mnist
    from util.errors import UserError

    class Offline:  # what torchvision does without a network: make the raw folder, then fail
        def __init__(self, root, train, download):
            (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd, "MNIST", Offline)
    with pytest.raises(UserError, match="download failed"):
        mnist(str(tmp_path / "data"), True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # a folder that was there stays
    with pytest.raises(UserError):
        mnist(str(tmp_path / "kept"), True)
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and list((tmp_path / "kept").iterdir()) == []


# -- signals while Ray starts: exit 130 / 143, one line that is true, no Ray process of theirs left ----------

# (command, signal, when: "at once" = during the imports; "ray" = once Ray's first process runs (ray.init);
#  "workers" = once a Ray worker process runs (actors starting), expected exit code, the line's start)
SIGNAL_OFFSETS = [
    ("serve.app", signal.SIGTERM, "at once", 143, "terminated (SIGTERM) while python -m serve.app was starting"),
    ("serve.app", signal.SIGTERM, "ray", 143, "stopped by SIGTERM"),
    ("serve.app", signal.SIGINT, "workers", 130, "stopped by Ctrl-C"),
    ("serve", signal.SIGINT, "ray", 130, "interrupted (Ctrl-C): no setting had finished"),
]


def family(pid: int) -> dict:
    """Every live process below ``pid``: {pid: its command line}."""
    from util.signals import descendants

    out = {}
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            out[p] = Path(f"/proc/{p}/cmdline").read_bytes()
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from Linux's /proc")
@pytest.mark.parametrize("command, sig, when, code, line", SIGNAL_OFFSETS,
                         ids=[f"{c}-{s.name}-{w}" for c, s, w, *_ in SIGNAL_OFFSETS])
def test_a_signal_at_any_moment_of_start_up_exits_with_one_line_and_leaves_no_ray(command, sig, when, code, line,
                                                                                 tmp_path, digits_run_folder):
    """One process a moment (each its own test, so the suite's two workers share them out)."""
    pytest.importorskip("ray")
    import socket

    root = Path(__file__).resolve().parents[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"runs": [digits_run_folder], "num_cpus": 1, "instances": 1, "engine": "ray",
                                "strategies": ["none"], "num_queries": 20, "rates": [40], "plot": False,
                                "out_dir": str(tmp_path / "out"), "app": {"strategy": "none", "port": port}}))
    proc = subprocess.Popen([sys.executable, "-m", command, str(path)], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(root)},
                            # Python ignores Ctrl-C when started with SIGINT ignored (as by `cmd &`)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: dict = {}
    try:
        deadline = time.time() + 240
        if when == "at once":
            time.sleep(0.3)
        else:
            wanted = b"ray" if when == "ray" else b"ray::"
            while not any(wanted in c and (when == "ray" or c.startswith(wanted)) for c in seen.values()):
                assert proc.poll() is None and time.time() < deadline, (when, proc.communicate()[1][-2000:])
                seen |= family(proc.pid)
                time.sleep(0.02)
        proc.send_signal(sig)
        while proc.poll() is None and time.time() < deadline:  # what it starts while stopping counts too
            seen |= family(proc.pid)
            time.sleep(0.05)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, (command, when, err[-3000:])
    assert err.strip().startswith(line) and err.strip().count("\n") == 0 and "Traceback" not in err, \
        (command, when, err[-3000:])
    assert when == "at once" or seen, "Ray was never seen starting"
    deadline = time.time() + 30
    while any(alive(p) for p in seen) and time.time() < deadline:
        time.sleep(0.2)
    assert not [seen[p] for p in seen if alive(p)], (command, when, "Ray processes outlived the command")
