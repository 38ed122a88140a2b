"""The serving core's figures and rules, each pinned by a test that a plausible one-line bug turns red.

Small and direct: hand-made outcomes for the summary, plans built for routing,
the simulator on one or two queries with constant service for failures and
slow periods, and the frontend's failure rule without Ray (its bookkeeping is
plain Python). tests/mutants.py plants the bugs these catch.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from serve.config import validate
from serve.plan import ROLE_BACKUP, ROLE_F, Queries, build_plan, pool_roles, reroute, slow_factors
from serve.results import markdown_table, summarize
from serve.sim import simulate


def sim_config(**overrides):
    raw = {"instances": 2, "num_queries": 10, "service": {"dist": "constant", "ms": 100.0}, "engine": "sim", "batch_size": 1,
           "plot": False, **overrides}
    return validate(raw, need_runs=False)


def one_query_at(*times: float) -> Queries:
    n = len(times)
    return Queries(np.asarray(times, dtype=float), np.arange(n), np.zeros(n, dtype=int))


# -- the figures of summary.json and the tables ------------------------------------------------------------

def test_the_summary_is_the_percentiles_and_accuracies_of_the_queries_after_warmup():
    n, warm = 110, 10
    latency_ms = np.concatenate([np.full(warm, 5000.0), np.arange(1, 101)])  # warmup queries are the slowest
    arrival = np.arange(n) * 0.01
    label = np.arange(n) % 10
    predicted = label.copy()
    reconstructed = np.zeros(n, dtype=bool)
    reconstructed[warm::2] = True                  # 50 reconstructed after warmup
    predicted[warm::4] += 1                        # 25 of them wrong
    predicted[warm + 1:warm + 11:2] += 1           # and 5 of the own answers
    predicted[:warm] += 1                          # warmup answers are all wrong: they must not count
    outcome = SimpleNamespace(arrival=arrival, done=arrival + latency_ms / 1000.0, reconstructed=reconstructed,
                              retried=np.zeros(n, dtype=bool), predicted=predicted, label=label, frontend_s={})
    s = summarize(outcome, "coded", 3, warmup=warm)
    kept = np.arange(1, 101, dtype=float)
    assert s["queries"] == 100
    for p in (50, 90, 99, 99.9):
        assert s[f"p{p:g}_ms"] == pytest.approx(np.percentile(kept, p), rel=1e-6)
    assert s["p50_ms"] == pytest.approx(50.5) and s["p99.9_ms"] == pytest.approx(99.901)
    assert s["max_ms"] == pytest.approx(100) and s["mean_ms"] == pytest.approx(50.5)
    assert s["gap_ms"] == pytest.approx(99.901 - 50.5)
    assert s["reconstructed"] == pytest.approx(0.5)
    assert s["accuracy"] == pytest.approx(70 / 100)
    assert s["accuracy_reconstructed"] == pytest.approx(25 / 50)
    table = markdown_table([s]).splitlines()
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert cells[:7] == ["coded", "3", "50.5", f"{np.percentile(kept, 90):.1f}", f"{np.percentile(kept, 99):.1f}",
                         "99.9", "100.0"]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    by_header = dict(zip(header, cells))
    assert [by_header["served top-1 (%)"], by_header["top-1 on reconstructed (%)"]] == ["70.00%", "50.00%"]


# -- routing -----------------------------------------------------------------------------------------------

def test_with_r_of_2_or_more_and_more_instances_than_k_parity_j_reaches_parity_model_j():
    m, k, r = 5, 2, 3
    cfg = sim_config(instances=m, group_timeout_ms=1000.0)
    queries = one_query_at(*np.arange(40) * 0.001)
    plan = build_plan(cfg, "coded", k, r, queries, {"dist": "none"})
    roles = np.asarray(plan.roles)
    parity = plan.query < 0
    assert parity.sum() == r * len(plan.closed)
    assert np.array_equal(roles[plan.instance[parity]], plan.slot[parity] - k)  # slot k + j -> role j
    assert np.array_equal(plan.instance[~parity], plan.query[~parity] % m)
    # Every parity instance of every role is used: group g's parity j on the (g mod ceil(m/k))-th.
    assert set(plan.instance[parity]) == set(range(m, len(roles)))
    # And on Ray, role j's instances are parity model j's actors.
    pool = SimpleNamespace(f=["F0", "F1", "F2", "F3", "F4"], parity=[[f"P{j}.{i}" for i in range(3)] for j in range(r)],
                           backup=[])
    from serve.runtime import Pool

    actors = Pool.actors_for(pool, plan.roles)
    assert actors[:m] == pool.f and actors[m:] == [f"P{j}.{i}" for j in range(r) for i in range(3)]


def test_after_a_fail_stop_requests_go_to_a_live_instance_of_the_same_role():
    roles = [ROLE_F, ROLE_F, ROLE_F, 0, 0, 1, 1]
    failures = {3: 1.0, 0: 2.0, 1: 2.5}
    instance = np.array([3, 3, 4, 5, 0, 0, 0, 1])
    time = np.array([0.5, 1.5, 1.5, 1.5, 1.0, 2.2, 3.0, 3.0])
    moved = reroute(instance, time, roles, failures)
    assert moved.tolist() == [3, 4, 4, 5, 0, 1, 2, 2]
    assert reroute(np.array([3]), np.array([5.0]), roles, {3: 1.0, 4: 1.0}).tolist() == [-1]  # role 0 all gone


# -- failures under replicate and backup, in the simulator ----------------------------------------------------

@pytest.mark.parametrize("strategy", ["replicate", "backup"])
def test_a_query_is_sent_again_only_when_both_copies_are_lost_and_at_the_later_loss(strategy):
    # One query at t = 0; service 100 ms; its copies go to instances 0 and 1 (replicate) or 0 and 2 (backup).
    other = 1 if strategy == "replicate" else 2
    one = sim_config(failures=[{"instance": 0, "at_ms": 50}])
    plan = build_plan(one, strategy, 2, 1, one_query_at(0.0), {"dist": "none"})
    assert sorted(plan.instance.tolist()) == [0, other]
    out = simulate(plan, one)
    assert not out.retried[0] and out.done[0] == pytest.approx(0.1)  # the other copy answers
    both = sim_config(failures=[{"instance": other, "at_ms": 50}, {"instance": 0, "at_ms": 80}])
    out = simulate(build_plan(both, strategy, 2, 1, one_query_at(0.0), {"dist": "none"}), both)
    # Sent again at 80 ms (the copy lost last), to the next live F instance after the one that failed then
    # (sent at the first loss instead, it would be answered at 150 ms).
    assert out.retried[0] and out.done[0] == pytest.approx(0.18)
    retry = np.isclose(out.requests["sent"], 0.08)
    assert retry.sum() == 1 and np.asarray(out.requests["role"])[retry][0] == ROLE_F


def _frontend(strategy: str):
    """The Ray frontend of a two-query plan, with its answering core's sends recorded instead of made."""
    from serve.runtime import Frontend

    cfg = sim_config()
    plan = build_plan(cfg, strategy, 2, 1, one_query_at(0.0, 0.0), {"dist": "none"})
    front = Frontend(plan, [object()] * plan.num_instances, code=SimpleNamespace(k=2, r=1),
                     inputs=torch.zeros(4, 1, 2, 2), pad_output=torch.zeros(3))
    sent = []
    front.core.send = lambda i, x, delay, factor, req: sent.append((i, req)) or f"ref{len(sent)}"
    return plan, front, sent


