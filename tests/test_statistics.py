"""The statistic registry end to end.

The spectral built-ins through the tracker against numpy float64 on the same
activations and on spectra known by construction; a statistic added with
``register_statistic`` through the tracker, every writer and
``reconstruct_csv_from_npy_data``; bad registrations refused with errors that
name the parameter.
"""
from __future__ import annotations

import io
import math
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import SaturationTracker, register_statistic
from delve.statistics import unregister_statistic
from delve.tools import reconstruct_csv_from_npy_data
from delve.writers.base import parse_stat_name
from delve.writers.npy import load_npy_run
from reference import Capture, population_cov
from test_metrics import NUMPY_SPECTRAL
from test_writers_common import _writer_args, read_event_scalars, read_wandb_run

SPECTRAL_KEYS = ["erank", "rankme", "pr", "srank", "cond", "entropy", "alpha"]
NAMES = {"erank": "effective-rank", "rankme": "rankme", "pr": "participation-ratio", "srank": "stable-rank",
         "cond": "condition-number", "entropy": "matrix-entropy", "alpha": "power-law-alpha"}
ALL_WRITERS = ["csv", "plot", "npy", "tensorboard", "print", "console"]


def hadamard_columns(rows: int, columns: int) -> np.ndarray:
    """``columns`` non-constant columns of a Sylvester Hadamard matrix: zero mean, orthogonal, variance 1."""
    matrix = np.ones((1, 1))
    while matrix.shape[0] < rows:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix[:, 1:columns + 1]


def rows_with_spectrum(variances, rotate: bool = False) -> torch.Tensor:
    """Rows whose population covariance has exactly the eigenvalues ``variances`` (up to float32 rounding)."""
    dim = len(variances)
    rows = hadamard_columns(2 ** math.ceil(math.log2(dim + 1)), dim) * np.sqrt(variances)
    if rotate:
        basis, _ = np.linalg.qr(np.random.default_rng(dim).normal(size=(dim, dim)))
        rows = rows @ basis.T
    return torch.from_numpy(rows).to(torch.float32)


def identity_layer(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
        layer.bias.zero_()
    return layer


# ------------------------------------------------------------ built-ins through the tracker
REL = {"cond": 1e-4, "alpha": 1e-5}


def test_spectral_statistics_match_numpy_on_the_same_activations(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(130, 60), act=nn.Tanh(), fc2=nn.Linear(60, 20)))
    captures = {name: Capture(getattr(model, name)) for name in ("fc1", "fc2")}
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="csv", modules=model, stats=SPECTRAL_KEYS)
    # inputs with a decaying spectrum, none of it near the floor (the references apply none)
    mixing = torch.linalg.qr(torch.randn(130, 130))[0] * torch.arange(1, 131) ** -0.6
    for _ in range(4):
        model(torch.randn(150, 130) @ mixing.T)
    model.eval()
    with torch.no_grad():
        model(torch.randn(200, 130) @ mixing.T)
    results = tracker.add_saturations()
    tracker.close()
    for name, capture in captures.items():
        outputs = torch.cat(capture.outputs).numpy()
        for mode, samples in (("train", outputs[:600]), ("eval", outputs[600:])):
            cov = population_cov(samples)
            eigenvalues = np.linalg.eigvalsh(cov)
            for key in SPECTRAL_KEYS:
                expected = np.linalg.cond(cov) if key == "cond" else NUMPY_SPECTRAL[key](eigenvalues)
                value = results[f"{mode}-{NAMES[key]}_{name}"]
                assert value == pytest.approx(expected, rel=REL.get(key, 1e-6)), (mode, name, key)
    assert 1 < results["train-power-law-alpha_fc1"] < 3
    from_csv = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    for column in from_csv.columns:
        assert from_csv.loc[0, column] == pytest.approx(results[column], rel=1e-12), column


KNOWN = {
    # name: (eigenvalues, rotated, expected values)
    "flat": ([2.0] * 8, False, {"erank": 8, "rankme": 8, "pr": 8, "srank": 8, "cond": 1, "entropy": math.log(8),
                                "alpha": 0.0}),
    "rank-one": ([3.0] + [0.0] * 7, True, {"erank": 1, "rankme": 1, "pr": 1, "srank": 1, "cond": math.inf,
                                            "entropy": 0.0, "alpha": math.nan}),
    "power-law": ([rank ** -1.5 for rank in range(1, 201)], True, {"alpha": 1.5, "cond": 200 ** 1.5}),
}


@pytest.mark.parametrize("spectrum", sorted(KNOWN))
def test_known_spectra_through_the_tracker_and_from_saved_covariances(tmp_path, spectrum):
    variances, rotate, expected = KNOWN[spectrum]
    layer = identity_layer(len(variances))
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="npy", modules=layer, stats=SPECTRAL_KEYS + ["cov"])
    name = next(iter(tracker.layers))
    layer(rows_with_spectrum(variances, rotate))
    results = tracker.add_saturations()
    tracker.close()
    table = reconstruct_csv_from_npy_data(str(tmp_path / "run"), thresh=0.99, stats=SPECTRAL_KEYS)
    for key, value in expected.items():
        column = f"train-{NAMES[key]}_{name}"
        for got in (results[column], table.loc[0, column]):
            if math.isnan(value):
                assert math.isnan(got), key
            else:
                assert got == pytest.approx(value, rel=1e-5, abs=1e-9), key
    for key in SPECTRAL_KEYS:  # the saved covariance gives back the live values
        column = f"train-{NAMES[key]}_{name}"
        assert table.loc[0, column] == pytest.approx(results[column], rel=1e-12, nan_ok=True), key


