"""Subnormal floats: runs flush them to zero on the CPU (config key 'flush_denormal'), and F's weights are checked.

The mode is process-wide, so every test here puts it and the thread count back as they were.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from base_models.fit import load_state
from coders.config import expand_runs, load_config
from train.engine import CodedRun
from util.hardware import count_subnormal, denormals_flushed, flush_denormals

BIG = 1 << 22  # elements: large enough for torch to split the op across its thread pool


@pytest.fixture(autouse=True)
def restore_cpu_mode():
    flushed, threads = denormals_flushed(), torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    flush_denormals(flushed)


def subnormal_products() -> torch.Tensor:
    """1e-30 * 1e-10 = 1e-40, a subnormal float32, over many elements (so over every pool thread)."""
    return torch.full((BIG,), 1e-30) * 1e-10


def make_run(digits_config, **overrides) -> CodedRun:
    cfg = load_config(digits_config(num_threads=2, **overrides))
    return CodedRun(cfg, expand_runs(cfg)[0])


def test_a_run_flushes_subnormal_results_to_zero_on_every_cpu_thread(digits_config):
    flush_denormals(False)
    torch.set_num_threads(2)
    assert (subnormal_products() != 0).all()  # the thread pool now exists and computes subnormals
    make_run(digits_config)
    assert (torch.tensor([1e-39]) * 1.0).item() == 0.0
    assert (subnormal_products() == 0).all()  # the pool threads too, not only the calling one


def test_flush_denormal_false_keeps_subnormals_on_every_cpu_thread(digits_config):
    flush_denormals(True)
    torch.set_num_threads(2)
    assert (subnormal_products() == 0).all()
    make_run(digits_config, flush_denormal=False)
    assert (torch.tensor([1e-30]) * 1e-10).item() == pytest.approx(1e-40, rel=1e-3)
    assert (subnormal_products() != 0).all()


def test_count_subnormal_reads_bits_even_while_arithmetic_flushes_them():
    flush_denormals(False)
    w = torch.tensor([1e-39, 0.0, 1.0, -1e-40, 1e-38, 1e-37])  # three subnormal float32 values
    tensors = [w, w.double(), torch.tensor([1e-310], dtype=torch.float64), torch.tensor([1e-6]).half(),
               torch.arange(3)]
    assert count_subnormal(tensors) == 3 + 0 + 1 + 1
    flush_denormals(True)
    assert not (w != 0)[0]  # a comparison no longer sees it ...
    assert count_subnormal([w]) == 3  # ... the bit pattern does


def test_loading_f_reports_its_subnormal_weights_once(tmp_path, capsys):
    flush_denormals(False)
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight[0, :3] = torch.tensor([1e-39, 2e-40, -5e-42])
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    clean = tmp_path / "clean.pt"
    torch.save(nn.Linear(4, 2).state_dict(), clean)

    load_state(nn.Linear(4, 2), path)
    err = capsys.readouterr().err
    assert "3 subnormal values" in err and str(path) in err and "flush_denormal" in err
    load_state(nn.Linear(4, 2), path)  # a sweep loads F once per run: one note is enough
    load_state(nn.Linear(4, 2), clean)
    assert capsys.readouterr().err == ""
