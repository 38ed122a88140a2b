"""Learning-rate schedules (train/schedule.py): the rates each step gets, and resume."""
import math

import pytest

from train import schedule
from train.cli import run_all
from train.engine import CodedRun
from util.errors import ConfigError
from tests.test_engine import _numbers, make_run


def test_schedules_run_from_the_configured_rate_to_their_ends():
    assert schedule.cosine(0.0) == 1.0 and schedule.cosine(1.0) == pytest.approx(0.0, abs=1e-12)
    assert schedule.cosine(0.5) == pytest.approx(0.5)
    assert schedule.linear(0.25) == pytest.approx(0.75) and schedule.linear(1.2) == 0.0
    assert [schedule.step(p) for p in (0.0, 0.49, 0.5, 0.74, 0.75, 0.99)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    assert all(schedule.constant(p) == 1.0 for p in (0.0, 0.3, 1.0))
    # the step's place in the whole run: epoch 1 of 4, step 5 of 10
    assert schedule.progress(1, 5, 10, 4) == pytest.approx(1.5 / 4)


def _rates(monkeypatch, path, **overrides):
    """The lr of every training step of a run, as the optimizer saw it."""
    seen = []
    real_step = CodedRun.step

    def step(self, idx, tally):
        seen.append([g["lr"] for g in self.optimizer.param_groups])
        return real_step(self, idx, tally)

    monkeypatch.setattr(CodedRun, "step", step)
    run = make_run(path, **overrides)
    run.fit()
    return run, seen


def test_cosine_sets_every_steps_rate_from_its_place_in_the_run(digits_config, monkeypatch):
    run, seen = _rates(monkeypatch, digits_config(num_epoch=2, lr_schedule="cosine"))
    steps = len(seen) // 2
    assert len(seen) == 2 * steps and steps > 5
    base = 1e-3
    want = [base * 0.5 * (1 + math.cos(math.pi * i / (2 * steps))) for i in range(2 * steps)]
    assert [s[0] for s in seen] == pytest.approx(want, rel=1e-9)
    assert seen[-1][0] < 0.01 * base  # near zero by the last step


def test_the_default_schedule_keeps_the_configured_rate(digits_config, monkeypatch):
    run, seen = _rates(monkeypatch, digits_config(num_epoch=1))
    assert run.cfg.lr_schedule == "constant"
    assert {s[0] for s in seen} == {1e-3}


class _Killed(Exception):
    pass


def test_a_scheduled_run_resumed_after_a_kill_gives_the_same_numbers(digits_config, tmp_path, monkeypatch):
    full = run_all(str(digits_config(num_epoch=3, lr_schedule="step", save_dir=str(tmp_path / "a"))), {})[0]
    path = digits_config(num_epoch=3, lr_schedule="step", save_dir=str(tmp_path / "b"))
    real_finish = CodedRun.finish_epoch

    def finish(self, row, out):
        real_finish(self, row, out)
        if row["epoch"] == 2:
            raise _Killed

    monkeypatch.setattr(CodedRun, "finish_epoch", finish)
    with pytest.raises(_Killed):
        make_run(path).fit()
    monkeypatch.setattr(CodedRun, "finish_epoch", real_finish)
    resumed = make_run(path).fit(resume=True)
    assert len(full) == 4
    assert _numbers(resumed) == _numbers(full)


def test_an_unknown_schedule_is_a_config_error(digits_config):
    with pytest.raises(ConfigError, match="lr_schedule.*'cosine'"):
        make_run(digits_config(lr_schedule="cosin"))