def test_a_dead_layer_gives_documented_values(tmp_path):
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # ReLU of a constant -1: every output of the ReLU is 0
        model[2].weight.zero_()  # the last layer outputs its bias: no variance at all
    tracker = SaturationTracker(str(tmp_path / "run"), save_to="csv", modules=model, stats=SPECTRAL_KEYS)
    model(torch.randn(32, 4))
    results = tracker.add_saturations()
    tracker.close()
    for key in ("erank", "rankme", "pr", "srank"):
        assert results[f"train-{NAMES[key]}_2"] == 0.0, key
    for key in ("cond", "entropy", "alpha"):
        assert math.isnan(results[f"train-{NAMES[key]}_2"]), key


def test_every_writer_takes_the_spectral_statistics(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12))
    stream = io.StringIO()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to=ALL_WRITERS, modules=model,
                                stats=["lsat"] + SPECTRAL_KEYS, writer_args={"stream": stream})
    for _ in range(3):
        model(torch.randn(64, 10))
    results = tracker.add_saturations()
    tracker.close()
    spectral = {name: value for name, value in results.items() if parse_stat_name(name).stat in SPECTRAL_KEYS}
    assert len(spectral) == 2 * len(SPECTRAL_KEYS)
    from_csv = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    _, npy = load_npy_run(str(tmp_path / "run"))
    tags = read_event_scalars(str(tmp_path / "run"))
    printed = stream.getvalue()
    for name, value in spectral.items():
        assert from_csv.loc[0, name] == pytest.approx(value, rel=1e-12, nan_ok=True), name
        assert float(npy[name][0]) == pytest.approx(value, rel=1e-12, nan_ok=True), name
        head, layer = name.split("_", 1)
        if math.isfinite(value):
            assert tags[f"{head}/{layer}"][0][1] == pytest.approx(value, rel=1e-6), name
        else:  # TensorBoard cannot chart NaN or an infinite condition number
            assert f"{head}/{layer}" not in tags, name
        assert f"{name}: " in printed
        assert f"{name}=" not in printed  # the console's status line holds user scalars only
    for key in SPECTRAL_KEYS:
        assert (tmp_path / "run" / f"run_{key}_epoch_0000.png").is_file(), key


@pytest.mark.parametrize("key", ["wandb", "mlflow"])
def test_experiment_trackers_take_the_spectral_statistics(tmp_path, monkeypatch, key):
    writer_args = _writer_args(key, tmp_path, monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12))
    tracker = SaturationTracker(str(tmp_path / "run"), save_to=key, modules=model, stats=SPECTRAL_KEYS,
                                writer_args=writer_args)
    for _ in range(3):
        model(torch.randn(64, 10))
    results = tracker.add_saturations()
    tracker.close()
    writer = tracker.writer
    if key == "wandb":
        (row,) = [row for row in read_wandb_run(writer.run).rows if "delve/epoch" in row]
        logged = {name: row[f"{NAMES[parse_stat_name(name).stat]}/train/{parse_stat_name(name).layer}"]
                  for name in results}
    else:
        logged = {name: writer.client.get_metric_history(writer.run_id, writer.metric_name(name))[0].value
                  for name in results}
    for name, value in results.items():
        if math.isfinite(value):
            assert logged[name] == pytest.approx(value, rel=1e-6), name
        else:  # W&B keeps NaN and inf as such; MLflow stores inf as the largest float
            assert not math.isfinite(logged[name]) or logged[name] > 1e300, name


# ------------------------------------------------------------ register_statistic end to end
def top_eigenvalue(eigenvalues):
    return eigenvalues[0]


def mean_norm(mean, count):
    return float(torch.linalg.vector_norm(mean)) if count else math.nan


@pytest.fixture
def user_statistics():
    top = register_statistic("top", "top-eigenvalue", top_eigenvalue)
    norm = register_statistic("meannorm", "mean-norm", mean_norm)
    yield top, norm
    unregister_statistic("top")
    unregister_statistic("meannorm")


