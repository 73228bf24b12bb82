"""Keras 3 callbacks on the torch backend, checked against numpy float64 on the same layer outputs.

Layer outputs for the references are computed independently of Keras and delve:
Dense layers as ``relu(x @ W + b)`` in numpy, convolutions with
``torch.nn.functional.conv2d`` in float64, from the weights Keras holds.
"""
from __future__ import annotations

import os
import re
import runpy
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

keras = pytest.importorskip("keras", reason="Keras 3 is optional: pip install 'delve[keras]'")
if int(keras.__version__.split(".")[0]) < 3:
    pytest.skip(f"delve.kerascallback needs Keras 3, found {keras.__version__}", allow_module_level=True)
if keras.backend.backend() != "torch":
    pytest.skip(
        f"Keras was imported with the {keras.backend.backend()!r} backend before this module; "
        "run these tests with KERAS_BACKEND=torch",
        allow_module_level=True,
    )

from delve import SaturationTracker, TorchCovarianceMatrix, writers  # noqa: E402
from delve import kerascallback as kc  # noqa: E402
from delve import keras_layers as kl  # noqa: E402
from delve.adapters import AdapterOptions  # noqa: E402
from delve.writers.base import AbstractWriter  # noqa: E402
from delve.writers.npy import load_npy_run  # noqa: E402
from reference import idim, population_cov  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THRESH = 0.99

# Keras' torch backend converts tensors with np.array(x), which numpy 2 flags on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


def reference_saturation(samples: np.ndarray, thresh: float = THRESH) -> float:
    cov = population_cov(samples)
    return idim(cov, thresh) / cov.shape[0]


def dense_forward(layer: Any, x: np.ndarray) -> np.ndarray:
    kernel, bias = (np.asarray(w, dtype=np.float64) for w in layer.get_weights())
    out = np.asarray(x, dtype=np.float64) @ kernel + bias
    return np.maximum(out, 0.0) if layer.activation is keras.activations.relu else out


def conv2d_forward(layer: Any, x: np.ndarray) -> np.ndarray:
    """A 'valid' channels-last Conv2D with relu, by torch in float64; returns NHWC."""
    kernel, bias = (torch.from_numpy(np.asarray(w, dtype=np.float64)) for w in layer.get_weights())
    images = torch.from_numpy(np.asarray(x, dtype=np.float64)).permute(0, 3, 1, 2)
    out = torch.nn.functional.conv2d(images, kernel.permute(3, 2, 0, 1), bias)
    return torch.relu(out).permute(0, 2, 3, 1).numpy()


def low_rank_data(n: int, rank: int, dim: int, seed: int) -> np.ndarray:
    """Rows spanning exactly ``rank`` directions of ``dim``: a linear layer's output has rank <= ``rank``."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, rank)) @ rng.normal(size=(rank, dim))).astype("float32")


def dense_model(seed: int = 0) -> Any:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(16, name="dense_a"),  # linear: rank 3 by construction
            keras.layers.Dense(8, activation="relu", name="dense_b"),
            keras.layers.Dense(2, name="dense_c"),
        ]
    )


def conv_model(seed: int = 0) -> Any:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(6, 3, activation="relu", name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="head"),
        ]
    )


def compile_model(model: Any, learning_rate: float = 0.01) -> Any:
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=learning_rate), loss="mse")
    return model


class WeightsAtEpochEnd(keras.callbacks.Callback):
    """Copies of every layer's weights at the end of each epoch (after the callbacks before it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: Dict[int, List[List[np.ndarray]]] = {}

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.weights[epoch] = [[w.copy() for w in layer.get_weights()] for layer in self.model.layers]


def forward_with(model: Any, weights: List[List[np.ndarray]], x: np.ndarray) -> Dict[str, np.ndarray]:
    """Every Dense output of ``model`` (a dense_model) for ``x`` with the given weights, in numpy."""
    saved = [layer.get_weights() for layer in model.layers]
    outputs = {}
    try:
        for layer, layer_weights in zip(model.layers, weights):
            layer.set_weights(layer_weights)
        for layer in model.layers:
            x = dense_forward(layer, x)
            outputs[layer.name] = x
    finally:
        for layer, layer_weights in zip(model.layers, saved):
            layer.set_weights(layer_weights)
    return outputs


