"""benchmarks/advice.py: its quick mode runs, its data have the properties the docs claim, advice is applied right."""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "advice.py")


@pytest.fixture(scope="module")
def advice():
    spec = importlib.util.spec_from_file_location("advice_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_quick_run_prints_one_row_per_case_and_warning(advice, capsys):
    rows = advice.main(["--quick"])
    table = capsys.readouterr().out
    for column in ("case", "accuracy %", "finding", "advice followed", "after %", "change (pts)", "verdict"):
        assert column in table
    assert {row.case for row in rows} == set(advice.CASES)
    for row in rows:
        assert 0 <= row.accuracy <= 100 and row.case in table
        if row.finding.startswith("warn"):  # followed and retrained, unless the case cannot follow it
            assert row.change is not None or "not applicable" in row.advice
            assert row.verdict in ("holds", "bug of the rule", "")
        else:
            assert row.change is None and row.verdict == ""


def test_the_verdict_follows_the_tolerance(advice):
    assert advice.TOLERANCE == 0.5
    assert advice.Row("c", 90.0, "warn", change=-0.6, spread=0.1).verdict == "bug of the rule"
    assert advice.Row("c", 90.0, "warn", change=-0.4, spread=0.1).verdict == "holds"
    assert advice.Row("c", 90.0, "no warn").verdict == ""


def test_suggestions_change_the_model_they_name(advice):
    mlp, conv = advice.CASES["mlp"], advice.CASES["deepcnn-8px"]
    narrowed = advice.apply_suggestion(mlp, mlp.spec, {"action": "narrow", "widths": {"hidden-fc1": 64}})
    model = mlp.build(narrowed)
    assert model.hidden["fc1"].out_features == 64 and model.hidden["fc2"].in_features == 64
    assert mlp.spec["widths"]["fc1"] == 512  # the case itself is left alone
    raised = advice.apply_suggestion(conv, conv.spec, {"action": "raise-resolution", "input_size": 48})
    assert raised["resolution"] == 48 and conv.input_size(raised) == (1, 48, 48)
    assert advice.apply_suggestion(mlp, mlp.spec, {"action": "raise-resolution", "input_size": 48}) is None
    assert advice.apply_suggestion(mlp, mlp.spec, {"action": "narrow", "widths": {"missing": 8}}) is None
    assert advice.apply_suggestion(mlp, mlp.spec, None) is None
    transformer = advice.CASES["transformer"]
    narrowed = advice.apply_suggestion(transformer, transformer.spec,
                                       {"action": "narrow", "widths": {"layers-1-linear1": 64}})
    assert [layer.linear1.out_features for layer in transformer.build(narrowed).layers] == [256, 64]


def test_data_have_the_properties_the_suite_relies_on(advice):
    train, test = advice.subspace_data()
    inputs = train.dataset.tensors[0].double().numpy()
    assert inputs.shape == (4000, 32) and np.linalg.matrix_rank(inputs, tol=1e-4) == 8  # intrinsic dimensionality 8
    assert len(test.dataset) == 2000 and len(torch.unique(train.dataset.tensors[1])) == 10
    tokens, labels = advice.follower_sequences()[0].dataset.tensors
    for sequence, label in zip(tokens[:50], labels[:50]):
        marker = int((sequence[1:] == 0).nonzero()[0, 0]) + 1  # after the class token
        assert sequence[0] == 8 and sequence[marker + 1] == label
    images = advice.digits(32)[0].dataset.tensors[0]
    assert images.shape[1:] == (1, 32, 32) and len(advice.digits(8)[1].dataset) == 397
