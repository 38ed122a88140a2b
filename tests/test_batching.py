"""Batching in the instances (serve/core/batching.py, serve/cluster/dispatch.py, serve/cluster/runtime.py).

The batcher's rules run in-process on a clock the test moves. On the session's Ray: every strategy (and a few
policies) answers every query exactly once with batches of several requests a call, each answer equal to the
code's own computation offline (F on the query; the decoder on the outputs the policy says were in hand),
batched and unbatched alike; an instance killed while it holds a batch loses no query; a straggler delays the
requests of the call it lands in and no others.
"""
import heapq
import itertools

import numpy as np
import pytest
import torch

from serve.batching import UNBATCHED, Batchers, Batching
from serve.config import PolicyConfig, validate
from serve.plan import build_plan, code_layout, make_queries
from coders.code import load_code


class Clock:
    """A clock the test moves, and the wake-ups the batchers ask for."""

    def __init__(self):
        self.t, self.calls = 0.0, []
        self.wakeups = []
        self.seq = itertools.count()

    def __call__(self):
        return self.t

    def at(self, t, fn):
        heapq.heappush(self.wakeups, (t, next(self.seq), fn))

    def advance(self, t):
        while self.wakeups and self.wakeups[0][0] <= t:
            when, _, fn = heapq.heappop(self.wakeups)
            self.t = when
            fn()
        self.t = t


def batchers(batching, num=1):
    clock = Clock()
    b = Batchers(num, batching, lambda i, tickets: clock.calls.append((clock.t, i, list(tickets))), clock.at, clock)
    return b, clock


# -- the rules, in-process -----------------------------------------------------------------------------

def test_a_lone_request_goes_at_once_when_its_instance_is_free_and_waits_its_maximum_otherwise():
    b, clock = batchers(Batching(size=4, wait_ms=0.0))
    b.add(0, 0, 0.0)
    assert clock.calls == [(0.0, 0, [0])]        # no wait: the instance was free

    b, clock = batchers(Batching(size=4, wait_ms=5.0))
    b.add(0, 0, 0.0)
    clock.advance(0.001)
    b.add(0, 1, 0.001)
    clock.advance(0.0049)
    assert clock.calls == []                     # not before the first request has waited 5 ms
    clock.advance(0.0051)
    assert clock.calls == [(0.005, 0, [0, 1])]   # at 5 ms exactly, with what joined meanwhile


def test_a_full_batch_goes_at_once_and_a_busy_instance_gathers_the_next():
    b, clock = batchers(Batching(size=3, wait_ms=50.0, inflight=1))
    for t in range(3):
        b.add(0, t, 0.0)
    assert clock.calls == [(0.0, 0, [0, 1, 2])]  # full: no wait
    for t in range(3, 5):
        b.add(0, t, 0.001)
    clock.advance(1.0)
    assert len(clock.calls) == 1                 # one call outstanding (inflight 1): the rest wait for it
    b.returned(0, 0.002)
    b.consider(0, 1.0)
    assert clock.calls[1] == (1.0, 0, [3, 4])    # its wait long past: out the moment the instance is free


def test_a_withdrawn_request_never_goes_out():
    b, clock = batchers(Batching(size=2, wait_ms=10.0))
    b.add(0, 0, 0.0)
    assert b.withdraw(0, 0) and not b.withdraw(0, 0)
    b.add(0, 1, 0.001)
    b.add(0, 2, 0.002)
    assert clock.calls == [(0.0, 0, [1, 2])] or clock.calls == [(0.002, 0, [1, 2])]
    assert all(0 not in tickets for *_, tickets in clock.calls)


def test_clear_forgets_a_failed_instances_queue_and_calls_and_sends_afresh():
    b, clock = batchers(Batching(size=4, wait_ms=0.0, inflight=1), num=2)
    for t in range(3):
        b.add(0, t, 0.0)                         # the first goes; two wait for it
    b.add(1, 9, 0.0)
    assert b.clear(0) == [1, 2] and b.queue[1] == [] and b.waiting() == 0
    b.add(0, 3, 0.1)                             # nothing in flight any more: out at once, alone
    assert clock.calls[-1] == (0.0, 0, [3])
    assert [c for c in clock.calls if c[1] == 0] == [(0.0, 0, [0]), (0.0, 0, [3])]