# ------------------------------------------------------------------ SaturationLogger
def test_saturation_logger_matches_numpy_each_epoch(capsys: pytest.CaptureFixture) -> None:
    x = low_rank_data(96, rank=3, dim=10, seed=1)
    y = np.random.default_rng(2).normal(size=(96, 2)).astype("float32")
    probe = low_rank_data(40, rank=3, dim=10, seed=3)
    model = compile_model(dense_model())
    logger = kc.SaturationLogger(model, input_data=probe, print_freq=1, batch_size=16)
    weights = WeightsAtEpochEnd()
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[logger, weights])

    assert sorted(logger.history) == [0, 1]
    for epoch in (0, 1):
        outputs = forward_with(model, weights.weights[epoch], probe)
        expected = {name: reference_saturation(out) for name, out in outputs.items()}
        assert logger.history[epoch] == pytest.approx(expected, abs=0), epoch
    assert logger.saturations == logger.history[1]
    assert logger.saturations["dense_a"] == 3 / 16  # a linear layer on rank-3 data
    assert 0 < logger.saturations["dense_b"] <= 1

    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    pattern = r"dense_a  : %(\d\.\d\d) \| dense_b  : %(\d\.\d\d) \| dense_c  : %(\d\.\d\d) \|"
    for line, epoch in zip(lines, (0, 1)):
        match = re.fullmatch(pattern, line)
        assert match, line
        assert [float(v) for v in match.groups()] == [round(logger.history[epoch][n], 2) for n in logger.layers]


def test_saturation_logger_print_freq_and_quiet(capsys: pytest.CaptureFixture) -> None:
    x = low_rank_data(32, rank=3, dim=10, seed=4)
    model = compile_model(dense_model())
    logger = kc.SaturationLogger(model, input_data=x, print_freq=2)
    model.fit(x, np.zeros((32, 2), "float32"), epochs=3, verbose=0, callbacks=[logger])
    assert sorted(logger.history) == [0, 2]
    assert len(capsys.readouterr().out.strip().splitlines()) == 2

    quiet = kc.SaturationLogger(model, input_data=x, verbose=False)
    model.fit(x, np.zeros((32, 2), "float32"), epochs=1, verbose=0, callbacks=[quiet])
    assert capsys.readouterr().out == ""
    assert set(quiet.saturations) == {"dense_a", "dense_b", "dense_c"}


@pytest.mark.parametrize("conv_method", ["channelwise", "mean", "flatten"])
def test_saturation_logger_conv_matches_numpy(conv_method: str, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(48, 6, 6, 2)).astype("float32")
    model = compile_model(conv_model())
    logger = kc.SaturationLogger(model, input_data=x[:30], conv_method=conv_method, sat_threshold=0.9)
    model.fit(x, rng.normal(size=(48, 3)).astype("float32"), epochs=2, batch_size=16, verbose=0, callbacks=[logger])

    feature_maps = conv2d_forward(model.get_layer("conv"), x[:30])  # (30, 4, 4, 6) NHWC
    if conv_method == "channelwise":
        samples = feature_maps.reshape(-1, 6)  # every spatial position a sample of the 6 channels
    elif conv_method == "mean":
        samples = feature_maps.mean(axis=(1, 2))
    else:
        samples = feature_maps.transpose(0, 3, 1, 2).reshape(30, -1)
    head = dense_forward(model.get_layer("head"), feature_maps.reshape(30, -1))
    assert logger.saturations == {
        "conv": reference_saturation(samples, 0.9),
        "head": reference_saturation(head, 0.9),
    }


def test_saturation_logger_multi_input_functional_model() -> None:
    first, second = keras.Input((3,), name="first"), keras.Input((4,), name="second")
    joined = keras.layers.Concatenate()([first, second])
    model = keras.Model({"first": first, "second": second}, keras.layers.Dense(5, name="mix")(joined))
    rng = np.random.default_rng(16)
    data = {"first": rng.normal(size=(21, 3)).astype("float32"), "second": rng.normal(size=(21, 4)).astype("float32")}
    logger = kc.SaturationLogger(model, input_data=data, batch_size=8, sat_threshold=0.95)
    outputs = dense_forward(model.get_layer("mix"), np.concatenate([data["first"], data["second"]], axis=1))
    assert logger.compute() == {"mix": reference_saturation(outputs, 0.95)}


