"""benchmarks/overhead.py still runs and its analytic floor and sampling error are right (no timing is asserted)."""
from __future__ import annotations

import argparse
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
    # The width rule keeps max(32, 2 x 64) = 128 of 1000 rows; fewer rows than that are all kept.
    assert overhead.analytic_floor(model, torch.randn(1000, 64), sample_rows=True) == pytest.approx(128 / 3000)
    assert overhead.analytic_floor(model, torch.randn(10, 64), sample_rows=True) == pytest.approx(1 / 3)
    # A layer left out counts neither in the Gram's work nor in the training's.
    assert overhead.analytic_floor(model, torch.randn(10, 64), ignore=("2",)) == pytest.approx(1 / 3)


def test_floor_of_a_convolution(overhead):
    # 3x3 conv, c -> c channels: Gram 2 (b h w) c^2 over training 3 x 2 (b h w) c * 9 c = 1 / 27.
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    assert overhead.analytic_floor(conv, torch.randn(2, 16, 8, 8)) == pytest.approx(1 / 27)


def test_floor_of_a_transformers_conv1d(overhead):
    # Conv1D(nf, nx) is a Linear nx -> nf with a transposed weight: Gram 2 n nf^2 over 3 x 2 n nx nf.
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(48, 16))
    assert overhead.analytic_floor(model, torch.randn(4, 7, 16)) == pytest.approx(48 / (3 * 16))


def test_sample_rows_argument(overhead):
    assert overhead.parse_sample_rows("width") is True
    assert overhead.parse_sample_rows("64") == 64
    for bad in ("1", "all"):
        with pytest.raises(argparse.ArgumentTypeError, match="--sample-rows"):
            overhead.parse_sample_rows(bad)


def test_sampling_error_is_zero_when_every_row_is_kept(overhead):
    # No batch of the LSTM row has more than 32 rows: sampling 64 keeps them all, the statistics are exact.
    errors = overhead.sampling_error("lstm", steps=2, sample_rows=64)
    assert errors == {"saturation": 0.0, "idim": 0.0, "idim_relative": 0.0}


def test_one_quick_run_prints_the_table(overhead, capsys):
    overhead.main(["--models", "lstm", "--repeats", "1", "--steps", "1", "--no-memory"])
    table = capsys.readouterr().out
    columns = ("untracked ms/step", "delve ms/step", "overhead", "floor", "sampled (max(32, 2 d) rows)",
               "sampling error: saturation / idim", "add_saturations s")
    for column in columns:
        assert column in table
    assert "LSTM 256" in table


GPU_CHECK = os.path.join(os.path.dirname(PATH), "gpu_check.py")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_script", GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_check_refuses_without_cuda(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_check_runs_its_checks_on_the_cpu(gpu_check, capsys):
    assert gpu_check.main(["--device", "cpu", "--checks-only"]) == 0
    out = capsys.readouterr().out
    total = out.count("\nok   ") + out.startswith("ok   ") + out.count("FAIL ")
    assert total >= 10 and "FAIL" not in out
    assert f"gpu_check: {total}/{total} numeric checks passed on CPU" in out


def test_gpu_check_reports_a_failing_check(gpu_check, monkeypatch, capsys):
    # A check whose numbers are off (or that raises) is reported by name and fails the run.
    def broken(device):
        raise RuntimeError("on purpose")

    monkeypatch.setattr(gpu_check, "CHECKS", [gpu_check.check_far_from_zero, broken])
    assert gpu_check.main(["--device", "cpu", "--checks-only"]) == 1
    out = capsys.readouterr().out
    assert "FAIL broken: RuntimeError: on purpose" in out
    assert out.strip().endswith("2/3 numeric checks passed on CPU (torch " + torch.__version__ + "); failed: broken")


def test_eigenvalue_timing_agrees_with_float64(overhead):
    # The LSTM row's two covariances: eigenvalues_many with the threshold gives float64's idim.
    timings = overhead.eigenvalue_seconds("lstm", steps=2)
    assert timings["matrices"] == 2 and timings["same_idim"] is True
    assert 0 <= timings["recomputed_float64"] <= 2
