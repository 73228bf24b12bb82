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


# ----------------------------------------------------------------- spectral statistics
# numpy float64 references, written from the papers' formulas (no floor: the
# spectra they are compared on have no eigenvalue near it).
def _shares(values):
    values = np.clip(np.asarray(values, dtype=np.float64), 0, None)
    shares = values / values.sum()
    return shares[shares > 0]


def numpy_effective_rank(values):
    shares = _shares(values)
    return float(np.exp(-np.sum(shares * np.log(shares))))


def numpy_rankme(values):
    return numpy_effective_rank(np.sqrt(np.clip(values, 0, None)))


def numpy_participation_ratio(values):
    return float(np.sum(values) ** 2 / np.sum(np.square(values)))


def numpy_stable_rank(values):
    return float(np.sum(values) / np.max(values))


def numpy_entropy(values):
    shares = _shares(values)
    return float(-np.sum(shares * np.log(shares)))


def numpy_alpha(values, first=6, last=100):
    ordered = np.sort(values)[::-1]
    ranks = np.arange(1, len(ordered) + 1)[first - 1:last]
    # polyfit's weights multiply the unsquared residuals: sqrt(1/i) weighs the squares by 1/i
    slope, _ = np.polyfit(np.log(ranks), np.log(ordered[first - 1:last]), 1, w=np.sqrt(1.0 / ranks))
    return float(-slope)


NUMPY_SPECTRAL = {
    "erank": numpy_effective_rank,
    "rankme": numpy_rankme,
    "pr": numpy_participation_ratio,
    "srank": numpy_stable_rank,
    "cond": lambda values: float(np.max(values) / np.min(values)),
    "entropy": numpy_entropy,
    "alpha": numpy_alpha,
}
"""Statistic key to its numpy reference, a function of the eigenvalues."""

SPECTRAL = {
    "erank": metrics.effective_rank,
    "rankme": metrics.rankme,
    "pr": metrics.participation_ratio,
    "srank": metrics.stable_rank,
    "cond": metrics.condition_number,
    "entropy": metrics.matrix_entropy,
    "alpha": metrics.power_law_exponent,
}


def _random_covariance(seed: int, dim: int = 150) -> np.ndarray:
    rng = np.random.default_rng(seed)
    factors = rng.normal(size=(dim, dim)) * rng.uniform(0.05, 3, size=dim)
    return factors @ factors.T / dim + 1e-2 * np.eye(dim)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("key", sorted(SPECTRAL))
def test_spectral_statistics_match_numpy_on_random_covariances(seed, key):
    cov = _random_covariance(seed)
    eigenvalues = np.linalg.eigvalsh(cov)
    expected = NUMPY_SPECTRAL[key](eigenvalues)
    assert SPECTRAL[key](metrics.eigenvalues(cov)) == pytest.approx(expected, rel=1e-9)
    # eigenvalues in any order and type, and any scale, give the same value
    assert SPECTRAL[key](list(eigenvalues)) == pytest.approx(expected, rel=1e-9)
    assert SPECTRAL[key](torch.from_numpy(eigenvalues * 1e4)) == pytest.approx(expected, rel=1e-9)
    if key == "cond":  # and from the singular values, without eigenvalues
        assert SPECTRAL[key](metrics.eigenvalues(cov)) == pytest.approx(np.linalg.cond(cov), rel=1e-9)


