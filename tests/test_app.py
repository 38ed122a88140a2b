"""The HTTP prediction service (serve/web/app.py, serve/web/online.py) on a real local Ray, through a real HTTP client.

The suite's one local Ray and shared pool of actors (tests/conftest.py) serve the whole module; each test
starts a uvicorn server for its own service config in a thread, on a free
port, and talks to it with httpx. Injected delays are hundreds of
milliseconds, far above Ray's and HTTP's own latency on this machine.
"""
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from serve.app import build_service, create_app  # noqa: E402
from serve.edge import server_config  # noqa: E402
from serve.config import app_config, validate  # noqa: E402
from serve.dispatch import GroupFormer  # noqa: E402
from serve.plan import form_groups, slow_factors  # noqa: E402
from coders.code import load_code  # noqa: E402
from test_hostile import BAD_BATCH_BODIES, BAD_BODIES, MAX_BODY  # noqa: E402  the hostile-input lists
from util.signals import alive, descendants  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_config(tmp_path, run, app=None, **overrides):
    raw = {"runs": [run], "instances": 2, "num_cpus": 2, "rates": [40], "num_queries": 20, "plot": False,
           "out_dir": str(tmp_path / "out"), "app": {"port": free_port(), **(app or {})}, **overrides}
    return validate(raw)


@pytest.fixture(scope="module")
def loaded(digits_run_folder):
    return load_code(digits_run_folder)


@pytest.fixture(scope="module")
def pool(digits_pool):
    """Four F instances and one parity instance: enough for every strategy at m = 2, k = 2, r = 1. The session's
    shared pool (tests/conftest.py: named actors), so a second front end can attach to it."""
    return digits_pool


@contextlib.contextmanager
def serving(cfg, loaded, pool):
    """A uvicorn server for ``cfg``'s service, in a thread: yields (base URL, service)."""
    app = app_config(cfg)
    service = build_service(cfg, app, loaded, pool)
    server = uvicorn.Server(server_config(create_app(service, loaded.splits.name), "127.0.0.1", app.port,
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{app.port}", service
    finally:
        server.should_exit = True
        thread.join(30)
        pool.replace_dead({service.core.actors[i] for i in service.core.dead})


def post_all(url, bodies, gaps_s=None, path="/predict"):
    """POST every body at once (or ``gaps_s`` apart); the responses, in order."""

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(i, body):
                if gaps_s:
                    await asyncio.sleep(i * gaps_s)
                return await client.post(path, content=body, headers={"Content-Type": "application/json"})

            return await asyncio.gather(*[one(i, b) for i, b in enumerate(bodies)])

    return asyncio.run(go())


def as_json(x: torch.Tensor) -> bytes:
    return json.dumps(x.tolist()).encode()


def metric(url, name) -> float:
    text = httpx.get(url + "/metrics").text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"lcc_{name}{{")]
    assert len(values) == 1, (name, text)
    return values[0]


# -- the online group rule is the plan's ----------------------------------------------------------------

def test_groups_formed_one_arrival_at_a_time_match_the_plans():
    rng = np.random.default_rng(0)
    arrival = np.cumsum(rng.exponential(0.01, 300))
    for k, timeout in ((2, 0.015), (3, 0.005), (4, 1.0)):
        former, members, closed = GroupFormer(k, timeout), {}, {}
        for q, t in enumerate(arrival):
            g, slot, done = former.add(q, t)
            for group, m, at in done:
                members[group], closed[group] = m, at
        for group, m, at in filter(None, [former.flush()]):
            members[group], closed[group] = m, at
        want_members, want_closed = form_groups(arrival, k, timeout)
        assert [members[g] for g in range(len(members))] == want_members.tolist()
        assert np.allclose([closed[g] for g in range(len(closed))], want_closed)


def test_slow_periods_online_are_the_plans(tmp_path, digits_run_folder):
    """The service's machine grows its slow-period table as time goes; every factor is the plan's."""
    from serve.config import PolicyConfig
    from serve.policy import PolicyMachine
    from serve.runtime import service_plan

    cfg = service_config(tmp_path, digits_run_folder, slowdown={"fraction": 0.3, "factor": 5, "period_ms": 50})
    times = np.sort(np.random.default_rng(1).uniform(0, 200, 400))  # 4,000 periods: the table grows
    inst = np.arange(400) % 3
    machine = PolicyMachine(service_plan(cfg, PolicyConfig("none", name="none"), 2, 1, [0, 0, 0], {}), None)
    assert [machine.factor_at(int(i), float(t)) for i, t in zip(inst, times)] == \
        slow_factors(cfg, inst, times, 3).tolist()