def test_saturation_logger_include_conv_false() -> None:
    model = conv_model()
    logger = kc.SaturationLogger(model, input_data=np.zeros((2, 6, 6, 2), "float32"), include_conv=False)
    assert list(logger.layers) == ["head"]


def test_saturation_logger_rejects_bad_arguments() -> None:
    model = dense_model()
    x = np.zeros((4, 10), "float32")
    with pytest.raises(ValueError, match="print_freq"):
        kc.SaturationLogger(model, x, print_freq=0)
    with pytest.raises(ValueError, match="sat_threshold"):
        kc.SaturationLogger(model, x, sat_threshold=1.5)
    with pytest.raises(ValueError, match="conv_method.*channelwise"):
        kc.SaturationLogger(model, x, conv_method="pool")
    with pytest.raises(ValueError, match="input_data"):
        kc.SaturationLogger(model, None)
    with pytest.raises(ValueError, match="keras.Model"):
        kc.SaturationLogger(nn.Linear(2, 2), x)
    with pytest.raises(ValueError, match="no Dense"):
        kc.SaturationLogger(keras.Sequential([keras.Input((3,)), keras.layers.ReLU()]), x)


def test_saturation_logger_explains_subclassed_models() -> None:
    class Subclassed(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = keras.layers.Dense(4)

        def call(self, inputs: Any) -> Any:
            return self.hidden(inputs)

    model = Subclassed()
    x = np.ones((8, 3), "float32")
    model(x)
    logger = kc.SaturationLogger(model, x)
    with pytest.raises(ValueError, match="SaturationCallback"):
        logger.compute()


# ------------------------------------------------------------------ samples of Keras layers
def _conv_reference(nhwc: np.ndarray, method: str) -> np.ndarray:
    if method == "channelwise":
        return nhwc.reshape(-1, nhwc.shape[-1])
    if method == "flatten":
        return nhwc.transpose(0, 3, 1, 2).reshape(nhwc.shape[0], -1)  # channel-major, as torch's NCHW
    reduce = {"mean": np.mean, "max": np.max, "median": np.median}[method]
    return reduce(nhwc.reshape(nhwc.shape[0], -1, nhwc.shape[-1]), axis=1)


@pytest.mark.parametrize("conv_method", ["channelwise", "mean", "max", "median", "flatten"])
def test_keras_samples_of_both_data_formats_match_numpy(conv_method: str) -> None:
    nhwc = np.random.default_rng(15).normal(size=(3, 5, 3, 6))  # 15 positions: an odd count for the median
    options = AdapterOptions(conv_method=conv_method)
    expected = population_cov(_conv_reference(nhwc, conv_method))
    layouts = {
        "channels_last": torch.from_numpy(nhwc),
        "channels_first": torch.from_numpy(nhwc).permute(0, 3, 1, 2),
    }
    for data_format, output in layouts.items():
        layer = keras.layers.Conv2D(6, 3, data_format=data_format)
        accumulator = TorchCovarianceMatrix()
        accumulator.update(kc.keras_samples(layer, output, options))
        np.testing.assert_allclose(accumulator.compute().numpy(), expected, atol=1e-12, err_msg=data_format)


def test_keras_samples_of_dense_on_sequences_and_conv1d() -> None:
    sequence = torch.randn(4, 7, 5, dtype=torch.float64)  # (batch, steps, features)
    options = AdapterOptions()
    assert torch.equal(kc.keras_samples(keras.layers.Dense(5), sequence, options), sequence.reshape(28, 5))
    assert torch.equal(kc.keras_samples(keras.layers.Conv1D(5, 3), sequence, options), sequence.reshape(28, 5))
    pooled = kc.keras_samples(keras.layers.Conv1D(5, 3), sequence, AdapterOptions(conv_method="mean"))
    assert torch.allclose(pooled, sequence.mean(dim=1))


# ------------------------------------------------------------------ tracker callback
def test_tracker_callback_train_and_eval_rows_match_numpy(tmp_path: Path) -> None:
    """With learning rate 0 the weights stay put, so numpy can recompute every batch's outputs."""
    x = low_rank_data(100, rank=3, dim=10, seed=6)
    y = np.zeros((100, 2), "float32")
    x_val = low_rank_data(30, rank=4, dim=10, seed=7)
    model = compile_model(dense_model(), learning_rate=0.0)
    savefile = str(tmp_path / "keras_run")
    callback = kc.SaturationCallback(savefile, save_to="csv", stats=["lsat", "trc"])
    # A SaturationLogger in the same fit runs other data through the same layers: it must not be recorded.
    logger = kc.SaturationLogger(model, input_data=x[:7] * 3, verbose=False)
    model.fit(x, y, epochs=2, batch_size=32, validation_data=(x_val, y[:30]), verbose=0, callbacks=[callback, logger])

    frame = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(frame.index) == [0, 1]
    train = forward_with(model, [layer.get_weights() for layer in model.layers], x)
    evals = forward_with(model, [layer.get_weights() for layer in model.layers], x_val)
    for name in ("dense_a", "dense_b", "dense_c"):
        for mode, outputs in (("train", train), ("eval", evals)):
            assert list(frame[f"{mode}-saturation_{name}"]) == [reference_saturation(outputs[name])] * 2
            expected_trace = np.trace(population_cov(outputs[name]))
            np.testing.assert_allclose(frame[f"{mode}-covariance-trace_{name}"], expected_trace, rtol=1e-5)
    assert frame["train-saturation_dense_a"].iloc[0] == 3 / 16
    assert frame["eval-saturation_dense_a"].iloc[0] == 4 / 16
    np.testing.assert_allclose(frame["loss"], [callback.history[e]["loss"] for e in (0, 1)])
    assert "val_loss" in frame.columns


def test_tracker_callback_while_training_matches_hooked_outputs(tmp_path: Path) -> None:
    """With a real optimizer the weights change every batch; compare with outputs captured beside delve."""
    x = low_rank_data(64, rank=5, dim=10, seed=8)
    y = np.random.default_rng(9).normal(size=(64, 2)).astype("float32")
    model = compile_model(dense_model(), learning_rate=0.05)
    layer = model.get_layer("dense_b")

    class CaptureTrainBatches(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.active = False
            self.outputs: Dict[int, List[np.ndarray]] = {}
            self.epoch = 0
            layer.register_forward_hook(self.hook)

        def hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if self.active:
                self.outputs.setdefault(self.epoch, []).append(output.detach().double().numpy().copy())

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.epoch = epoch

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self.active = True

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.active = False

    capture = CaptureTrainBatches()
    callback = kc.SaturationCallback(str(tmp_path / "run"), save_to="csv", stats=["lsat", "idim", "trc"])
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[capture, callback])
    for epoch in (0, 1):
        samples = np.concatenate(capture.outputs[epoch])
        assert samples.shape == (64, 8)
        cov = population_cov(samples)
        results = callback.history[epoch]
        assert results["train-intrinsic-dimensionality_dense_b"] == idim(cov, THRESH)
        assert results["train-saturation_dense_b"] == idim(cov, THRESH) / 8
        np.testing.assert_allclose(results["train-covariance-trace_dense_b"], np.trace(cov), rtol=1e-5)
    assert not np.allclose(*(np.concatenate(capture.outputs[e]) for e in (0, 1)))


def test_tracker_callback_conv_channelwise_matches_numpy(tmp_path: Path) -> None:
    x = np.random.default_rng(10).normal(size=(40, 6, 6, 2)).astype("float32")
    model = compile_model(conv_model(), learning_rate=0.0)
    callback = kc.SaturationCallback(str(tmp_path / "conv"), save_to="csv", stats=["idim", "trc"])
    model.fit(x, np.zeros((40, 3), "float32"), epochs=2, batch_size=16, verbose=0, callbacks=[callback])
    samples = conv2d_forward(model.get_layer("conv"), x).reshape(-1, 6)
    cov = population_cov(samples)
    for epoch in (0, 1):
        assert callback.history[epoch]["train-intrinsic-dimensionality_conv"] == idim(cov, THRESH)
        np.testing.assert_allclose(callback.history[epoch]["train-covariance-trace_conv"], np.trace(cov), rtol=1e-5)


def test_tracker_callback_has_the_columns_of_the_torch_side(tmp_path: Path) -> None:
    x = low_rank_data(32, rank=3, dim=10, seed=11)
    torch_model = nn.Sequential(
        OrderedDict(dense_a=nn.Linear(10, 16), dense_b=nn.Linear(16, 8), relu=nn.ReLU(), dense_c=nn.Linear(8, 2))
    )
    with SaturationTracker(str(tmp_path / "torch"), save_to="csv", modules=torch_model, stats=["lsat", "idim"]) as tr:
        torch_model.train()
        torch_model(torch.from_numpy(x))
        torch_model.eval()
        torch_model(torch.from_numpy(x))
        tr.add_saturations()

    model = compile_model(dense_model())
    callback = kc.SaturationCallback(
        str(tmp_path / "keras"), save_to="csv", stats=["lsat", "idim"], log_metrics=False
    )
    model.fit(x, np.zeros((32, 2), "float32"), validation_data=(x, np.zeros((32, 2), "float32")), epochs=1,
              verbose=0, callbacks=[callback])
    torch_columns = pd.read_csv(tmp_path / "torch.csv", sep=";", index_col=0).columns
    keras_columns = pd.read_csv(tmp_path / "keras.csv", sep=";", index_col=0).columns
    assert list(keras_columns) == list(torch_columns)


def test_tracker_callback_freq_hooks_and_second_fit(tmp_path: Path) -> None:
    x = low_rank_data(32, rank=3, dim=10, seed=12)
    y = np.zeros((32, 2), "float32")
    model = compile_model(dense_model())
    savefile = str(tmp_path / "run")
    callback = kc.SaturationCallback(savefile, freq=2, log_metrics=False)
    model.fit(x, y, epochs=3, verbose=0, callbacks=[callback])
    assert sorted(callback.history) == [0, 2]
    assert callback.tracker is None  # closed at the end of fit
    for layer in model.layers:
        assert not layer._forward_hooks, layer.name  # hooks removed
        assert layer.training  # flags restored

    model.predict(x, verbose=0)  # nothing is recorded or written outside fit
    with pytest.warns(UserWarning, match="delve continues the run of this callback's previous fit in .* at row 3"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])  # epochs 3 and 4 of the run
    frame = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(frame.index) == sorted(callback.history) == [0, 2, 4]
    assert frame.notna().all().all()


