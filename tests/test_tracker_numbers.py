"""The tracker's statistics equal numpy float64 computations over the same activations."""
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve import SaturationTracker
from reference import Capture, idim, population_cov

ALL_SCALAR_STATS = ["lsat", "idim", "trc", "det", "dtrc"]


def _tracker(tmp_path, model, **kwargs):
    kwargs.setdefault("save_to", "csv")
    return SaturationTracker(str(tmp_path / "run"), modules=model, **kwargs)


def _check_layer(results, mode, name, samples, thresh=0.99, rel=1e-5):
    """Compare every scalar statistic with numpy float64 on the same samples.

    The determinant is compared where it is well defined numerically (condition
    number below 100); float32 activations carry about 7 significant digits,
    so the determinant of an ill-conditioned covariance is round-off noise.
    """
    cov = population_cov(samples)
    k = idim(cov, thresh)
    assert results[f"{mode}-intrinsic-dimensionality_{name}"] == k
    assert results[f"{mode}-saturation_{name}"] == pytest.approx(k / cov.shape[0])
    assert results[f"{mode}-covariance-trace_{name}"] == pytest.approx(np.trace(cov), rel=rel)
    if np.linalg.cond(cov) < 100:
        assert results[f"{mode}-covariance-determinant_{name}"] == pytest.approx(np.linalg.det(cov), rel=rel)
    assert results[f"{mode}-diagonal-trace_{name}"] == pytest.approx(np.linalg.eigvalsh(cov).clip(0).sum(), rel=rel)


def test_linear_statistics_cover_the_whole_epoch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 12), act=nn.Tanh(), fc2=nn.Linear(12, 5)))
    captures = {name: Capture(getattr(model, name)) for name in ("fc1", "fc2")}
    tracker = _tracker(tmp_path, model, stats=ALL_SCALAR_STATS)
    for _ in range(7):
        model(torch.randn(4, 6))
    results = tracker.add_saturations()
    for name, capture in captures.items():
        samples = torch.cat(capture.outputs).numpy()
        assert samples.shape[0] == 28
        _check_layer(results, "train", name, samples)
    # 4 samples per batch: a last-batch covariance (delve 0.1.50) could not exceed rank 3.
    assert results["train-intrinsic-dimensionality_fc1"] > 4
    tracker.close()


def test_known_subspace_dimension_is_recovered(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(16))
    basis, _ = torch.linalg.qr(torch.randn(16, 16))
    tracker = _tracker(tmp_path, layer, stats=["idim", "lsat"])
    for _ in range(10):
        coefficients = torch.randn(32, 5) * torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
        layer(coefficients @ basis[:, :5].T)
    results = tracker.add_saturations()
    assert results["train-intrinsic-dimensionality_Module-0-Linear"] == 5
    assert results["train-saturation_Module-0-Linear"] == pytest.approx(5 / 16)
    tracker.close()


def test_large_mean_small_spread_keeps_precision(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4))
        layer.bias.fill_(1e4)
    capture = Capture(layer)
    tracker = _tracker(tmp_path, layer, stats=ALL_SCALAR_STATS)
    for _ in range(20):
        layer(0.01 * torch.randn(64, 4) @ torch.tensor([[1.0, 0, 0, 0], [0.5, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0.2, 1]]))
    results = tracker.add_saturations()
    samples = torch.cat(capture.outputs).numpy()
    assert samples.mean() == pytest.approx(1e4, rel=1e-3)
    _check_layer(results, "train", "Module-0-Linear", samples)
    tracker.close()


