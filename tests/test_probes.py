"""Linear probes against scikit-learn's LogisticRegression and data separable by construction."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from delve import SaturationTracker
from delve.probes import ProbeResult, linear_probes, pool_output, probes_to_frame

sklearn = pytest.importorskip("sklearn", reason="the probe checks compare with scikit-learn")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Probes are thousands of tiny ops: one intra-op thread avoids oversubscription on busy machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Batches:
    """A re-iterable loader over numpy arrays that counts how often it was passed over."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int = 64) -> None:
        self.x, self.y, self.batch_size, self.passes, self.largest = x, y, batch_size, 0, 0

    def __iter__(self):
        self.passes += 1
        for start in range(0, len(self.x), self.batch_size):
            xb = torch.as_tensor(self.x[start:start + self.batch_size], dtype=torch.float32)
            self.largest = max(self.largest, xb.shape[0])
            yield xb, torch.as_tensor(self.y[start:start + self.batch_size])


class PixelsAndNoise(nn.Module):
    """``pixels`` passes the 64 digit pixels through unchanged; ``noise`` ignores them."""

    def __init__(self) -> None:
        super().__init__()
        self.pixels = nn.Linear(64, 64)
        self.noise = nn.Linear(64, 16)
        with torch.no_grad():
            self.pixels.weight.copy_(torch.eye(64))
            self.pixels.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixels(x) + self.noise(torch.randn_like(x)).sum() * 0


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return train_test_split(x.astype(np.float32), y, test_size=0.3, random_state=0, stratify=y)


def test_probe_on_pixels_matches_sklearn_logistic_regression(digits) -> None:
    x_train, x_test, y_train, y_test = digits
    scaler = StandardScaler().fit(x_train)
    reference = LogisticRegression(max_iter=2000).fit(scaler.transform(x_train), y_train)
    expected_train = reference.score(scaler.transform(x_train), y_train)
    expected_test = reference.score(scaler.transform(x_test), y_test)

    torch.manual_seed(0)
    model = PixelsAndNoise()
    train, test = Batches(x_train, y_train), Batches(x_test, y_test)
    results = linear_probes(model, train, test, epochs=20, lr=0.01)
    pixels = results["pixels"]
    assert pixels.features == 64
    assert abs(pixels.train_accuracy - expected_train) <= 0.03
    assert abs(pixels.test_accuracy - expected_test) <= 0.03
    assert pixels.test_accuracy > 0.9
    # Noise carries no information about the digit: about chance (0.1) on held-out data.
    assert results["noise"].test_accuracy < 0.25
    # Streamed: one pass for the moments, one per epoch, one to score; never more than a batch at once.
    assert train.passes == 20 + 2 and test.passes == 1
    assert train.largest == 64


def test_separable_features_reach_full_accuracy() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=600)
    centers = np.array([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    x = (centers[labels] + rng.uniform(-1, 1, size=(600, 4))).astype(np.float32)  # margins by construction
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    tracker = SaturationTracker("unused", save_to="csv", modules=model, nosave=True)
    try:
        results = linear_probes(model, Batches(x[:400], labels[:400]), Batches(x[400:], labels[400:]), layers=tracker)
    finally:
        tracker.close()
    assert list(results) == ["0", "2"]
    assert results["0"].train_accuracy == 1.0 and results["0"].test_accuracy == 1.0
    frame = probes_to_frame(results)
    assert list(frame.index) == ["0", "2"] and frame.loc["0", "features"] == 8


def test_conv_outputs_are_pooled_and_training_flag_restored(digits) -> None:
    x_train, _, y_train, _ = digits
    images = x_train.reshape(-1, 1, 8, 8)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    model.train()
    results = linear_probes(model, Batches(images[:300], y_train[:300]), layers=["0"], epochs=2)
    assert list(results) == ["0"] and results["0"].features == 8 and results["0"].test_accuracy is None
    assert 0.0 <= results["0"].train_accuracy <= 1.0
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())


def test_pooling_reduces_each_layer_type_to_one_vector_per_example() -> None:
    conv = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    assert torch.equal(pool_output(nn.Conv1d(1, 3, 1), conv), conv.mean(dim=2))
    tokens = torch.randn(2, 5, 6)
    assert torch.allclose(pool_output(nn.Linear(6, 6), tokens), tokens.mean(dim=1))
    lstm = nn.LSTM(3, 4)  # time first
    sequence, _ = lstm(torch.randn(7, 2, 3))
    assert torch.equal(pool_output(lstm, (sequence, None)), sequence[-1])


def test_bad_arguments() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    batch = [(torch.zeros(2, 2), torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match="epochs"):
        linear_probes(model, batch, epochs=0)
    with pytest.raises(ValueError, match="layers"):
        linear_probes(model, batch, layers=["nope"])
    with pytest.raises(ValueError, match="num_classes"):
        linear_probes(model, batch, num_classes=1)
    with pytest.raises(ValueError, match="no batch"):
        linear_probes(model, [])
    with pytest.raises(ValueError, match="labels"):
        linear_probes(model, [torch.zeros(2, 2)])
    assert ProbeResult("a", 1, 1.0, None).test_accuracy is None