# -- answers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["none", "equal-resources", "replicate", "coded"])
def test_every_request_is_answered_exactly_once(strategy, tmp_path, digits_run_folder, loaded, pool):
    cfg = service_config(tmp_path, digits_run_folder, {"strategy": strategy},
                         delays=[{"dist": "exponential", "mean_ms": 60, "probability": 0.3}])
    x, _ = loaded.splits.split("test")
    with serving(cfg, loaded, pool) as (url, service):
        responses = post_all(url, [as_json(x[i]) for i in range(16)], gaps_s=0.01)
        assert [r.status_code for r in responses] == [200] * 16
        answers = [r.json() for r in responses]
        assert sorted(a["query"] for a in answers) == list(range(16))  # one answer per query, none twice
        assert metric(url, "queries_answered_total") == 16 and metric(url, "queries_in_flight") == 0
        assert not service.core.open and not service.futures
        with torch.no_grad():
            f_out = loaded.code.base(x[:16])
        for i, a in enumerate(answers):
            assert a["class"] == int(np.argmax(a["output"])) and a["latency_ms"] > 0
            if not a["rebuilt"]:  # an answer of F itself is F's output on that very input
                assert np.allclose(a["output"], f_out[i].numpy(), atol=1e-5)


def test_json_raw_and_npy_bodies_get_the_same_answers(tmp_path, digits_run_folder, loaded, pool):
    """The same eight inputs as JSON, raw float32 and .npy, one a request and as one batch: the same outputs."""
    from serve.loadgen import encode_body

    cfg = service_config(tmp_path, digits_run_folder, {"strategy": "none"})
    x = loaded.splits.split("test")[0][:8].numpy()
    with serving(cfg, loaded, pool) as (url, service), httpx.Client(base_url=url, timeout=60) as client:
        outputs = {}
        for kind in ("json", "raw", "npy"):
            single = [client.post("/predict", content=encode_body(x[i], kind)[0],
                                  headers=encode_body(x[i], kind)[1]) for i in range(8)]
            body, headers = encode_body(x, kind)
            batch = client.post("/predict/batch", content=body, headers=headers)
            assert [r.status_code for r in single] == [200] * 8 and batch.status_code == 200, kind
            outputs[kind] = [r.json()["output"] for r in single] + [a["output"] for a in batch.json()["answers"]]
        with torch.no_grad():
            f_out = loaded.code.base(torch.as_tensor(x)).numpy()
        for kind, got in outputs.items():
            assert np.allclose(got, np.concatenate([f_out, f_out]), atol=1e-5), kind
        assert service.counts["answered"] == 48


def test_a_slow_instances_answers_are_the_decoders_offline_output(tmp_path, digits_run_folder, loaded, pool):
    # Groups fill (long timeout); query q goes to instance q mod 2, and instance 0 is 400 ms slow.
    cfg = service_config(tmp_path, digits_run_folder, {"strategy": "coded"}, group_timeout_ms=10_000,
                         delays=[{"dist": "constant", "ms": 400, "instances": [0]}])
    x, _ = loaded.splits.split("test")
    with serving(cfg, loaded, pool) as (url, _):
        responses = post_all(url, [as_json(x[i]) for i in range(8)], gaps_s=0.02)
    answers = {r.json()["query"]: (i, r.json()) for i, r in enumerate(responses)}
    assert sorted(answers) == list(range(8))
    code = loaded.code
    for g in range(4):
        (i0, a0), (i1, a1) = answers[2 * g], answers[2 * g + 1]
        assert a0["rebuilt"] and not a1["rebuilt"]
        group = torch.stack([x[i0], x[i1]]).unsqueeze(0)
        with torch.no_grad():  # Code.decode on F's output for the fast one and the parity's, offline
            fx = code.base(group[0])
            fp = code.parity_outputs(code.encode(group))[0]
            offline = code.decode(torch.cat([fx, fp]).unsqueeze(0), torch.tensor([[False, True, True]]))[0]
        assert np.allclose(a0["output"], offline[0].numpy(), atol=1e-5)


