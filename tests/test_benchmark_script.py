"""benchmarks/overhead.py still runs and its analytic floor is right (no timing is asserted)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "overhead.py")


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("overhead_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_floor_of_square_linear_layers_is_one_third(overhead):
    # X^T X of a d-wide output: 2 n d^2; training a d -> d Linear: 3 x 2 n d^2.
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    assert overhead.analytic_floor(model, torch.randn(10, 64)) == pytest.approx(1 / 3)
    # Sampling 4 of 10 rows per batch leaves 4/10 of the Gram's work.
    assert overhead.analytic_floor(model, torch.randn(10, 64), sample_rows=4) == pytest.approx(4 / 30)


def test_floor_of_a_convolution(overhead):
    # 3x3 conv, c -> c channels: Gram 2 (b h w) c^2 over training 3 x 2 (b h w) c * 9 c = 1 / 27.
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    assert overhead.analytic_floor(conv, torch.randn(2, 16, 8, 8)) == pytest.approx(1 / 27)


def test_one_quick_run_prints_the_table(overhead, capsys):
    overhead.main(["--models", "lstm", "--repeats", "1", "--steps", "1", "--no-memory"])
    table = capsys.readouterr().out
    for column in ("untracked ms/step", "delve ms/step", "overhead", "floor", "sampled 32 rows", "add_saturations s"):
        assert column in table
    assert "LSTM 256" in table