def test_tracker_callback_rows_are_numbered_by_epoch_in_every_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """freq=2 over 5 epochs: the CSV index, TensorBoard steps, npy files and history all say 0, 2, 4."""
    monkeypatch.setitem(writers.WRITERS, "tensorboard", f"{__name__}:RecordingWriter")
    RecordingWriter.instances.clear()
    x = low_rank_data(32, rank=3, dim=10, seed=15)
    model = compile_model(dense_model(), learning_rate=0.0)
    savefile = str(tmp_path / "every_other")
    callback = kc.SaturationCallback(savefile, save_to=["csv", "tensorboard", "npy"], freq=2, log_metrics=False)
    model.fit(x, np.zeros((32, 2), "float32"), epochs=5, verbose=0, callbacks=[callback])

    outputs = forward_with(model, [layer.get_weights() for layer in model.layers], x)
    frame = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(frame.index) == sorted(callback.history) == [0, 2, 4]
    assert frame["train-saturation_dense_b"].tolist() == [reference_saturation(outputs["dense_b"])] * 3
    (writer,) = RecordingWriter.instances
    assert sorted({step for _, _, step in writer.values}) == [0, 2, 4]
    _, values = load_npy_run(savefile)
    assert sorted(values["train-saturation_dense_b"]) == [0, 2, 4]