def test_every_rebuilt_answer_is_the_decoders_output_on_what_was_in_hand(tmp_path, digits_run_folder, loaded, pool):
    """Each rebuilt answer is Code.decode, offline, on its group's members in their slots (blank padding where a
    group closed by its timeout) and the outputs the policy had in hand when it decided. The event loop is held
    busy after each group closes, as a loaded machine holds it, so a group's parity and its slow member's own
    output land in one round: the decoder must still see only what was in hand when the group was decided."""
    cfg = service_config(tmp_path, digits_run_folder, {"strategy": "coded"}, group_timeout_ms=100,
                         delays=[{"dist": "constant", "ms": 400, "instances": [0]}])
    x, _ = loaded.splits.split("test")
    at = [0.0, 0.02, 1.5, 1.52, 3.0]  # two full groups, then query 4 alone: padded at its timeout
    with serving(cfg, loaded, pool) as (url, service):
        close = service._close

        def close_then_busy(g, t):
            # The parities go out in this loop turn's sends (call_soon); the loop is then busy 0.8 s, so the
            # parity's reply and the slow member's own (400 ms) both land meanwhile and are settled in one round.
            close(g, t)
            service.loop.call_soon(time.sleep, 0.8)

        service._close = close_then_busy

        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                async def one(i):
                    await asyncio.sleep(at[i])
                    return await client.post("/predict", content=as_json(x[i]),
                                             headers={"Content-Type": "application/json"})

                return await asyncio.gather(*[one(i) for i in range(len(at))])

        responses = asyncio.run(go())
        d = service.policy
    assert [r.status_code for r in responses] == [200] * len(at)
    answers = [r.json() for r in responses]
    assert [a["query"] for a in answers] == list(range(len(at)))  # arrivals far apart: query i is body i
    rebuilt = [i for i, a in enumerate(answers) if a["rebuilt"]]
    assert rebuilt == [0, 2, 4]  # the members on slow instance 0
    assert d.members[2] == [4, -1]
    code = loaded.code
    for q in rebuilt:
        g = d.group_list[q]
        group = torch.stack([x[m] if m >= 0 else torch.zeros_like(x[0]) for m in d.members[g]])
        with torch.no_grad():
            outputs = torch.cat([code.base(group), code.parity_outputs(code.encode(group.unsqueeze(0)))[0]])
            offline = code.decode(outputs.unsqueeze(0), torch.tensor([d.decoded[g]]))[0]
        assert d.decoded[g] == [False, True, True]  # the parity and the fast member (or the padding) in hand
        assert np.allclose(answers[q]["output"], offline[d.members[g].index(q)].numpy(), atol=1e-5), q


@pytest.mark.parametrize("strategy", ["none", "coded"])
def test_an_instance_killed_while_serving_loses_no_request(strategy, tmp_path, digits_run_folder, loaded, pool):
    # Instance 0 is slow, so requests queue on it; it is killed (on the service's own event loop, as a
    # configured fail-stop is) once three of them are outstanding there: an event, not a moment on a clock.
    cfg = service_config(tmp_path, digits_run_folder, {"strategy": strategy},
                         delays=[{"dist": "constant", "ms": 150, "instances": [0]}])
    x, _ = loaded.splits.split("test")
    with serving(cfg, loaded, pool) as (url, service):
        killed_with = []

        async def kill_when_queued():
            deadline = time.time() + 60
            while service.policy.outstanding[0] < 3:
                assert time.time() < deadline, "requests never queued on instance 0"
                await asyncio.sleep(0.005)
            killed_with.append(service.policy.outstanding[0])
            service.loop.call_soon_threadsafe(service._kill, 0)

        async def go():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                async def one(i):
                    await asyncio.sleep(i * 0.03)
                    return await client.post("/predict", content=as_json(x[i]),
                                             headers={"Content-Type": "application/json"})

                *responses, _ = await asyncio.gather(*[one(i) for i in range(24)], kill_when_queued())
                return responses

        responses = asyncio.run(go())
        assert [r.status_code for r in responses] == [200] * 24
        answers = [r.json() for r in responses]
        assert sorted(a["query"] for a in answers) == list(range(24))
        assert service.core.dead == {0} and killed_with[0] >= 3
        recovered = [a for a in answers if a["retried"] or a["rebuilt"]]
        assert recovered, "no request was in flight on the killed instance"
        assert httpx.get(url + "/health").json()["instances_alive"] == len(service.roles) - 1


# -- bad input and overload -----------------------------------------------------------------------------

