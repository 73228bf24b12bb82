"""Class-conditional statistics (neural collapse NC1, CDNV) from per-class sums, against numpy float64."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from delve import SaturationTracker
from reference import Capture


def _numpy_nc1_cdnv(rows: np.ndarray, labels: np.ndarray):
    rows = rows.astype(np.float64)
    mean = rows.mean(axis=0)
    classes = np.unique(labels)
    n, k = len(rows), len(classes)
    within = np.zeros((rows.shape[1],) * 2)
    between = np.zeros_like(within)
    means, variances = [], []
    for c in classes:
        members = rows[labels == c]
        mu = members.mean(axis=0)
        centered = members - mu
        within += centered.T @ centered / n
        between += len(members) / n * np.outer(mu - mean, mu - mean)
        means.append(mu)
        variances.append((centered**2).sum(axis=1).mean())
    nc1 = np.trace(within @ np.linalg.pinv(between, hermitian=True)) / k
    ratios = [
        (variances[i] + variances[j]) / (2 * np.sum((means[i] - means[j]) ** 2))
        for i in range(k)
        for j in range(i + 1, k)
    ]
    return nc1, float(np.mean(ratios))


def _clustered(classes: int, per_class: int, dim: int, spread: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(classes, dim, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    x = centers[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    return x[order], labels[order]


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_nc1_and_cdnv_match_numpy_on_the_same_activations(tmp_path, dtype, rel):
    # Sigma_W = Sigma - Sigma_B cancels: with float32 activations (float32 Gram matrices) NC1 keeps
    # about eps32 * |Sigma| / |Sigma_W| of relative precision; float64 activations are exact.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).to(dtype)
    captures = [Capture(model[0]), Capture(model[2])]
    x, labels = _clustered(classes=4, per_class=30, dim=6, spread=0.5)
    x = x.to(dtype)
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["nc1", "cdnv", "lsat"], num_classes=4)
    for start in range(0, len(x), 32):
        tracker.set_labels(labels[start : start + 32])
        model(x[start : start + 32])
    results = tracker.add_saturations()
    for name, capture in zip(("0", "2"), captures):
        expected_nc1, expected_cdnv = _numpy_nc1_cdnv(torch.cat(capture.outputs).numpy(), labels.numpy())
        assert results[f"train-nc1_{name}"] == pytest.approx(expected_nc1, rel=rel)
        assert results[f"train-class-distance-normalized-variance_{name}"] == pytest.approx(expected_cdnv, rel=rel)
    tracker.close()


def test_tighter_classes_give_smaller_nc1(tmp_path):
    layer = nn.Identity()
    values = []
    for spread in (1.0, 0.1):
        x, labels = _clustered(classes=3, per_class=50, dim=4, spread=spread)
        tracker = SaturationTracker(
            str(tmp_path / f"run{spread}"), "csv", nn.Linear(4, 4), stats=["nc1"], num_classes=3, nosave=True
        )
        linear = tracker.layers["Module-0-Linear"]
        with torch.no_grad():
            linear.weight.copy_(torch.eye(4))
            linear.bias.zero_()
        tracker.set_labels(labels)
        linear(layer(x))
        values.append(tracker.add_saturations()["train-nc1_Module-0-Linear"])
        tracker.close()
    assert values[1] < values[0] / 50


def test_labels_keyword_of_the_model_call_needs_no_set_labels(tmp_path):
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 6)

        def forward(self, x, labels=None):
            return self.body(x)

    torch.manual_seed(0)
    model = Classifier()
    capture = Capture(model.body)
    x, labels = _clustered(classes=3, per_class=20, dim=4, spread=0.3)
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["nc1"], num_classes=3)
    model(x, labels=labels)
    results = tracker.add_saturations()
    expected, _ = _numpy_nc1_cdnv(capture.outputs[0].numpy(), labels.numpy())
    assert results["train-nc1_body"] == pytest.approx(expected, rel=1e-4)
    tracker.close()


def test_unlabelled_batches_and_token_layers_give_nan_with_a_warning(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", model, stats=["nc1"], num_classes=2)
    tracker.set_labels(torch.tensor([0, 1, 0, 1]))
    model(torch.randn(4, 4))
    tracker.set_labels(None)
    model(torch.randn(4, 4))
    with pytest.warns(RuntimeWarning, match="labels for 4 of its 8"):
        assert math.isnan(tracker.add_saturations()["train-nc1_Module-0-Linear"])
    tracker.set_labels(torch.tensor([0, 1]))
    model(torch.randn(2, 5, 4))  # tokens: 10 samples for 2 labels
    assert math.isnan(tracker.add_saturations()["train-nc1_Module-0-Linear"])
    tracker.close()


def test_class_statistics_need_num_classes_and_proper_labels(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        SaturationTracker(str(tmp_path / "run"), "csv", nn.Linear(2, 2), stats=["nc1"])
    tracker = SaturationTracker(str(tmp_path / "run"), "csv", nn.Linear(2, 2), stats=["cdnv"], num_classes=2)
    with pytest.raises(ValueError, match="labels"):
        tracker.set_labels(torch.zeros(2, 2))
    tracker.close()


def test_class_sums_resume_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, labels = _clustered(classes=3, per_class=10, dim=4, spread=0.5)
    options = {"stats": ["nc1", "cdnv"], "num_classes": 3, "nosave": True}
    whole = SaturationTracker(str(tmp_path / "a"), "csv", model, **options)
    for half in (slice(0, 15), slice(15, 30)):
        whole.set_labels(labels[half])
        model(x[half])
    expected = whole.add_saturations()
    whole.close()
    first = SaturationTracker(str(tmp_path / "b"), "csv", model, **options)
    first.set_labels(labels[:15])
    model(x[:15])
    state = first.state_dict()
    first.close()
    second = SaturationTracker(str(tmp_path / "b"), "csv", model, **options)
    second.load_state_dict(state)
    second.set_labels(labels[15:])
    model(x[15:])
    assert second.add_saturations() == pytest.approx(expected, rel=1e-4)  # float32 partial sums, grouped otherwise
    second.close()