def test_bfloat16_autocast_matches_numpy_on_the_same_activations(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    captures = [Capture(model[0]), Capture(model[2])]
    tracker = _tracker(tmp_path, model, stats=ALL_SCALAR_STATS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(5):
            out = model(torch.randn(32, 8))
    assert out.dtype == torch.bfloat16
    results = tracker.add_saturations()
    for name, capture in zip(("0", "2"), captures):
        _check_layer(results, "train", name, torch.cat(capture.outputs).numpy())
    tracker.close()


@pytest.mark.parametrize("method", ["channelwise", "mean", "max", "median", "flatten"])
def test_conv2d_methods_match_numpy(tmp_path, method):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    capture = Capture(conv)
    tracker = _tracker(tmp_path, nn.Sequential(conv), stats=ALL_SCALAR_STATS, conv_method=method)
    for _ in range(3):
        conv(torch.randn(8, 3, 4, 4))
    results = tracker.add_saturations()
    outputs = torch.cat(capture.outputs).numpy()  # (24, 5, 4, 4)
    if method == "channelwise":
        samples = outputs.transpose(0, 2, 3, 1).reshape(-1, 5)
    elif method == "mean":
        samples = outputs.mean(axis=(2, 3))
    elif method == "max":
        samples = outputs.max(axis=(2, 3))
    elif method == "median":
        # torch's median of an even count is the lower of the two middle values
        samples = np.sort(outputs.reshape(24, 5, 16), axis=2)[:, :, 7]
    else:
        samples = outputs.reshape(24, -1)
    cov = population_cov(samples)
    assert results["train-intrinsic-dimensionality_0"] == idim(cov, 0.99)
    assert results["train-covariance-trace_0"] == pytest.approx(np.trace(cov), rel=1e-5)
    if method != "flatten":
        assert results["train-covariance-determinant_0"] == pytest.approx(np.linalg.det(cov), rel=1e-5)
    tracker.close()


@pytest.mark.parametrize(
    "layer, batch",
    [
        (nn.Conv1d(3, 4, 3), (6, 3, 10)),
        (nn.Conv3d(2, 4, 3), (3, 2, 5, 5, 5)),
        (nn.ConvTranspose1d(3, 4, 3, stride=2), (6, 3, 5)),
        (nn.ConvTranspose2d(3, 4, 3, stride=2), (5, 3, 4, 4)),
        (nn.ConvTranspose3d(2, 3, 2), (3, 2, 3, 3, 3)),
    ],
)
def test_every_convolution_is_channelwise_by_default(tmp_path, layer, batch):
    torch.manual_seed(0)
    capture = Capture(layer)
    tracker = _tracker(tmp_path, layer, stats=ALL_SCALAR_STATS)
    layer(torch.randn(batch))
    layer(torch.randn(batch))
    results = tracker.add_saturations()
    outputs = torch.cat(capture.outputs).numpy()
    samples = np.moveaxis(outputs, 1, -1).reshape(-1, outputs.shape[1])
    _check_layer(results, "train", f"Module-0-{type(layer).__name__}", samples)
    tracker.close()


def test_linear_on_tokens_makes_every_token_a_sample(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(6, 6)
    capture = Capture(layer)
    tracker = _tracker(tmp_path, layer, stats=ALL_SCALAR_STATS)
    layer(torch.randn(4, 7, 6))
    results = tracker.add_saturations()
    samples = capture.outputs[0].reshape(-1, 6).numpy()
    assert samples.shape == (28, 6)
    _check_layer(results, "train", "Module-0-Linear", samples)
    tracker.close()


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", ["last_timestep", "timestepwise"])
def test_recurrent_layers_honour_batch_first(tmp_path, cell, batch_first, method):
    torch.manual_seed(0)
    rnn = cell(3, 5, batch_first=batch_first)
    capture = Capture(rnn)
    tracker = _tracker(tmp_path, rnn, stats=ALL_SCALAR_STATS, timeseries_method=method)
    sequences = [torch.randn(9, 6, 3) for _ in range(3)]  # (batch, time, features)
    for seq in sequences:
        rnn(seq if batch_first else seq.transpose(0, 1))
    results = tracker.add_saturations()
    outputs = [out if batch_first else out.transpose(0, 1) for out in capture.outputs]
    stacked = torch.cat(outputs).numpy()  # (27, 6, 5) batch-major
    samples = stacked[:, -1, :] if method == "last_timestep" else stacked.reshape(-1, 5)
    _check_layer(results, "train", f"Module-0-{cell.__name__}", samples)
    tracker.close()


def test_packed_sequences_use_each_sequence_last_valid_step(tmp_path):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    tracker = _tracker(tmp_path, lstm, stats=["trc", "idim"])
    padded = torch.randn(5, 6, 3)
    lengths = torch.tensor([6, 5, 3, 3, 1])
    packed = nn.utils.rnn.pack_padded_sequence(padded, lengths, batch_first=True)
    out, _ = lstm(packed)
    results = tracker.add_saturations()
    unpacked, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
    samples = np.stack([unpacked[i, lengths[i] - 1].detach().numpy() for i in range(5)])
    cov = population_cov(samples)
    assert results["train-covariance-trace_Module-0-LSTM"] == pytest.approx(np.trace(cov), rel=1e-5)
    tracker.close()


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_output_tokens_are_samples(tmp_path, batch_first):
    torch.manual_seed(0)
    model = nn.ModuleDict({"attention": nn.MultiheadAttention(8, 2, batch_first=batch_first)})
    capture = Capture(model["attention"])
    tracker = _tracker(tmp_path, model, stats=ALL_SCALAR_STATS)
    for _ in range(2):
        x = torch.randn(3, 5, 8)
        model["attention"](x, x, x)
    results = tracker.add_saturations()
    samples = torch.cat([o.reshape(-1, 8) for o in capture.outputs]).numpy()
    _check_layer(results, "train", "attention", samples)
    assert not any("out_proj" in key for key in results)
    tracker.close()


def test_train_and_eval_are_kept_apart(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    capture = Capture(model[0])
    tracker = _tracker(tmp_path, model, stats=["trc"])
    model.train()
    model(torch.randn(16, 4))
    model.eval()
    model(3 * torch.randn(16, 4))
    results = tracker.add_saturations()
    train, evaluation = (o.numpy() for o in capture.outputs)
    assert results["train-covariance-trace_0"] == pytest.approx(np.trace(population_cov(train)), rel=1e-6)
    assert results["eval-covariance-trace_0"] == pytest.approx(np.trace(population_cov(evaluation)), rel=1e-6)
    tracker.close()


def test_log_interval_counts_per_layer_and_mode(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    capture = Capture(model[0])
    tracker = _tracker(tmp_path, model, stats=["trc"], log_interval=2)
    for _ in range(4):  # alternate train and eval batches, as an eval every step would
        model.train()
        model(torch.randn(5, 3))
        model.eval()
        model(torch.randn(5, 3))
    results = tracker.add_saturations()
    train = torch.cat(capture.outputs[0::2][0::2]).numpy()
    evaluation = torch.cat(capture.outputs[1::2][0::2]).numpy()
    assert results["train-covariance-trace_0"] == pytest.approx(np.trace(population_cov(train)), rel=1e-6)
    assert results["eval-covariance-trace_0"] == pytest.approx(np.trace(population_cov(evaluation)), rel=1e-6)
    tracker.close()


def test_max_samples_caps_each_layer_and_mode_per_epoch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    capture = Capture(model[0])
    tracker = _tracker(tmp_path, model, stats=["trc"], max_samples=12)
    for _ in range(4):
        model(torch.randn(5, 3))
    results = tracker.add_saturations()
    first = torch.cat(capture.outputs)[:12].numpy()
    assert results["train-covariance-trace_0"] == pytest.approx(np.trace(population_cov(first)), rel=1e-6)
    capture.outputs.clear()
    for _ in range(3):
        model(torch.randn(5, 3))
    results = tracker.add_saturations()
    second = torch.cat(capture.outputs)[:12].numpy()
    assert results["train-covariance-trace_0"] == pytest.approx(np.trace(population_cov(second)), rel=1e-6)
    tracker.close()


def test_reset_covariance_false_accumulates_across_epochs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    capture = Capture(model[0])
    tracker = _tracker(tmp_path, model, stats=["trc"], reset_covariance=False)
    model(torch.randn(10, 3))
    tracker.add_saturations()
    model(torch.randn(10, 3) + 2)
    results = tracker.add_saturations()
    everything = torch.cat(capture.outputs).numpy()
    assert results["train-covariance-trace_0"] == pytest.approx(np.trace(population_cov(everything)), rel=1e-6)
    tracker.close()


def test_average_sat_is_the_mean_over_layers(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    captures = [Capture(model[0]), Capture(model[1])]
    tracker = _tracker(tmp_path, model, stats=["lsat"], average_sat=True)
    model(torch.randn(50, 4))
    results = tracker.add_saturations()
    expected = np.mean([idim(population_cov(c.outputs[0].numpy()), 0.99) / c.outputs[0].shape[1] for c in captures])
    assert results["average-train-sat"] == pytest.approx(expected)
    assert "average-eval-sat" not in results
    tracker.close()
    frame = pd.read_csv(str(tmp_path / "run.csv"), sep=";", index_col=0)
    assert frame["average-train-sat"].iloc[0] == pytest.approx(expected)


def test_nan_batch_is_skipped_with_one_warning_per_layer(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    capture = Capture(model[0])
    tracker = _tracker(tmp_path, model, stats=["trc", "idim"])
    good = torch.randn(10, 3)
    model(good)
    model(torch.full((4, 3), float("nan")))
    model(torch.tensor([[float("inf"), 0.0, 0.0]]))
    with pytest.warns(RuntimeWarning, match="NaN or Inf") as record:
        results = tracker.add_saturations()
    assert len([w for w in record if "NaN or Inf" in str(w.message)]) == 1
    expected = population_cov(capture.outputs[0].numpy())
    assert results["train-covariance-trace_0"] == pytest.approx(np.trace(expected), rel=1e-6)
    tracker.close()


def test_single_batch_and_zero_size_batches(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(3, 3)
    tracker = _tracker(tmp_path, layer, stats=["trc", "lsat"])
    layer(torch.randn(0, 3))
    layer(torch.randn(1, 3))
    results = tracker.add_saturations()
    assert results["train-covariance-trace_Module-0-Linear"] == 0.0
    assert results["train-saturation_Module-0-Linear"] == 0.0
    tracker.close()


def test_stop_and_resume_control_recording(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    capture = Capture(model[0])
    tracker = _tracker(tmp_path, model, stats=["trc"])
    model(torch.randn(10, 3))
    tracker.stop()
    assert not tracker.is_recording()
    model(100 * torch.randn(10, 3))
    tracker.resume()
    assert tracker.is_recording()
    model(torch.randn(10, 3))
    results = tracker.add_saturations()
    kept = torch.cat([capture.outputs[0], capture.outputs[2]]).numpy()
    assert results["train-covariance-trace_0"] == pytest.approx(np.trace(population_cov(kept)), rel=1e-6)
    tracker.close()


def test_float64_activations_give_float64_accuracy(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(6, 6).double()
    capture = Capture(layer)
    tracker = _tracker(tmp_path, layer, stats=ALL_SCALAR_STATS)
    for _ in range(5):
        layer(torch.randn(20, 6, dtype=torch.float64) * torch.logspace(0, -3, 6, dtype=torch.float64))
    results = tracker.add_saturations()
    cov = population_cov(torch.cat(capture.outputs).numpy())
    assert np.linalg.cond(cov) > 1e4
    assert results["train-covariance-determinant_Module-0-Linear"] == pytest.approx(np.linalg.det(cov), rel=1e-9)
    tracker.close()


def test_well_conditioned_determinant_in_float32(tmp_path):
    torch.manual_seed(0)
    layer = nn.Linear(5, 5)
    capture = Capture(layer)
    tracker = _tracker(tmp_path, layer, stats=["det"])
    for _ in range(10):
        layer(torch.randn(100, 5))
    results = tracker.add_saturations()
    cov = population_cov(torch.cat(capture.outputs).numpy())
    # The Gram is float32: each eigenvalue is off by up to about eps32 * lambda_max / lambda, and the
    # determinant sums those relative errors (here lambda_max / lambda_min is about 350).
    eigenvalues = np.linalg.eigvalsh(cov)
    tolerance = cov.shape[0] * np.finfo(np.float32).eps * eigenvalues.max() / eigenvalues.min()
    assert tolerance < 1e-3
    assert results["train-covariance-determinant_Module-0-Linear"] == pytest.approx(np.linalg.det(cov), rel=tolerance)
    tracker.close()