@pytest.mark.parametrize("strategy", ["replicate", "backup"])
def test_on_ray_a_lost_copy_is_not_sent_again_while_the_other_is_still_coming(strategy):
    from serve.dispatch import Request

    plan, front, sent = _frontend(strategy)
    machine = front.policy  # the Ray frontend's decisions are its policy machine's, as in the simulator
    first, second = [n for n in range(len(plan)) if plan.query[n] == 0]
    machine.due(first, 0.0)
    machine.due(second, 0.0)
    assert [i for i, _ in sent] == [int(plan.instance[first]), int(plan.instance[second])]
    machine.failed(int(plan.instance[first]), 0.05)
    machine.lost(first, 0.05)
    assert len(sent) == 2  # the other copy may still answer
    machine.failed(int(plan.instance[second]), 0.08)
    machine.lost(second, 0.08)
    assert len(sent) == 3 and sent[2][1] == Request("retry", 0, -1, 0) and plan.roles[sent[2][0]] == ROLE_F
    assert sent[2][0] not in (int(plan.instance[first]), int(plan.instance[second]))


# -- slow-down periods --------------------------------------------------------------------------------------

def test_a_fraction_of_periods_is_slow_and_the_factor_stretches_compute_and_delay():
    cfg = sim_config(slowdown={"fraction": 0.3, "factor": 4.0, "period_ms": 10.0})
    instances = np.tile(np.arange(4), 5000)
    times = np.repeat(np.arange(5000) * 0.01 + 0.005, 4)  # one request per period and instance
    factor = slow_factors(cfg, instances, times, 4)
    assert set(np.unique(factor)) == {1.0, 4.0}
    assert np.mean(factor == 4.0) == pytest.approx(0.3, abs=0.02)
    same_period = slow_factors(cfg, instances[:4], times[:4] + 0.004, 4)
    assert np.array_equal(same_period, factor[:4])  # a period is slow for all its requests
    every = sim_config(slowdown={"fraction": 1.0, "factor": 3.0, "period_ms": 1000.0},
                       service={"dist": "constant", "ms": 10.0})
    plan = build_plan(every, "none", 2, 1, one_query_at(0.0), {"dist": "constant", "ms": 5.0})
    out = simulate(plan, every)
    assert out.done[0] == pytest.approx((0.010 + 0.005) * 3.0)


