"""TorchCovarianceMatrix at its default settings against numpy float64 on the same activations."""
from __future__ import annotations

import math
from typing import List

import numpy as np
import pytest
import torch
from torch import nn

from delve import _gram
from delve.adapters import AdapterOptions, check_layer_memory, conv_samples
from delve.covariance import CovarianceMemoryError, TorchCovarianceMatrix, check_memory_budget, covariance_nbytes
from delve.metrics import compute_intrinsic_dimensionality

RTOL = 1e-5


def reference_cov(rows: List[np.ndarray]) -> np.ndarray:
    data = np.concatenate([np.asarray(r, dtype=np.float64) for r in rows])
    centered = data - data.mean(axis=0)
    return centered.T @ centered / data.shape[0]


def reference_idim(cov: np.ndarray, thresh: float) -> int:
    values = np.sort(np.clip(np.linalg.eigvalsh(cov), 0.0, None))[::-1]
    shares = np.cumsum(values) / values.sum()
    return int(np.argmax(shares >= thresh * (1 - 1e-10))) + 1


def rows_of(samples: torch.Tensor) -> np.ndarray:
    """Samples as numpy float64 rows, (b, d, l) blocks transposed independently of delve."""
    array = samples.detach().to(torch.float64).numpy()
    if array.ndim == 3:
        array = np.transpose(array, (0, 2, 1)).reshape(-1, array.shape[1])
    return array


def accumulate(batches, **kwargs) -> TorchCovarianceMatrix:
    acc = TorchCovarianceMatrix(**kwargs)
    for batch in batches:
        acc.update(batch)
    return acc


def assert_matches(acc: TorchCovarianceMatrix, batches, thresholds=(0.9, 0.99), det=True) -> None:
    expected = reference_cov([rows_of(b) for b in batches])
    cov = acc.compute().numpy()
    assert acc.count == sum(rows_of(b).shape[0] for b in batches)
    np.testing.assert_allclose(np.trace(cov), np.trace(expected), rtol=RTOL)
    if det:
        np.testing.assert_allclose(np.linalg.det(cov), np.linalg.det(expected), rtol=RTOL)
    for thresh in thresholds:
        assert compute_intrinsic_dimensionality(cov, thresh) == reference_idim(expected, thresh)
    np.testing.assert_allclose(acc.mean.numpy(), np.concatenate([rows_of(b) for b in batches]).mean(0), atol=1e-6)


