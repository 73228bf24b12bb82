"""delve.metrics against numpy and against covariances whose answer is known by construction."""
import numpy as np
import pytest
import torch

from delve import metrics
from reference import idim as numpy_idim


@pytest.mark.parametrize(
    "diagonal, thresh, expected",
    [
        ([0.5, 0.4, 0.1], 0.99, 3),
        ([0.5, 0.4, 0.1], 0.9, 2),
        ([0.5, 0.4, 0.1], 0.5, 1),
        ([1.0, 0.0, 0.0], 0.99, 1),
        ([0.1, 0.4, 0.5], 0.9, 2),
        ([1.0, 1.0, 1.0, 1.0], 1.0, 4),
        ([1.0, 1.0, 1.0, 1.0], 0.75, 3),
    ],
)
def test_intrinsic_dimensionality_of_known_spectra(diagonal, thresh, expected):
    cov = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    assert metrics.compute_intrinsic_dimensionality(cov, thresh) == expected
    assert metrics.compute_saturation(cov, thresh) == pytest.approx(expected / len(diagonal))


def test_zero_covariance_has_dimension_zero():
    assert metrics.compute_intrinsic_dimensionality(torch.zeros(3, 3)) == 0
    assert metrics.compute_saturation(torch.zeros(3, 3)) == 0.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("thresh", [0.9, 0.99, 0.999])
def test_metrics_match_numpy_on_random_covariances(seed, thresh):
    rng = np.random.default_rng(seed)
    rank = rng.integers(1, 8)
    factors = rng.normal(size=(8, rank)) * rng.uniform(0.1, 3, size=rank)
    cov = factors @ factors.T + 1e-3 * np.eye(8)
    assert metrics.compute_intrinsic_dimensionality(cov, thresh) == numpy_idim(cov, thresh)
    assert metrics.compute_cov_trace(cov) == pytest.approx(np.trace(cov), rel=1e-12)
    assert metrics.compute_cov_determinant(cov) == pytest.approx(np.linalg.det(cov), rel=1e-9)
    assert metrics.compute_diag_trace(cov) == pytest.approx(np.linalg.eigvalsh(cov).sum(), rel=1e-9)


def test_rotated_subspace_gives_its_dimension():
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    cov = basis[:, :4] @ np.diag([4.0, 3.0, 2.0, 1.0]) @ basis[:, :4].T
    assert metrics.compute_intrinsic_dimensionality(torch.from_numpy(cov), 0.99) == 4
    assert metrics.compute_saturation(cov, 0.99) == pytest.approx(0.4)


@pytest.mark.parametrize("thresh", [0.0, -0.1, 1.01])
def test_threshold_outside_unit_interval_is_refused(thresh):
    with pytest.raises(ValueError, match="thresh"):
        metrics.compute_intrinsic_dimensionality(torch.eye(2), thresh)


def test_non_square_matrix_is_refused():
    with pytest.raises(ValueError, match="square"):
        metrics.compute_cov_trace(torch.ones(2, 3))