# -- resume digests, channel layout, the dataset cache, the Ray sweep's order ---------------------------------

def _splits(seed=0, **changed):
    g = torch.Generator().manual_seed(seed)
    parts = {f"{s}_{xy}": (torch.rand(6, 1, 2, 2, generator=g) if xy == "x" else torch.arange(6))
             for s in ("train", "val", "test") for xy in ("x", "y")}
    parts.update(changed)
    return SimpleNamespace(**parts)


@pytest.mark.parametrize("changed", ["val_x", "val_y", "test_x", "test_y", "train_x", "train_y"])
def test_resume_refuses_other_images_or_labels_in_any_one_split(changed, tmp_path):
    from util.checkpoint import check_fingerprint, fingerprint
    from util.errors import UserError

    base = torch.nn.Linear(4, 3)
    before = _splits()
    after = _splits(**{changed: getattr(before, changed).flip(0)})
    then = fingerprint(base, before, "f.pt", "data")
    now = fingerprint(base, after, "f.pt", "data")
    assert then["data_digest"] != now["data_digest"]
    with pytest.raises(UserError, match="the dataset is not the one the run started with"):
        check_fingerprint(then, now, tmp_path / "current.pt")


class _ParityPerChannel(torch.nn.Module):
    """(B', k, D) -> (B', r, D): parity j = (j + 1) x input 0 + 10 x input 1, so every place is traceable."""

    def __init__(self, r):
        super().__init__()
        self.r = r

    def forward(self, x):
        return torch.stack([(j + 1) * x[:, 0] + 10 * x[:, 1] for j in range(self.r)], 1)


def test_colour_images_are_encoded_channel_by_channel_with_r_of_two_or_more():
    from coders.code import Code

    b, k, r, c, h, w = 2, 2, 3, 3, 2, 2
    code = Code(torch.nn.Flatten(), _ParityPerChannel(r), torch.nn.Identity(), None, k, r)
    x = torch.randn(b, k, c, h, w)
    parity = code.encode(x)
    assert parity.shape == (b, r, c, h, w)
    for j in range(r):
        assert torch.allclose(parity[:, j], (j + 1) * x[:, 0] + 10 * x[:, 1])  # channel ch from channel ch


def folder_data(root: str, download: bool):
    """A dataset read from a folder: 24 images filled with the number in root/value.txt."""
    v = float(open(f"{root}/value.txt").read())
    x = torch.full((24, 1, 2, 2), v)
    y = torch.arange(24) % 3
    return x, y, x[:6].clone(), y[:6].clone(), 3


def test_the_dataset_cache_reads_each_folder_once_and_each_its_own(tmp_path):
    from datasets import load_dataset

    for name, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "value.txt").write_text(str(value))
    reader = f"{__name__}.folder_data"
    a = load_dataset(reader, str(tmp_path / "a"), val_size=4)
    b = load_dataset(reader, str(tmp_path / "b"), val_size=4)
    assert float(a.train_x.max()) == 1.0 and float(b.train_x.max()) == 2.0 and float(b.test_x.min()) == 2.0


def test_a_ray_sweep_returns_results_in_the_sweeps_run_order():
    from train.ray_sweep import collect

    class FakeRay:
        class exceptions:
            class RayError(Exception):
                pass

        def __init__(self):
            self.finish = ["r3", "r1", "r2"]  # completion order differs from run order

        def wait(self, pending, num_returns, timeout):
            ref = self.finish.pop(0)
            return [ref], [p for p in pending if p != ref]

        def get(self, ref):
            return [] if ref == "drain" else {"status": "done", "rows": [f"rows of {ref}"]}

    monitor = SimpleNamespace(drain=SimpleNamespace(remote=lambda: "drain"))
    refs = {"r1": 1, "r2": 2, "r3": 3}
    got = collect(FakeRay(), monitor, refs, [None] * 3, open("/dev/null", "w"), [])
    assert got == [["rows of r1"], ["rows of r2"], ["rows of r3"]]


def test_backup_roles_and_pool_layout():
    assert pool_roles("backup", 4, 2, 1) == [ROLE_F] * 4 + [ROLE_BACKUP] * 2
    assert pool_roles("coded", 3, 2, 2) == [ROLE_F] * 3 + [0, 0, 1, 1]