def test_adaptive_batches_grow_while_calls_are_fast_and_shrink_when_slow():
    b, _ = batchers(Batching(size=8, adaptive_ms=10.0))
    assert b.size(0) == 1
    for _ in range(20):
        b.inflight[0] += 1
        b.returned(0, 0.002)
    assert b.size(0) == 8                        # additive increase, capped at batch_size
    b.inflight[0] += 1
    b.returned(0, 0.050)
    assert b.size(0) == 7                        # multiplicative decrease (by 10%)


def test_batching_keys_are_checked_before_any_work():
    from util.errors import ConfigError

    for key, value in (("batch_size", 0), ("batch_wait_ms", -1), ("batch_inflight", 0), ("batch_adaptive_ms", 0)):
        with pytest.raises(ConfigError, match=key):
            validate({"runs": [], key: value}, need_runs=False)


# -- on Ray --------------------------------------------------------------------------------------------

def serve_cfg(tmp_path, run, **overrides):
    raw = {"runs": [run], "num_queries": 16, "instances": 2, "num_cpus": 2, "group_timeout_ms": 10_000,
           "out_dir": str(tmp_path / "out"), "plot": False, **overrides}
    return validate(raw)


@pytest.fixture(scope="module")
def pool(digits_pool, tmp_path_factory, digits_run_folder):
    """The session's four F instances and one parity instance (tests/conftest.py), and a backup instance (a
    seeded linear model) of the digits run started here: the pool the tests below serve on."""
    import copy

    from serve.runtime import Pool

    loaded = load_code(digits_run_folder)
    torch.manual_seed(0)
    backup = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(loaded.splits.input_shape)), 10))
    own = Pool(loaded.code, serve_cfg(tmp_path_factory.mktemp("pool"), digits_run_folder), 0, [], backup.eval(), 1)
    p = copy.copy(digits_pool)  # the session's F and parity instances (a dead one's replacement is the session's)
    p.backup, p.backup_model = own.backup, own.backup_model
    yield p, backup
    own.shutdown()


ROWS = ["none", "equal-resources", "replicate", "coded", "backup", "nworker",
        PolicyConfig("coded", routing="jsq", cancel=True), PolicyConfig("replicate", cancel=True, defer={"ms": 3}),
        PolicyConfig("equal-resources", routing="p2c")]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r if isinstance(r, str) else f"{r.strategy}+{r.routing}")
def test_batched_answers_equal_the_codes_own_computation_for_every_strategy(row, pool, tmp_path, digits_run_folder,
                                                                             nworker_run_folder):
    """A fast stream with instance 0 100 ms slow: calls carry several requests, the decoder (or backup) answers
    the slow instance's queries, and every answer, batched or not, is F's output on the query or the code's
    offline decoding of the outputs the policy had in hand."""
    from serve.runtime import Frontend

    strategy = row if isinstance(row, str) else row.strategy
    run = nworker_run_folder if strategy == "nworker" else digits_run_folder
    actors_pool, backup = pool
    cfg = serve_cfg(tmp_path, run, rates=[400], delays=[{"dist": "constant", "ms": 100, "instances": [0]}])
    loaded = load_code(run)
    code, (x, y) = loaded.code, loaded.splits.split("test")
    k, r, need = code_layout(code)
    queries = make_queries(cfg, 400.0, y.numpy())
    pad = code.base(torch.zeros(1, *x.shape[1:]))[0].detach()
    outs = []
    for batching in (UNBATCHED, Batching(size=8, wait_ms=2.0)):
        plan = build_plan(cfg, row, k, r, queries, cfg.delays[0], 0, need=need)
        frontend = Frontend(plan, actors_pool.actors_for(plan.roles), code, x, pad, batching=batching)
        out = frontend.run()
        assert out.answers.tolist() == [1] * 16
        if batching.size > 1:
            assert frontend.core.calls < frontend.core.sent  # some call carried several requests
        else:
            assert frontend.core.calls == frontend.core.sent
        xs = x[torch.as_tensor(queries.index)]
        with torch.no_grad():
            expected = code.base(xs)
            if strategy in ("coded", "nworker"):
                members = torch.as_tensor(plan.members)
                rebuilt = code(xs[members.clamp(min=0)], torch.as_tensor(frontend.policy.available))
                for g, row_q in enumerate(plan.members):
                    for s, q in enumerate(row_q):
                        if q >= 0 and out.reconstructed[q]:
                            expected[q] = rebuilt[g, s]
            elif strategy == "backup":
                expected[torch.as_tensor(out.reconstructed)] = backup(xs)[torch.as_tensor(out.reconstructed)]
        assert np.allclose(out.outputs, expected.numpy(), atol=1e-5), batching
        assert np.array_equal(out.predicted, expected.argmax(1).numpy())
        outs.append(out)
    assert outs[0].reconstructed.any() or strategy in ("none", "equal-resources", "replicate")


