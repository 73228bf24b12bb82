"""Correctness of the performance settings: row sampling, no host sync, eigenvalues of many layers at once.

Timings live in benchmarks/overhead.py, not here.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from delve.covariance import DEFAULT_SAMPLE_ROWS, SAMPLE_ROWS_PER_FEATURE, TorchCovarianceMatrix, resolve_sample_rows
from delve.metrics import SHARE_TOLERANCE, eigenvalues, eigenvalues_many, intrinsic_dimensionality_from_eigenvalues


def batches_with_distinct_means(dim: int, seed: int = 0):
    """Eight batches of 40 rows and a last one of 25 whose mean is far off: weighting matters."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator)
    batches = [torch.randn(40, dim, generator=generator) @ mixing + i * 0.3 for i in range(8)]
    batches.append(torch.randn(25, dim, generator=generator) @ mixing + 20.0)
    return batches


def exact_moments(batches):
    rows = np.concatenate([b.numpy().astype(np.float64) for b in batches])
    return rows.mean(0), rows.T @ rows / rows.shape[0]


def sampled_moments(batches, sample_rows: int, seed: int):
    acc = TorchCovarianceMatrix(sample_rows=sample_rows, seed=seed)
    for batch in batches:
        acc.update(batch)
    return acc.mean.numpy().copy(), acc.fix(center=False).numpy(), acc.count


def assert_unbiased(estimates: np.ndarray, exact: np.ndarray, sigmas: float = 4.5) -> None:
    average = estimates.mean(0)
    standard_error = estimates.std(0, ddof=1) / np.sqrt(len(estimates))
    assert np.all(np.abs(average - exact) <= sigmas * standard_error + 1e-9), np.max(
        np.abs(average - exact) / (standard_error + 1e-12)
    )


@pytest.mark.parametrize("dim,sample_rows", [(3, 6), (8, 4)])
def test_sampling_gives_unbiased_mean_and_second_moment(dim, sample_rows):
    # (3, 6): each sample goes straight to a GEMM; (8, 4): fewer rows than features, staged.
    batches = batches_with_distinct_means(dim)
    exact_mean, exact_second = exact_moments(batches)
    runs = [sampled_moments(batches, sample_rows, seed) for seed in range(200)]
    assert all(count == 8 * 40 + 25 for _, _, count in runs)
    means = np.stack([mean for mean, _, _ in runs])
    seconds = np.stack([second for _, second, _ in runs])
    assert_unbiased(means, exact_mean)
    assert_unbiased(seconds, exact_second)
    # Power: kept rows averaged without the n / m weights would expect the mean of batch means.
    unweighted = np.mean([b.numpy().astype(np.float64).mean(0) for b in batches], axis=0)
    assert np.min(np.abs(unweighted - exact_mean) / (means.std(0, ddof=1) / np.sqrt(len(means)))) > 8


def test_sampling_convolution_positions_is_unbiased():
    # Blocks (b, d, l): features encode the block and the position, so a wrong gather shows.
    blocks = torch.stack(
        [torch.stack([torch.full((36,), float(b)), torch.arange(36.0), torch.arange(36.0) ** 0.5 * b]) for b in range(4)]
    )
    rows = blocks.permute(0, 2, 1).reshape(-1, 3).numpy().astype(np.float64)
    estimates = []
    for seed in range(200):
        acc = TorchCovarianceMatrix(sample_rows=16, seed=seed)
        acc.update(blocks)
        acc.update(blocks[:2])
        estimates.append(np.concatenate([acc.mean.numpy(), acc.fix(center=False).numpy().ravel()]))
        assert acc.count == 4 * 36 + 2 * 36
    both = np.concatenate([rows, rows[: 2 * 36]])
    exact = np.concatenate([both.mean(0), (both.T @ both / len(both)).ravel()])
    assert_unbiased(np.stack(estimates), exact)