def test_tracker_callback_continues_over_fits_in_every_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fit() calls are one run: rows, TensorBoard steps and history go on; fit(initial_epoch=E) resumes at E."""
    monkeypatch.setitem(writers.WRITERS, "tensorboard", f"{__name__}:RecordingWriter")
    RecordingWriter.instances.clear()
    x = low_rank_data(32, rank=3, dim=10, seed=16)
    y = np.zeros((32, 2), "float32")
    model = compile_model(dense_model())
    savefile = str(tmp_path / "fits")
    callback = kc.SaturationCallback(savefile, save_to=["csv", "tensorboard"], log_metrics=False, stats=["trc"])
    model.fit(x, y, epochs=3, verbose=0, callbacks=[callback])
    first = dict(callback.history)
    with pytest.warns(UserWarning, match="continues the run of this callback's previous fit .* at row 3"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    frame = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(frame.index) == sorted(callback.history) == [0, 1, 2, 3, 4]
    assert all(callback.history[epoch] == first[epoch] for epoch in first)  # the first fit's values are kept
    steps = [sorted({step for _, _, step in writer.values}) for writer in RecordingWriter.instances]
    assert steps == [[0, 1, 2], [3, 4]]
    np.testing.assert_allclose(frame.loc[3:, "train-covariance-trace_dense_a"],
                               [callback.history[e]["train-covariance-trace_dense_a"] for e in (3, 4)])

    # A model restored from epoch 2's checkpoint trains on with Keras' own epoch numbers: rows 2 on are replaced.
    with pytest.warns(UserWarning, match="continues the run at fit's initial_epoch=2 .* at row 2"):
        model.fit(x, y, initial_epoch=2, epochs=4, verbose=0, callbacks=[callback])
    frame = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(frame.index) == [0, 1, 2, 3]
    np.testing.assert_allclose(frame["train-covariance-trace_dense_a"],
                               [callback.history[e]["train-covariance-trace_dense_a"] for e in range(4)])


def test_tracker_callback_new_callback_is_a_new_run(tmp_path: Path) -> None:
    x = low_rank_data(32, rank=3, dim=10, seed=17)
    y = np.zeros((32, 2), "float32")
    savefile = str(tmp_path / "twice")
    model = compile_model(dense_model())
    model.fit(x, y, epochs=3, verbose=0, callbacks=[kc.SaturationCallback(savefile, log_metrics=False)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, epochs=2, verbose=0, callbacks=[kc.SaturationCallback(savefile, log_metrics=False)])
    assert not [w for w in caught if "delve continues" in str(w.message)]
    assert list(pd.read_csv(savefile + ".csv", sep=";", index_col=0).index) == [0, 1]
    if hasattr(AbstractWriter, "previous_outputs"):  # the tracker's fresh-run rule: the earlier run moved aside
        assert [w for w in caught if "fresh run" in str(w.message)]
        backup = os.path.join(savefile + ".previous", "twice.csv")
        assert list(pd.read_csv(backup, sep=";", index_col=0).index) == [0, 1, 2]


def test_tracker_callback_values_reach_keras_logs_history_and_early_stopping(tmp_path: Path) -> None:
    """The statistics are in the epoch's logs: History keeps them and EarlyStopping monitors them."""
    x = low_rank_data(64, rank=3, dim=10, seed=18)
    x_val = low_rank_data(32, rank=4, dim=10, seed=19)
    y = np.zeros((64, 2), "float32")
    model = compile_model(dense_model(), learning_rate=0.0)  # constant saturation: no improvement after epoch 0
    savefile = str(tmp_path / "logs")
    callback = kc.SaturationCallback(savefile, stats=["lsat", "trc"])
    stopping = keras.callbacks.EarlyStopping(monitor="eval-saturation_dense_a", mode="max", patience=1)
    fitted = model.fit(x, y, validation_data=(x_val, y[:32]), epochs=6, verbose=0, callbacks=[callback, stopping])

    frame = pd.read_csv(savefile + ".csv", sep=";", index_col=0)
    assert list(frame.index) == [0, 1]  # stopped by EarlyStopping on delve's value, after patience 1
    assert fitted.history["eval-saturation_dense_a"] == frame["eval-saturation_dense_a"].tolist() == [4 / 16] * 2
    outputs = forward_with(model, [layer.get_weights() for layer in model.layers], x)
    np.testing.assert_allclose(fitted.history["train-covariance-trace_dense_b"],
                               [np.trace(population_cov(outputs["dense_b"]))] * 2, rtol=1e-5)
    quiet = kc.SaturationCallback(str(tmp_path / "quiet"), log_to_trainer=False)
    fitted = model.fit(x, y, epochs=1, verbose=0, callbacks=[quiet])
    assert not any("saturation" in name for name in fitted.history)