def test_bad_bodies_get_a_4xx_with_a_reason_and_reach_no_instance(tmp_path, digits_run_folder, loaded, pool):
    cfg = service_config(tmp_path, digits_run_folder, {"strategy": "none", "max_body_bytes": MAX_BODY})
    with serving(cfg, loaded, pool) as (url, service), logged() as records:
        with httpx.Client(base_url=url) as client:
            for body, kind, status, reason, absent in BAD_BODIES:
                r = client.post("/predict", content=body, headers={"Content-Type": kind})
                assert r.status_code == status, (body[:40], r.text)
                detail = r.json()["detail"]
                assert reason in detail and "\n" not in detail and (absent is None or absent not in detail)
                assert client.get("/health").status_code == 200
            for body, status, reason in BAD_BATCH_BODIES:
                r = client.post("/predict/batch", content=body, headers={"Content-Type": "application/json"})
                assert r.status_code == status and reason in r.json()["detail"], r.text
                assert client.get("/health").status_code == 200
            assert service.core.sent == 0 and metric(url, "instance_requests_total") == 0
            ok = client.post("/predict/batch", json={"inputs": [[0.5] * 64, [[[0.25] * 8] * 8]]})
            assert ok.status_code == 200 and len(ok.json()["answers"]) == 2
            assert metric(url, "http_server_errors_total") == 0
    assert not [r for r in records if r.exc_info], "a refusal left a traceback in the log"