def linear_batches(sizes, in_features=16, out_features=8, mean=0.0, spread=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        return [mean + spread * layer(torch.randn(n, in_features, generator=generator)) for n in sizes]


# Sizes cross the staging capacity (d rows) and the fold window (16 batches) several times.
SIZES = [64] * 20 + [3, 1, 50, 7, 200, 5]


def test_linear_outputs_match_numpy():
    batches = linear_batches(SIZES)
    assert_matches(accumulate(batches), batches)


def test_large_mean_small_spread_matches_numpy():
    batches = [b.to(torch.float32) for b in linear_batches(SIZES, mean=1e4, spread=0.01)]
    assert batches[0].dtype == torch.float32
    assert_matches(accumulate(batches), batches)


@pytest.mark.parametrize("shape", [(5, 8), (500, 8), (2, 8, 3), (9000, 8), (4, 8, 2500)])
def test_far_from_zero_with_tiny_spread_on_every_path(shape):
    # Staged rows (5 x 8, 500 x 8, few conv positions) share one shift per staging buffer; a float32
    # GEMV alone puts it several standard deviations off the mean here, which the GEMM then squares.
    generator = torch.Generator().manual_seed(12)
    means = 1e4 * (1 + 0.1 * torch.rand(8, generator=generator, dtype=torch.float64))
    means = means[:, None] if len(shape) == 3 else means
    batches = [
        (torch.randn(*shape, generator=generator, dtype=torch.float64) * 1e-2 + means).float()
        for _ in range(max(2, 10240 // math.prod(shape[::2] if len(shape) == 3 else shape[:1])))
    ]
    expected = reference_cov([rows_of(b) for b in batches])
    cov = accumulate(batches).compute().numpy()
    np.testing.assert_allclose(cov, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_autocast_bfloat16_outputs_match_numpy():
    torch.manual_seed(1)
    layer = nn.Linear(12, 6)
    batches = []
    acc = TorchCovarianceMatrix()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        for n in SIZES:
            out = layer(torch.randn(n, 12))
            assert out.dtype == torch.bfloat16
            acc.update(out)
            batches.append(out)
    assert_matches(acc, batches)


def test_wide_layer_with_few_rows_per_batch():
    # 48 features, 10 rows per batch: rows are staged and folded across windows.
    batches = linear_batches([10] * 37 + [3], in_features=48, out_features=48, seed=2)
    assert_matches(accumulate(batches), batches, det=False)
    expected = reference_cov([rows_of(b) for b in batches])
    np.testing.assert_allclose(accumulate(batches).compute().numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["staged", "direct", "blocks"])
def test_wide_layers_computed_as_lower_block_triangle_match_numpy(kind):
    # 300 features: column blocks of 128, 128 and 44 on and below the diagonal, mirrored at each fold.
    generator = torch.Generator().manual_seed(11)
    mixing = torch.randn(40, 300, generator=generator)
    if kind == "blocks":
        sources = [torch.randn(2, 40, 200, generator=generator) for _ in range(18)]
        batches = [torch.einsum("bkl,kd->bdl", source, mixing) + 2.0 for source in sources]
    else:
        rows = 64 if kind == "staged" else 700
        batches = [torch.randn(rows, 40, generator=generator) @ mixing + 2.0 for _ in range(40)]
    acc = accumulate(batches)
    expected = reference_cov([rows_of(b) for b in batches])
    cov = acc.compute().numpy()
    np.testing.assert_allclose(cov, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert_matches(acc, batches, det=False)


@pytest.mark.parametrize("batch,size", [(8, 16), (2, 2)])
def test_channelwise_conv_outputs_match_numpy(batch, size):
    # (8, 16): many positions per channel (one GEMM over channels); (2, 2): fewer rows than channels.
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 10, 3, padding=1)
    with torch.no_grad():
        batches = [conv_samples(conv, conv(torch.randn(batch, 3, size, size)), AdapterOptions()) for _ in range(20)]
    assert batches[0].ndim == 3
    assert_matches(accumulate(batches), batches)


def test_float64_outputs_match_numpy():
    batches = [b.to(torch.float64) * 1e3 + 7 for b in linear_batches(SIZES, seed=4)]
    acc = accumulate(batches)
    expected = reference_cov([rows_of(b) for b in batches])
    np.testing.assert_allclose(acc.compute().numpy(), expected, rtol=1e-12, atol=1e-9)


def test_float32_then_float64_batches():
    batches = linear_batches([30] * 5, seed=5)
    mixed = [b if i % 2 else b.double() for i, b in enumerate(batches)]
    assert_matches(accumulate(mixed), mixed)


def test_known_intrinsic_dimensionality():
    # 5 independent directions of variance >= 0.25 inside 20 features: idim is 5 by construction.
    generator = torch.Generator().manual_seed(6)
    basis = torch.linalg.qr(torch.randn(20, 5, generator=generator))[0].T
    scales = torch.tensor([2.0, 1.5, 1.0, 0.7, 0.5])
    acc = TorchCovarianceMatrix()
    for _ in range(30):
        acc.update((torch.randn(64, 5, generator=generator) * scales) @ basis + 3.0)
    assert compute_intrinsic_dimensionality(acc.compute(), 0.999) == 5
    assert compute_intrinsic_dimensionality(acc.compute(), 0.6) == 2  # 4 / 7.99 < 0.6 <= 6.25 / 7.99


def test_staged_and_direct_batches_interleaved():
    # 24 features: batches below 24 rows are staged, larger ones go straight to a GEMM.
    batches = linear_batches([5, 30, 7, 7, 100, 1, 23, 24, 2] * 4, in_features=24, out_features=24, seed=7)
    assert_matches(accumulate(batches), batches, det=False)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("shape", [(64, 8), (4, 8), (4, 8, 16)])
def test_nonfinite_or_overflowing_batches_are_skipped(bad_value, shape):
    generator = torch.Generator().manual_seed(8)
    good = [torch.randn(*shape, generator=generator) for _ in range(6)]
    bad = torch.randn(*shape, generator=generator)
    bad.view(-1)[3] = bad_value
    acc = TorchCovarianceMatrix()
    for i, batch in enumerate(good):
        acc.update(batch)
        if i in (1, 4):
            acc.update(bad)
    assert acc.num_skipped_batches == 2
    assert_matches(acc, good, det=False)


def test_merge_and_state_dict_round_trip():
    batches = linear_batches(SIZES, seed=9)
    first, second = accumulate(batches[:13]), accumulate(batches[13:])
    first.merge(second)
    assert_matches(first, batches)
    restored = TorchCovarianceMatrix()
    restored.load_state_dict(first.state_dict())
    assert_matches(restored, batches)
    restored.update(batches[0])
    assert_matches(restored, batches + batches[:1])


def test_reset_forgets_everything():
    batches = linear_batches(SIZES, seed=10)
    acc = accumulate(batches[:5])
    acc.reset()
    assert acc.count == 0
    for batch in batches[5:]:
        acc.update(batch)
    assert_matches(acc, batches[5:])


def test_inference_mode_then_training_updates():
    batches = linear_batches([20] * 6, seed=11)
    acc = TorchCovarianceMatrix()
    with torch.inference_mode():
        acc.update(batches[0])
    for batch in batches[1:3]:
        acc.update(batch.requires_grad_())
    with torch.inference_mode():
        acc.update(batches[3])
    for batch in batches[4:]:
        acc.update(batch)
    assert_matches(acc, batches)


def test_compute_before_update_raises():
    with pytest.raises(RuntimeError, match="before any update"):
        TorchCovarianceMatrix().compute()


def test_mismatched_dimension_raises():
    acc = accumulate([torch.randn(5, 3)])
    with pytest.raises(ValueError, match="4 features"):
        acc.update(torch.randn(5, 4))


def test_memory_budget_names_layer_and_size():
    assert covariance_nbytes(100) >= 100 * 100 * 8
    assert check_memory_budget("features-0", 100, None) == covariance_nbytes(100)
    with pytest.raises(CovarianceMemoryError, match=r"'features-0'.*65536 features.*64 GiB.*memory_budget"):
        check_memory_budget("features-0", 65536, memory_budget=2**30)
    assert issubclass(CovarianceMemoryError, ValueError)


def test_memory_budget_checked_when_first_batch_fixes_dimension():
    acc = TorchCovarianceMatrix(memory_budget=100_000, name="conv1")
    with pytest.raises(CovarianceMemoryError, match="'conv1' has 64 features"):
        acc.update(torch.randn(4, 64))
    assert not acc.is_initialized
    small = TorchCovarianceMatrix(memory_budget=100_000, name="fc")
    small.update(torch.randn(4, 8))
    assert small.count == 4


def test_layer_memory_from_module_and_options():
    linear = nn.Linear(10, 300)
    assert check_layer_memory("fc", linear, AdapterOptions(), None) == covariance_nbytes(300)
    with pytest.raises(ValueError, match="'fc' has 300 features"):
        check_layer_memory("fc", linear, AdapterOptions(), memory_budget=covariance_nbytes(300) - 1)
    conv = nn.Conv2d(3, 64, 3)
    assert check_layer_memory("conv", conv, AdapterOptions(), 2**30) == covariance_nbytes(64)
    # flatten: size unknown before an input; known afterwards (64 channels x 30 x 30).
    flatten = AdapterOptions(conv_method="flatten")
    assert check_layer_memory("conv", conv, flatten, 2**30) is None
    samples = conv_samples(conv, conv(torch.randn(2, 3, 32, 32)), flatten)
    with pytest.raises(ValueError, match="'conv' has 57600 features"):
        check_layer_memory("conv", conv, flatten, 2**30, dim=samples.shape[1])


@pytest.fixture(params=["onednn", "addmm"])
def gemm(request, monkeypatch):
    """Both Gram kernels: oneDNN's inner product (where torch has it) and addmm."""
    if request.param == "addmm":
        monkeypatch.setattr(_gram, "_inner_product", None)
        monkeypatch.setattr(_gram, "_checked", True)
    elif not _gram.uses_inner_product(torch.device("cpu"), torch.float32, 64, 1 << 14):
        pytest.skip("torch has no oneDNN inner product here")
    return request.param


@pytest.mark.parametrize("kind", ["staged", "direct", "blocks"])
def test_gemm_kernels_match_numpy(kind, gemm):
    # 64 features: every product here is large enough (>= 2^20 multiply-adds) to go to oneDNN when it is on.
    generator = torch.Generator().manual_seed(13)
    mixing = torch.randn(24, 64, generator=generator)
    if kind == "blocks":
        batches = [torch.einsum("bkl,kd->bdl", torch.randn(4, 24, 300, generator=generator), mixing) + 30.0]
        batches = batches * 3 + [torch.einsum("bkl,kd->bdl", torch.randn(2, 24, 300, generator=generator), mixing)]
    else:
        rows = 40 if kind == "staged" else 1100  # staged: fewer rows than features
        batches = [torch.randn(rows, 24, generator=generator) @ mixing + 30.0 for _ in range(30 if rows < 64 else 18)]
    assert _gram.uses_inner_product(torch.device("cpu"), torch.float32, 64, 1024) == (gemm == "onednn")
    acc = accumulate(batches)
    expected = reference_cov([rows_of(b) for b in batches])
    np.testing.assert_allclose(acc.compute().numpy(), expected, rtol=0, atol=RTOL * np.abs(expected).max())
    assert_matches(acc, batches, det=False)


@pytest.mark.parametrize("shape", [(4096, 8), (16, 8, 256)])
def test_shift_from_a_leading_eighth_far_from_the_batch_mean(shape):
    # The leading eighth of each batch sits sqrt(7) standard deviations off the batch mean (the worst
    # case of any eighth), everything 1e4 from zero with spread 1: the shift it gives is still exact.
    generator = torch.Generator().manual_seed(14)
    batches = []
    for _ in range(6):
        x = torch.randn(*shape, generator=generator, dtype=torch.float64)
        lead = shape[0] // 8
        x[:lead] += math.sqrt(7.0) * 3.0
        x[lead:] -= math.sqrt(7.0) * 3.0 / 7.0
        batches.append((x + 1e4).float())
    expected = reference_cov([rows_of(b) for b in batches])
    cov = accumulate(batches).compute().numpy()
    np.testing.assert_allclose(cov, expected, rtol=0, atol=RTOL * np.abs(expected).max())


def test_inner_product_that_fails_its_check_is_not_used(monkeypatch):
    # A oneDNN operator that computes something else (a torch version that changed it) is caught by the
    # one-time check on a small product; the accumulator then uses addmm and stays exact.
    monkeypatch.setattr(_gram, "_inner_product", None)
    monkeypatch.setattr(_gram, "_checked", False)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda a, b, *rest: (a @ b.T) * 1.5, raising=False)
    assert not _gram.uses_inner_product(torch.device("cpu"), torch.float32, 512, 4096)
    batches = linear_batches([600] * 4, in_features=64, out_features=64, seed=15)
    assert_matches(accumulate(batches), batches, det=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_mask_leaves_rows_out_exactly(dtype):
    # Padding rows (mask 0) must weigh nothing, also among many batches, far from zero and beside unmasked batches.
    generator = torch.Generator().manual_seed(0)
    acc = TorchCovarianceMatrix()
    kept = []
    for step in range(20):
        x = (1e3 + torch.randn(37, 24, generator=generator, dtype=torch.float64)).to(dtype)
        if step % 3 == 0:
            acc.update(x)
            kept.append(x)
            continue
        mask = torch.rand(37, generator=generator) < 0.6
        x[~mask] = 1e6 if step % 2 else float("nan")  # padding far off, or NaN (a fully masked attention row)
        acc.update(x, row_mask=mask.long())
        kept.append(x[mask])
    rows = torch.cat(kept).to(torch.float64).numpy()
    expected = np.cov(rows.T, bias=True)
    tolerance = 1e-9 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(acc.compute().numpy(), expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())
    assert acc.count == len(rows)
    with pytest.raises(ValueError, match="row_mask"):
        acc.update(torch.randn(4, 24), row_mask=torch.ones(3))


@pytest.mark.parametrize("dim", [1, 255, 256, 600])
def test_symmetrize_tiles_equal_the_mean_with_the_transpose(dim: int) -> None:
    matrix = torch.randn(dim, dim, dtype=torch.float64)
    expected = (matrix.numpy() + matrix.numpy().T) / 2.0
    result = _gram.symmetrize_(matrix)
    assert result is matrix
    np.testing.assert_array_equal(result.numpy(), expected)