def test_tracker_callback_names_nested_layers() -> None:
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="inner_dense")], name="block")
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, name="top")(inner(inputs))
    model = keras.Model(inputs, outputs)
    assert list(kc.keras_layers(model)) == ["block-inner_dense", "top"]
    assert list(kc.keras_layers(model, nested=False)) == ["top"]
    model = compile_model(model)
    callback = kc.SaturationCallback("unused", nosave=True, log_metrics=False)
    model.fit(np.eye(4, dtype="float32"), np.zeros((4, 2), "float32"), epochs=1, verbose=0, callbacks=[callback])
    assert sorted(callback.history[0]) == ["train-saturation_block-inner_dense", "train-saturation_top"]


def test_tracker_callback_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="freq"):
        kc.SaturationCallback("run", freq=0)
    with pytest.raises(ValueError, match="save_to='excel'.*'csv'"):
        kc.SaturationCallback("run", save_to="excel")
    with pytest.raises(ValueError, match="'stat' is not an option of SaturationTracker.*stats"):
        kc.SaturationCallback("run", stat=["lsat"])
    with pytest.raises(ValueError, match="'modules' is set by the callback"):
        kc.SaturationCallback("run", modules=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="sat_threshold"):
        kc.SaturationCallback("run", sat_threshold=0)
    with pytest.raises(ValueError, match="conv_method"):
        kc.SaturationCallback("run", conv_method="pool")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # raised by torch.compile's imports