@contextlib.contextmanager
def logged():
    """The log records (warnings and above) of uvicorn and the service while the block runs."""
    records, handler = [], logging.Handler(logging.WARNING)
    handler.emit = lambda record: record in records or records.append(record)  # once, whichever logger has it
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def raw_http(port: int, data: bytes, hang_up: bool = False) -> bytes:
    """Send ``data`` on a bare connection; what the server answers before it closes (nothing if ``hang_up``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        if hang_up:
            return b""
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def responses_of(url, path, code) -> float:
    text = httpx.get(url + "/metrics").text
    line = f'lcc_http_responses_total{{path="{path}",code="{code}"}} '
    return sum(float(x[len(line):]) for x in text.splitlines() if x.startswith(line))


def test_a_bad_head_or_a_client_hanging_up_leaves_the_service_healthy_and_no_traceback(tmp_path, digits_run_folder,
                                                                                         loaded, pool):
    cfg = service_config(tmp_path, digits_run_folder, {"strategy": "none"})
    port = app_config(cfg).port
    with serving(cfg, loaded, pool) as (url, service), logged() as records:
        for length, reason in (("abc", "Content-Length 'abc' is not a number of bytes"),
                               ("-5", "Content-Length '-5' is not a number of bytes")):
            out = raw_http(port, f"POST /predict HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                                 f"Content-Length: {length}\r\n\r\n[0.5]".encode())
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower(), out
            assert json.loads(body) == {"detail": reason}
            assert httpx.get(url + "/health").status_code == 200
        raw_http(port, b"POST /predict HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 600\r\n\r\n[0.5, 0.5, 0.5", hang_up=True)
        deadline = time.time() + 30
        while responses_of(url, "/predict", 400) < 1:  # the hang-up is answered (to no one) and counted
            assert time.time() < deadline, httpx.get(url + "/metrics").text
            time.sleep(0.05)
        x, _ = loaded.splits.split("test")
        assert post_all(url, [as_json(x[0])])[0].status_code == 200
        assert metric(url, "http_server_errors_total") == 0 and service.core.sent == 1
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]


def test_a_failure_of_the_service_is_a_json_500_counted_in_the_metrics(tmp_path, digits_run_folder, loaded, pool,
                                                                       monkeypatch):
    cfg = service_config(tmp_path, digits_run_folder, {"strategy": "none"})
    with serving(cfg, loaded, pool) as (url, service), logged() as records:
        monkeypatch.setattr(service, "predict", lambda inputs: 1 / 0)  # a bug planted in the service
        r = httpx.post(url + "/predict", json=[0.5] * 64)
        assert r.status_code == 500 and "ZeroDivisionError" in r.json()["detail"]
        assert metric(url, "http_server_errors_total") == 1 and responses_of(url, "/predict", 500) == 1
        monkeypatch.undo()
        assert httpx.post(url + "/predict", json=[0.5] * 64).status_code == 200
        assert metric(url, "http_server_errors_total") == 1
    assert [r.exc_info[0] for r in records if r.exc_info] == [ZeroDivisionError]  # logged once, with its traceback


def test_beyond_the_queue_bound_requests_get_503_with_retry_after(tmp_path, digits_run_folder, loaded, pool):
    cfg = service_config(tmp_path, digits_run_folder, {"strategy": "none", "max_queue": 2, "retry_after_s": 3},
                         delays=[{"dist": "constant", "ms": 500}])
    x, _ = loaded.splits.split("test")
    with serving(cfg, loaded, pool) as (url, service):
        responses = post_all(url, [as_json(x[i]) for i in range(6)])
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 503, 503, 503, 503]
        for r in responses:
            if r.status_code == 503:
                assert r.headers["Retry-After"] == "3" and "max_queue" in r.json()["detail"]
        assert metric(url, "queries_rejected_total") == 4 and service.core.sent == 2
        assert post_all(url, [as_json(x[0])])[0].status_code == 200  # the queue has drained


# -- the command line ---------------------------------------------------------------------------------

def test_a_bad_app_section_exits_2_naming_the_key(tmp_path, digits_run_folder, capsys):
    from serve.app import main

    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"runs": [digits_run_folder], "app": {"strategy": "raid"}}))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "'app.strategy'" in err and "Traceback" not in err
    path.write_text(json.dumps({"runs": [digits_run_folder], "app": {"max_qeue": 3}}))
    assert main([str(path)]) == 2
    assert "max_queue" in capsys.readouterr().err
    path.write_text(json.dumps({"runs": [digits_run_folder], "app": {"pool_name": "a:b"}}))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "'app.pool_name'" in err and "Fix:" in err


def test_the_load_generator_writes_what_the_benchmark_writes(tmp_path, digits_run_folder, loaded, pool):
    from serve.loadgen import run
    from serve.results import report

    cfg = service_config(tmp_path, digits_run_folder, {"strategy": "coded"}, rates=[60], num_queries=30)
    with serving(cfg, loaded, pool) as (url, _):
        summaries = run(cfg, url, tmp_path / "http", 16, 30.0, stream=open(os.devnull, "w"))
    folder = tmp_path / "http" / "setting00" / "coded"
    rows = (folder / "queries.csv").read_text().splitlines()
    assert len(rows) == 31 and rows[0].startswith("query,image,arrival_s")
    summary = json.loads((folder / "summary.json").read_text())
    # equal as written: a figure with nothing to count is NaN (no query rebuilt), and NaN != NaN as a float
    assert json.dumps(summary, sort_keys=True) == json.dumps(summaries[0], sort_keys=True)
    assert summary["queries"] == 30 and summary["failed"] == 0
    assert 0 <= summary["http_p50_ms"] <= summary["http_p99_ms"] < summary["p99_ms"] + 1
    assert summary["accuracy"] > 0.5  # the served answers are the right classes
    assert "| coded |" in report(tmp_path / "http")


def test_two_front_ends_share_one_pool_of_named_instances(tmp_path, digits_run_folder, loaded, pool, local_ray):
    import copy

    from serve.loadgen import run
    from serve.runtime import Pool
    from util.errors import UserError

    cfgs = [service_config(tmp_path, digits_run_folder, {"strategy": "coded", "pool_name": pool.name}, rates=[80],
                           num_queries=20) for _ in range(2)]
    second = Pool(loaded.code, cfgs[1], 2, [1], name=pool.name)  # a second front end attaches to the shared pool
    ids = [[a._actor_id.hex() for a in p.f[:2] + p.parity[0]] for p in (pool, second)]
    assert ids[0] == ids[1] and second.started == [] and second.attached == 3
    with serving(cfgs[0], loaded, pool) as (url0, one), serving(cfgs[1], loaded, second) as (url1, two):
        summary, = run(cfgs[0], [url0, url1], tmp_path / "http", 8, 30.0, stream=open(os.devnull, "w"))
        assert summary["failed"] == 0 and summary["sent"] == 20 and summary["accuracy"] > 0.5
        assert one.counts["answered"] == two.counts["answered"] == 10  # the client's queries took turns
        assert one.core.sent > 0 and two.core.sent > 0
    second.shutdown()  # stops nothing: the first front end started every instance
    assert len(local_ray.get([a.ready.remote() for a in pool.f[:2] + pool.parity[0]], timeout=60)) == 3
    other = copy.deepcopy(loaded.code)
    with torch.no_grad():
        next(other.base.parameters()).add_(1.0)
    with pytest.raises(UserError, match="'app.pool_name'.*another code"):
        Pool(other, cfgs[1], 2, [1], name=pool.name)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from Linux's /proc")
def test_ctrl_c_stops_the_service_and_its_ray_exit_130(tmp_path, digits_run_folder):
    cfg = {"runs": [digits_run_folder], "num_cpus": 1, "instances": 1, "app": {"strategy": "none", "port": free_port()}}
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "serve.app", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{cfg['app']['port']}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        time.sleep(0.2)
    started = descendants(proc.pid)  # Ray's processes and the actors
    assert started
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().count("\n") == 0 and "Ctrl-C" in err and "Traceback" not in err
    deadline = time.time() + 20
    while any(alive(p) for p in started) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in started if alive(p)]