def test_von_neumann_entropy_is_minus_trace_rho_log_rho():
    from scipy.linalg import logm

    cov = _random_covariance(7, dim=20)
    rho = cov / np.trace(cov)
    expected = -np.trace(rho @ logm(rho)).real
    assert metrics.matrix_entropy(metrics.eigenvalues(cov)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("dim", [1, 7, 64])
def test_flat_spectrum_gives_its_dimension(dim):
    basis, _ = np.linalg.qr(np.random.default_rng(dim).normal(size=(dim, dim)))
    values = metrics.eigenvalues(2.5 * basis @ basis.T)
    for key in ("erank", "rankme", "pr", "srank"):
        assert SPECTRAL[key](values) == pytest.approx(dim, rel=1e-9), key
    assert metrics.condition_number(values) == pytest.approx(1.0, rel=1e-9)
    assert metrics.matrix_entropy(values) == pytest.approx(np.log(dim), abs=1e-9)


def test_rank_one_spectrum_gives_one():
    direction = np.random.default_rng(0).normal(size=(12, 1))
    values = metrics.eigenvalues(3.0 * direction @ direction.T)
    for key in ("erank", "rankme", "pr", "srank"):
        assert SPECTRAL[key](values) == 1.0, key
    assert metrics.matrix_entropy(values) == 0.0
    assert metrics.condition_number(values) == np.inf
    assert np.isnan(metrics.power_law_exponent(values))


def test_a_subspace_of_equal_variances_gives_its_dimension():
    basis, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(10, 10)))
    values = metrics.eigenvalues(basis[:, :4] @ basis[:, :4].T)
    for key in ("erank", "rankme", "pr", "srank"):
        assert SPECTRAL[key](values) == pytest.approx(4.0, rel=1e-9), key
    assert metrics.condition_number(values) == np.inf


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.7, 2.5])
def test_power_law_spectrum_gives_its_exponent(alpha):
    values = 7.0 * np.arange(1, 301, dtype=np.float64) ** -alpha
    assert metrics.power_law_exponent(values) == pytest.approx(alpha, rel=1e-12)
    # the fit uses ranks 6 to 100 only: the first five and the tail may do anything
    bent = values.copy()
    bent[:5] *= 10.0
    bent[100:] = bent[100] * np.linspace(1, 0.5, 200)
    assert metrics.power_law_exponent(bent) == pytest.approx(alpha, rel=1e-12)
    assert metrics.power_law_exponent(values, first=1, last=300) == pytest.approx(alpha, rel=1e-12)


def test_alpha_needs_three_ranks_above_the_floor():
    assert np.isnan(metrics.power_law_exponent(np.arange(7, 0, -1.0)))  # ranks 6 and 7 only
    assert np.isfinite(metrics.power_law_exponent(np.arange(8, 0, -1.0)))
    assert np.isnan(metrics.power_law_exponent(np.r_[np.ones(7), np.zeros(100)]))


def test_renyi_orders_give_the_ranks():
    values = metrics.eigenvalues(_random_covariance(3, dim=30))
    assert np.exp(metrics.matrix_entropy(values)) == pytest.approx(metrics.effective_rank(values), rel=1e-12)
    assert np.exp(metrics.matrix_entropy(values, order=2)) == pytest.approx(
        metrics.participation_ratio(values), rel=1e-12)
    assert np.exp(metrics.matrix_entropy(values, order=np.inf)) == pytest.approx(
        metrics.stable_rank(values), rel=1e-12)
    assert metrics.matrix_entropy([2.0, 1.0, 0.0], order=0) == pytest.approx(np.log(2))
    # S_alpha decreases with the order, so srank <= pr <= erank <= RankMe <= d
    chain = [metrics.stable_rank(values), metrics.participation_ratio(values), metrics.effective_rank(values),
             metrics.rankme(values), 30]
    assert chain == sorted(chain)


def test_floor_leaves_out_round_off_only():
    values = np.r_[1.0, 0.5, np.full(50, 1e-9)]  # what float32 round-off leaves: a few 1e-8 at most
    assert metrics.effective_rank(values) == metrics.effective_rank([1.0, 0.5])
    assert metrics.condition_number(values) == np.inf
    assert metrics.condition_number([1.0, 2e-6]) == pytest.approx(5e5)
    assert metrics.stable_rank(np.r_[1.0, np.full(50, 2e-6)]) == pytest.approx(1.0001)


@pytest.mark.parametrize("values", [np.zeros(5), np.zeros(0), -np.ones(3)])
def test_zero_spectrum_has_documented_values(values):
    for key in ("erank", "rankme", "pr", "srank"):
        assert SPECTRAL[key](values) == 0.0, key
    for key in ("cond", "entropy", "alpha"):
        assert np.isnan(SPECTRAL[key](values)), key


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_gives_nan(bad):
    values = np.r_[2.0, 1.0, bad]
    cov = np.diag(values)
    assert torch.isnan(metrics.eigenvalues(cov)).all()
    for key, function in SPECTRAL.items():
        assert np.isnan(function(values)), key
        assert np.isnan(function(metrics.eigenvalues(cov))), key


@pytest.mark.parametrize("order", [-1, "2", True, np.nan])
def test_entropy_order_is_checked(order):
    with pytest.raises(ValueError, match="order"):
        metrics.matrix_entropy([1.0, 1.0], order=order)


@pytest.mark.parametrize("first, last", [(0, 10), (10, 10), (5, 2), (1.5, 10), (True, 10)])
def test_alpha_range_is_checked(first, last):
    with pytest.raises(ValueError, match="first and last"):
        metrics.power_law_exponent(np.ones(20), first=first, last=last)