def test_tracker_callback_refuses_jit_compiled_models() -> None:
    model = dense_model()
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    callback = kc.SaturationCallback("unused", nosave=True)
    with pytest.raises(ValueError, match="jit_compile=False"):
        model.fit(np.ones((4, 10), "float32"), np.zeros((4, 2), "float32"), epochs=1, verbose=0, callbacks=[callback])


def test_tracker_callback_needs_the_torch_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=torch.*'jax'.*SaturationLogger"):
        kc.SaturationCallback("run")


# ------------------------------------------------------------------ CustomTensorBoard
class RecordingWriter(AbstractWriter):
    """Keeps what a writer receives: (name, value, global_step) and the number of saves."""

    instances: List["RecordingWriter"] = []

    def __init__(self, savepath: str, **kwargs: Any) -> None:
        self.savepath = savepath
        self.values: List[tuple] = []
        self.saves = 0
        RecordingWriter.instances.append(self)

    def resume_from_saved_state(self, initial_epoch: int) -> None:
        pass

    def add_scalar(self, name: str, value: Any, global_step: Any = None, **kwargs: Any) -> None:
        self.values.append((name, value, global_step))

    def add_scalars(self, prefix: str, value_dict: Any, **kwargs: Any) -> None:
        for name, value in value_dict.items():
            self.add_scalar(prefix + name, value, **kwargs)

    def save(self) -> None:
        self.saves += 1

    def close(self) -> None:
        pass


def test_custom_tensorboard_writes_saturations_with_epoch_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(writers.WRITERS, "tensorboard", f"{__name__}:RecordingWriter")
    RecordingWriter.instances.clear()
    x = low_rank_data(48, rank=3, dim=10, seed=13)
    model = compile_model(dense_model(), learning_rate=0.0)
    callback = kc.CustomTensorBoard(log_dir=str(tmp_path / "tb"), user_defined_freq=2)
    model.fit(x, np.zeros((48, 2), "float32"), epochs=3, batch_size=16, verbose=0, callbacks=[callback])

    (writer,) = RecordingWriter.instances
    assert writer.savepath == str(tmp_path / "tb")
    assert writer.saves == 2
    saturations = [(n, v, s) for n, v, s in writer.values if "saturation" in n]
    assert {s for _, _, s in saturations} == {0, 2}  # the epoch is the step
    outputs = forward_with(model, [layer.get_weights() for layer in model.layers], x)
    for name, value, _ in saturations:
        assert value == reference_saturation(outputs[name.split("_", 1)[1]])
    assert {n for n, _, _ in writer.values if "saturation" not in n} == {"loss"}