def test_an_instance_killed_while_it_holds_a_batch_loses_no_query(pool, tmp_path, digits_run_folder):
    """Instance 0 is 150 ms slow, so its requests batch up; it is killed 100 ms in, with a call running and more
    waiting: every query is answered exactly once (rebuilt, or sent again), none twice."""
    from serve.runtime import Frontend

    actors_pool, _ = pool
    loaded = load_code(digits_run_folder)
    code, (x, y) = loaded.code, loaded.splits.split("test")
    cfg = serve_cfg(tmp_path, digits_run_folder, num_queries=40, rates=[200], group_timeout_ms=20,
                    delays=[{"dist": "constant", "ms": 150, "instances": [0]}], failures=[{"instance": 0, "at_ms": 100}])
    queries = make_queries(cfg, 200.0, y.numpy())
    pad = code.base(torch.zeros(1, *x.shape[1:]))[0].detach()
    for strategy in ("none", "coded"):
        plan = build_plan(cfg, strategy, 2, 1, queries, cfg.delays[0], 0)
        actors = actors_pool.actors_for(plan.roles)
        frontend = Frontend(plan, actors, code, x, pad, batching=Batching(size=4))
        out = frontend.run()
        actors_pool.replace_dead({actors[i] for i in frontend.dead})  # the pool whole again for the next
        assert out.answers.tolist() == [1] * 40, strategy
        lost = ~out.requests["ok"] & ~out.requests["cancelled"]
        assert lost.sum() >= 2 and set(out.requests["instance"][lost].tolist()) == {0}  # a batch went down with it
        assert (out.retried | out.reconstructed).any()


def test_a_straggler_delays_exactly_the_call_it_lands_in(pool, tmp_path, digits_run_folder):
    """Two instances, batches of two: the call holding the 300 ms straggler answers both its requests late; the
    other instance's call, sent at the same moment, is not delayed."""
    import ray

    from serve.dispatch import Dispatcher, Request
    from serve.runtime import Frontend  # noqa: F401  (the actors' module)

    actors_pool, _ = pool
    loaded = load_code(digits_run_folder)
    code, (x, _) = loaded.code, loaded.splits.split("test")
    clock = Clock()
    answered = {}
    core = Dispatcher("none", [-1, -1], actors_pool.f[:2], code, torch.zeros(10), x.shape[1:], clock,
                      lambda q, out, now, *a: answered.setdefault(q, now), batching=Batching(size=2, wait_ms=1e4),
                      schedule=clock.at)
    delays = {0: 0.3, 1: 0.0, 2: 0.0, 3: 0.0}
    tickets = {core.send(q % 2, x[q].numpy(), delays[q], 1.0, Request("plan", q, -1, 0)): q for q in range(4)}
    assert core.calls == 2  # full batches: [0, 2] on instance 0, [1, 3] on instance 1
    import time

    t0 = time.perf_counter()
    done = {}
    while core.pending:
        ready, _ = ray.wait(list(core.pending), num_returns=1)
        for ticket, req, inst, output, ok, _ in core.collect(ready[0], 0.0):
            assert ok
            done[tickets[ticket]] = time.perf_counter() - t0
    assert min(done[0], done[2]) >= 0.3            # both requests of the straggler's call
    assert max(done[1], done[3]) < min(done[0], done[2])  # the other call was not held back