def test_sample_rows_at_least_the_batch_is_exact():
    batches = batches_with_distinct_means(5, seed=1)
    full, sampled = TorchCovarianceMatrix(), TorchCovarianceMatrix(sample_rows=40)
    for batch in batches:
        full.update(batch)
        sampled.update(batch)
    torch.testing.assert_close(sampled.compute(), full.compute(), rtol=0, atol=0)
    rows = np.concatenate([b.numpy().astype(np.float64) for b in batches])
    np.testing.assert_allclose(sampled.compute().numpy(), np.cov(rows.T, bias=True), rtol=1e-5, atol=1e-6)


def test_sampling_is_reproducible_and_leaves_global_rng_alone():
    batches = batches_with_distinct_means(4, seed=2)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = sampled_moments(batches, 5, seed=7)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    again = sampled_moments(batches, 5, seed=7)
    other = sampled_moments(batches, 5, seed=8)
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


@pytest.mark.parametrize(
    "kwargs,parameter",
    [
        ({"sample_rows": 1}, "sample_rows"),
        ({"sample_rows": 0}, "sample_rows"),
        ({"sample_rows": "all"}, "sample_rows"),
        ({"sample_rows": 2.5}, "sample_rows"),
        ({"seed": -1}, "seed"),
        ({"memory_budget": 0}, "memory_budget"),
    ],
)
def test_invalid_settings_are_refused_at_construction(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        TorchCovarianceMatrix(**kwargs)


SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("sample_rows", [None, 8])
def test_update_never_reads_tensor_values_on_the_host(monkeypatch, sample_rows):
    def forbidden(*args, **kwargs):
        raise AssertionError("update() read a tensor value on the host")

    batches = [
        torch.randn(64, 16),  # straight to a GEMM
        torch.randn(4, 16),  # staged
        torch.randn(3, 16, 25),  # channelwise blocks
        torch.randn(2, 16, 3),  # blocks with fewer positions than channels
        torch.full((5, 16), float("nan")),  # skipped
    ]
    acc = TorchCovarianceMatrix(sample_rows=sample_rows)
    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for batch in batches * 3:
        acc.update(batch)
    monkeypatch.undo()
    assert acc.num_skipped_batches == 3
    assert torch.isfinite(acc.compute()).all()


def test_resolve_sample_rows():
    assert resolve_sample_rows(None) is None
    assert resolve_sample_rows(False) is None
    assert resolve_sample_rows(True) is True
    assert resolve_sample_rows(64) == 64
    # True: rows in proportion to the width, never fewer than DEFAULT_SAMPLE_ROWS; an int stays as it is.
    assert resolve_sample_rows(True, dim=3) == DEFAULT_SAMPLE_ROWS
    assert resolve_sample_rows(True, dim=500) == SAMPLE_ROWS_PER_FEATURE * 500
    assert resolve_sample_rows(64, dim=500) == 64
    assert resolve_sample_rows(None, dim=500) is None
    for bad in (0, 1, -3, 2.5, "all"):
        with pytest.raises(ValueError, match="sample_rows must be None"):
            resolve_sample_rows(bad)


@pytest.mark.parametrize("dim,rows", [(4, 100), (40, 1000), (40, 100)])
def test_width_rule_keeps_rows_in_proportion_to_the_width(dim, rows):
    # sample_rows=True keeps max(32, 2 d) rows of each batch, all of them when the batch has fewer.
    kept = min(rows, max(DEFAULT_SAMPLE_ROWS, SAMPLE_ROWS_PER_FEATURE * dim))
    generator = torch.Generator().manual_seed(dim + rows)
    batch = torch.randn(rows, dim, generator=generator)
    calls = []
    acc = TorchCovarianceMatrix(sample_rows=True)
    original = acc._sample_index
    acc._sample_index = lambda x, num_rows, rows_kept: calls.append(rows_kept) or original(x, num_rows, rows_kept)
    acc.update(batch)
    assert calls == ([kept] if kept < rows else [])
    assert acc.count == rows
    if kept == rows:  # nothing sampled: exact
        data = batch.numpy().astype(np.float64)
        np.testing.assert_allclose(acc.compute().numpy(), np.cov(data.T, bias=True), rtol=1e-5, atol=1e-6)


def spectra(dim: int, seed: int):
    """Covariances of known spectra rotated at random: flat, power-law, low-rank, and one from data."""
    generator = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0]
    index = torch.arange(1, dim + 1, dtype=torch.float64)
    values = {
        "flat": 1.0 + 0.01 * torch.rand(dim, generator=generator, dtype=torch.float64),
        "power": 1.0 / index,
        "low rank": torch.where(index <= dim // 10, 1.0, 1e-9),
    }
    matrices = {name: (rotation * v) @ rotation.T for name, v in values.items()}
    data = torch.randn(dim, 2 * dim, generator=generator, dtype=torch.float64) * index[:, None] ** -0.5
    matrices["data"] = data @ data.T / (2 * dim)
    return {name: 0.5 * (m + m.T) for name, m in matrices.items()}


def numpy_idim(cov: torch.Tensor, thresh: float) -> int:
    values = np.sort(np.clip(np.linalg.eigvalsh(cov.numpy()), 0.0, None))[::-1]
    shares = np.cumsum(values) / values.sum()
    return int(np.argmax(shares >= thresh - SHARE_TOLERANCE)) + 1


@pytest.mark.parametrize("thresh", [0.9, 0.99, 0.999])
def test_eigenvalues_many_give_float64_intrinsic_dimensionality(thresh, two_threads):
    covs = list(spectra(96, seed=0).values()) + list(spectra(40, seed=1).values())
    for values, cov in zip(eigenvalues_many(covs, thresh=thresh), covs):
        assert values.dtype == torch.float64 and values.shape == (cov.shape[0],)
        assert torch.all(values[:-1] >= values[1:]) and torch.all(values >= 0)
        assert intrinsic_dimensionality_from_eigenvalues(values, thresh) == numpy_idim(cov, thresh)
        np.testing.assert_allclose(values.sum().item(), np.trace(cov.numpy()), rtol=1e-5)
    assert torch.get_num_threads() == 2


@pytest.fixture
def two_threads():
    """Two intra-op threads (the test session runs with one), so that the CPU thread pool runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_eigenvalues_many_without_threshold_are_float64_on_every_path(two_threads):
    covs = list(spectra(64, seed=2).values()) + [torch.eye(3, dtype=torch.float64)]
    pooled = eigenvalues_many(covs)
    assert torch.get_num_threads() == 2  # restored after the pool's single-threaded workers
    torch.set_num_threads(1)  # no pool
    serial = eigenvalues_many(covs)
    for pool_values, serial_values, cov in zip(pooled, serial, covs):
        expected = np.sort(np.clip(np.linalg.eigvalsh(cov.numpy()), 0.0, None))[::-1].copy()
        for values in (pool_values, serial_values):
            np.testing.assert_allclose(values.numpy(), expected, rtol=1e-10, atol=1e-12 * expected[0])


def test_float64_only_where_float32_changes_the_intrinsic_dimensionality():
    # Put the threshold between the float32 and the float64 cumulative share of one direction: float32
    # alone then gives another intrinsic dimensionality; eigenvalues_many must notice and use float64.
    cov = spectra(96, seed=3)["power"]
    exact = eigenvalues(cov)
    rough = torch.linalg.eigvalsh(cov.float()).double().flip(0).clamp_min(0.0)
    exact_shares, rough_shares = exact.cumsum(0) / exact.sum(), rough.cumsum(0) / rough.sum()
    gaps = (rough_shares - exact_shares)[:-1]
    k = int(torch.argmax(gaps.abs()))
    assert gaps[k].abs() > 0
    thresh = float((exact_shares[k] + rough_shares[k]) / 2) + SHARE_TOLERANCE
    assert intrinsic_dimensionality_from_eigenvalues(rough, thresh) != intrinsic_dimensionality_from_eigenvalues(
        exact, thresh
    )
    (values,) = eigenvalues_many([cov], thresh=thresh)
    assert intrinsic_dimensionality_from_eigenvalues(values, thresh) == intrinsic_dimensionality_from_eigenvalues(
        exact, thresh
    )
    torch.testing.assert_close(values, exact)