def test_custom_tensorboard_event_files(tmp_path: Path) -> None:
    if "tensorboard" not in writers.WRITERS:
        pytest.skip("delve.writers has no 'tensorboard' writer in this checkout")
    pytest.importorskip("tensorboardX", reason="the tensorboard writer needs tensorboardX")
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator", reason="reading event files needs tensorboard"
    )
    x = low_rank_data(32, rank=3, dim=10, seed=14)
    model = compile_model(dense_model(), learning_rate=0.0)
    log_dir = tmp_path / "tb"
    callback = kc.CustomTensorBoard(log_dir=str(log_dir), user_defined_freq=1)
    model.fit(x, np.zeros((32, 2), "float32"), epochs=2, verbose=0, callbacks=[callback])

    events = accumulator.EventAccumulator(str(log_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    saturation_tags = [tag for tag in tags if "saturation" in tag and "dense_a" in tag]
    assert len(saturation_tags) == 1, tags
    scalars = events.Scalars(saturation_tags[0])
    assert [event.step for event in scalars] == [0, 1]
    assert [event.value for event in scalars] == pytest.approx([3 / 16, 3 / 16])


class FakeKerasTensorBoard(keras.callbacks.Callback):
    def __init__(self, log_dir: str, **kwargs: Any) -> None:
        super().__init__()
        self.log_dir = log_dir
        self.kwargs = kwargs
        self.calls: List[str] = []

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.calls.append(f"epoch_end {epoch}")

    def on_train_end(self, logs: Any = None) -> None:
        self.calls.append("train_end")


def test_custom_tensorboard_passes_kwargs_to_keras_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(writers.WRITERS, "tensorboard", f"{__name__}:RecordingWriter")
    monkeypatch.setattr(kc, "_tensorflow_available", lambda: False)
    with pytest.raises(ImportError, match="histogram_freq.*keras.callbacks.TensorBoard.*tensorflow"):
        kc.CustomTensorBoard(str(tmp_path), 1, histogram_freq=1)

    monkeypatch.setattr(kc, "_tensorflow_available", lambda: True)
    monkeypatch.setattr(keras.callbacks, "TensorBoard", FakeKerasTensorBoard)
    callback = kc.CustomTensorBoard(str(tmp_path), 1, histogram_freq=1, write_graph=False)
    inner = callback.keras_tensorboard
    assert (inner.log_dir, inner.kwargs) == (str(tmp_path), {"histogram_freq": 1, "write_graph": False})
    model = compile_model(dense_model())
    model.fit(np.ones((4, 10), "float32"), np.zeros((4, 2), "float32"), epochs=2, verbose=0, callbacks=[callback])
    assert inner.model is model
    assert inner.calls == ["epoch_end 0", "epoch_end 1", "train_end"]
    assert sorted(callback.history) == [0, 1]


def test_custom_tensorboard_rejects_bad_frequency(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="user_defined_freq"):
        kc.CustomTensorBoard(str(tmp_path), user_defined_freq=0)


# ------------------------------------------------------------------ module plumbing
def test_backend_defaults_to_torch_only_when_keras_could_not_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "keras")
    monkeypatch.delenv("KERAS_BACKEND")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(kl.importlib.util, "find_spec", lambda name: None)
    kl._default_to_torch_backend()
    assert os.environ["KERAS_BACKEND"] == "torch"

    monkeypatch.delenv("KERAS_BACKEND")
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    kl._default_to_torch_backend()
    assert "KERAS_BACKEND" not in os.environ  # the user's configured backend stands


def test_example_quick_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("sklearn", reason="the example uses scikit-learn's digits")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["keras_saturation.py", "--quick"])
    runpy.run_path(str(REPO / "examples" / "keras_saturation.py"), run_name="__main__")
    frame = pd.read_csv(tmp_path / "runs" / "keras_saturation.csv", sep=";", index_col=0)
    assert {"train-saturation_conv", "eval-saturation_conv", "train-saturation_hidden", "loss"} <= set(frame.columns)
    assert frame.filter(like="saturation").apply(lambda col: col.between(0, 1)).all().all()
    assert re.search(r"conv  : %\d\.\d\d \| hidden  : %\d\.\d\d \|", capsys.readouterr().out)
