"""Property-based checks: over shapes, dtypes, methods and thresholds, the tracker equals numpy."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from delve import SaturationTracker
from reference import Capture, idim, population_cov

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _compare(results, name, samples, thresh):
    cov = population_cov(samples)
    assert results[f"train-intrinsic-dimensionality_{name}"] == idim(cov, thresh)
    assert results[f"train-covariance-trace_{name}"] == pytest.approx(np.trace(cov), rel=1e-4, abs=1e-12)


def _conv_samples(outputs: np.ndarray, method: str) -> np.ndarray:
    batch, channels = outputs.shape[:2]
    positions = outputs.reshape(batch, channels, -1)
    if method == "channelwise":
        return np.moveaxis(outputs, 1, -1).reshape(-1, channels)
    if method == "mean":
        return positions.mean(axis=2)
    if method == "max":
        return positions.max(axis=2)
    if method == "median":
        return np.sort(positions, axis=2)[:, :, (positions.shape[2] - 1) // 2]
    return outputs.reshape(batch, -1)


@SETTINGS
@given(
    batches=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    in_features=st.integers(1, 6),
    out_features=st.integers(1, 6),
    dtype=st.sampled_from(sorted(DTYPES)),
    thresh=st.sampled_from([0.5, 0.9, 0.99, 0.999, 1.0]),
    tokens=st.sampled_from([None, 1, 3]),
)
def test_linear_matches_numpy(tmp_path_factory, batches, in_features, out_features, dtype, thresh, tokens):
    torch.manual_seed(len(batches) * 31 + in_features)
    layer = nn.Linear(in_features, out_features).to(DTYPES[dtype])
    capture = Capture(layer)
    tracker = SaturationTracker(
        str(tmp_path_factory.mktemp("run") / "run"), "csv", layer, stats=["idim", "trc"], sat_threshold=thresh,
        nosave=True,
    )
    for size in batches:
        shape = (size, in_features) if tokens is None else (size, tokens, in_features)
        layer(torch.randn(shape).to(DTYPES[dtype]))
    results = tracker.add_saturations()
    samples = torch.cat([o.reshape(-1, out_features) for o in capture.outputs]).numpy()
    _compare(results, "Module-0-Linear", samples, thresh)
    tracker.close()


@SETTINGS
@given(
    batch=st.integers(1, 4),
    channels=st.integers(1, 5),
    size=st.integers(3, 6),
    method=st.sampled_from(["channelwise", "mean", "max", "median", "flatten"]),
    dims=st.sampled_from([1, 2, 3]),
    transposed=st.booleans(),
    channels_last=st.booleans(),
    thresh=st.sampled_from([0.9, 0.99]),
)
def test_convolutions_match_numpy(tmp_path_factory, batch, channels, size, method, dims, transposed, channels_last, thresh):
    torch.manual_seed(batch * 7 + channels)
    kind = {(1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
            (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d}[(dims, transposed)]
    layer = kind(2, channels, 2)
    capture = Capture(layer)
    tracker = SaturationTracker(
        str(tmp_path_factory.mktemp("run") / "run"), "csv", layer, stats=["idim", "trc"], conv_method=method,
        sat_threshold=thresh, nosave=True,
    )
    for _ in range(2):
        x = torch.randn((batch, 2) + (size,) * dims)
        if channels_last and dims == 2:
            x = x.to(memory_format=torch.channels_last)
        layer(x)
    results = tracker.add_saturations()
    outputs = torch.cat(capture.outputs).numpy()
    _compare(results, f"Module-0-{kind.__name__}", _conv_samples(outputs, method), thresh)
    tracker.close()


@SETTINGS
@given(
    kind=st.sampled_from([nn.LSTM, nn.GRU, nn.RNN]),
    batch_first=st.booleans(),
    bidirectional=st.booleans(),
    batch=st.integers(1, 5),
    steps=st.integers(1, 6),
    method=st.sampled_from(["last_timestep", "timestepwise"]),
    thresh=st.sampled_from([0.9, 0.99]),
)
def test_recurrent_layers_match_numpy(tmp_path_factory, kind, batch_first, bidirectional, batch, steps, method, thresh):
    torch.manual_seed(batch * 5 + steps)
    layer = kind(3, 4, batch_first=batch_first, bidirectional=bidirectional)
    capture = Capture(layer)
    tracker = SaturationTracker(
        str(tmp_path_factory.mktemp("run") / "run"), "csv", layer, stats=["idim", "trc"], timeseries_method=method,
        sat_threshold=thresh, nosave=True,
    )
    for _ in range(2):
        x = torch.randn(batch, steps, 3)
        layer(x if batch_first else x.transpose(0, 1))
    results = tracker.add_saturations()
    outputs = np.concatenate([(o if batch_first else o.transpose(0, 1)).numpy() for o in capture.outputs])
    samples = outputs[:, -1, :] if method == "last_timestep" else outputs.reshape(-1, outputs.shape[-1])
    _compare(results, f"Module-0-{kind.__name__}", samples, thresh)
    tracker.close()