def test_registered_statistic_reaches_every_writer_and_the_reconstruction(tmp_path, user_statistics):
    top, norm = user_statistics
    assert (top.inputs, norm.inputs) == (("eigenvalues",), ("mean", "count"))
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 9), act=nn.Tanh(), fc2=nn.Linear(9, 4)))
    captures = {name: Capture(getattr(model, name)) for name in ("fc1", "fc2")}
    stream = io.StringIO()
    tracker = SaturationTracker(str(tmp_path / "run"), save_to=ALL_WRITERS, modules=model,
                                stats=["lsat", "top", "meannorm", "cov"], writer_args={"stream": stream})
    for _ in range(3):
        model(torch.randn(50, 6) + 2.0)
    results = tracker.add_saturations()
    tracker.close()

    from_csv = pd.read_csv(tmp_path / "run.csv", sep=";", index_col=0)
    _, npy = load_npy_run(str(tmp_path / "run"))
    tags = read_event_scalars(str(tmp_path / "run"))
    printed = stream.getvalue()
    for layer, capture in captures.items():
        samples = torch.cat(capture.outputs).numpy()
        expected = {"top-eigenvalue": np.linalg.eigvalsh(population_cov(samples)).max(),
                    "mean-norm": np.linalg.norm(samples.mean(axis=0))}
        for stat, value in expected.items():
            name = f"train-{stat}_{layer}"
            assert results[name] == pytest.approx(value, rel=1e-6), name
            assert from_csv.loc[0, name] == pytest.approx(results[name], rel=1e-12)
            assert float(npy[name][0]) == pytest.approx(results[name], rel=1e-12)
            assert tags[f"train-{stat}/{layer}"][0][1] == pytest.approx(results[name], rel=1e-6)
            assert f"{name}: " in printed and f"{name}=" not in printed
            assert parse_stat_name(name).stat in ("top", "meannorm")
    assert (tmp_path / "run" / "run_top_epoch_0000.png").is_file()
    assert (tmp_path / "run" / "run_meannorm_epoch_0000.png").is_file()

    # from the saved covariances: what the covariance determines, nothing else
    table = reconstruct_csv_from_npy_data(str(tmp_path / "run"), thresh=0.9, stats=["top"])
    for layer in captures:
        name = f"train-top-eigenvalue_{layer}"
        assert table.loc[0, name] == pytest.approx(results[name], rel=1e-12)
    with pytest.raises(ValueError, match="needs the mean"):
        reconstruct_csv_from_npy_data(str(tmp_path / "run"), stats=["meannorm"])


def test_unregistered_statistic_is_gone(tmp_path):
    register_statistic("top", "top-eigenvalue", top_eigenvalue)
    unregister_statistic("top")
    with pytest.raises(ValueError, match="'top', which is not a statistic"):
        SaturationTracker(str(tmp_path / "run"), save_to="csv", modules=nn.Linear(2, 2), stats=["top"])
    assert parse_stat_name("train-top-eigenvalue_fc") is None
    with pytest.raises(ValueError, match="built-in"):
        unregister_statistic("erank")


def test_registering_a_key_again_replaces_it(user_statistics):
    entry = register_statistic("top", "largest-eigenvalue", top_eigenvalue)
    assert entry.name == "largest-eigenvalue"
    assert parse_stat_name("train-top-eigenvalue_fc") is None
    assert parse_stat_name("train-largest-eigenvalue_fc").stat == "top"


@pytest.mark.parametrize(
    "key, output_name, function, kwargs, match",
    [
        ("my_stat", "my-stat", top_eigenvalue, {}, "key must be lowercase"),
        ("my-stat", "my-stat", top_eigenvalue, {}, "key must be lowercase"),
        ("Top", "top", top_eigenvalue, {}, "key must be lowercase"),
        ("", "top", top_eigenvalue, {}, "key must be lowercase"),
        (3, "top", top_eigenvalue, {}, "key must be lowercase"),
        ("train", "top", top_eigenvalue, {}, "key must be lowercase"),
        ("top", "top_eigenvalue", top_eigenvalue, {}, "output_name must be"),
        ("top", "", top_eigenvalue, {}, "output_name must be"),
        ("top", "top/eigenvalue", top_eigenvalue, {}, "output_name must be"),
        ("lsat", "my-saturation", top_eigenvalue, {}, "key 'lsat' is a built-in statistic"),
        ("top", "effective-rank", top_eigenvalue, {}, "is the name of statistic 'erank'"),
        ("top", "top-eigenvalue", 3.0, {}, "function must be callable"),
        ("top", "top-eigenvalue", lambda eigenvalues, scale: 0.0, {}, "parameter 'scale'"),
        ("top", "top-eigenvalue", top_eigenvalue, {"array": "yes"}, "array must be"),
        ("top", "top-eigenvalue", top_eigenvalue, {"empty": "none"}, "empty must be"),
    ],
)
def test_bad_registrations_are_refused(key, output_name, function, kwargs, match):
    with pytest.raises(ValueError, match=match):
        register_statistic(key, output_name, function, **kwargs)
    assert parse_stat_name(f"train-{output_name}_fc") is None or output_name == "effective-rank"


def test_taken_user_name_is_refused(user_statistics):
    with pytest.raises(ValueError, match="is the name of statistic 'top'"):
        register_statistic("other", "top-eigenvalue", top_eigenvalue)


def test_parameters_with_defaults_stay_free():
    entry = register_statistic("renyi2", "renyi-entropy-2", lambda eigenvalues, order=2.0: order)
    try:
        assert entry.inputs == ("eigenvalues",)
    finally:
        unregister_statistic("renyi2")
