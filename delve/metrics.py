"""Pure functions from a covariance matrix (or its eigenvalues) to delve's statistics.

Every function takes a square covariance matrix as a :class:`torch.Tensor` or a
:class:`numpy.ndarray` and works in float64. Nothing here holds state or does I/O.

The intrinsic dimensionality at threshold :math:`\\delta` is the smallest :math:`k`
whose :math:`k` largest eigenvalues explain at least :math:`\\delta` of the total
variance,

.. math::

    \\operatorname{idim}_\\delta(Q) = \\min\\Big\\{k : \\sum_{i=1}^{k}\\lambda_i
    \\ge \\delta \\sum_{i=1}^{d}\\lambda_i\\Big\\},

and the saturation is :math:`\\operatorname{idim}_\\delta(Q) / d`.

The spectral statistics of :mod:`delve.spectral` (effective rank, RankMe,
participation ratio, stable rank, condition number, matrix entropy, power-law
exponent), functions of the eigenvalues alone, are importable from here too.
"""
from __future__ import annotations

import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch

from delve.spectral import (  # noqa: F401  (re-exported: importable from delve.metrics as documented)
    SPECTRUM_FLOOR,
    condition_number,
    effective_rank,
    matrix_entropy,
    participation_ratio,
    power_law_exponent,
    rankme,
    stable_rank,
)

MatrixLike = Union[torch.Tensor, np.ndarray]

#: A cumulative share within this distance below the threshold counts as reaching
#: it: about the resolution of float32 activations, so that round-off never flips
#: diag(.5, .4, .1) at .9 from 2 to 3, nor makes noise directions count at 1.0.
SHARE_TOLERANCE = 1e-6


def _as_float64(cov: MatrixLike) -> torch.Tensor:
    matrix = torch.as_tensor(cov)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"cov must be a square matrix, got shape {tuple(matrix.shape)}")
    return matrix.to(torch.float64)


def check_share(parameter: str, value: Any) -> float:
    """Check a share of the variance given to a constructor: a number in ``(0, 1]``.

    Parameters
    ----------
    parameter : str
        Name of the parameter, for the error message.
    value : numbers.Real
        The value given (Python or numpy int or float).

    Returns
    -------
    float
        ``value`` as a float.

    Raises
    ------
    ValueError
        If ``value`` is not a real number in ``(0, 1]`` (``bool`` is refused).

    Examples
    --------
    >>> check_share("thresh", 0.99)
    0.99
    >>> check_share("thresh", 1.5)
    Traceback (most recent call last):
    ...
    ValueError: thresh must be a number in (0, 1], got 1.5
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"{parameter} must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_threshold(thresh: float) -> None:
    if not 0.0 < thresh <= 1.0:
        raise ValueError(f"thresh must lie in (0, 1], got {thresh!r}")


def eigenvalues(cov: MatrixLike) -> torch.Tensor:
    """Eigenvalues of a symmetric covariance matrix, largest first, negatives clipped to 0.

    Parameters
    ----------
    cov : torch.Tensor or numpy.ndarray
        Square symmetric matrix of shape ``(d, d)``.

    Returns
    -------
    torch.Tensor
        Float64 vector of length ``d`` sorted in descending order.

    Examples
    --------
    >>> eigenvalues(torch.diag(torch.tensor([0.1, 0.5, 0.4])))
    tensor([0.5000, 0.4000, 0.1000], dtype=torch.float64)
    >>> eigenvalues(torch.full((2, 2), float("nan")))
    tensor([nan, nan], dtype=torch.float64)
    """
    matrix = _as_float64(cov)
    if not bool(torch.isfinite(matrix).all()):
        # LAPACK answers zeros for a NaN matrix; NaN says what the statistics can make of it.
        return torch.full(matrix.shape[:1], math.nan, dtype=torch.float64, device=matrix.device)
    return torch.linalg.eigvalsh(matrix).flip(0).clamp_min(0.0)


#: Share-of-variance error of float32 eigenvalues, in units of ``eps32 sqrt(d) ||Q||_F / trace(Q)``:
#: eight times the largest measured on spectra from flat to low-rank, 128 to 2048 wide.
FLOAT32_SHARE_ERROR = 8.0


def eigenvalues_many(covs: Sequence[MatrixLike], thresh: Optional[float] = None) -> List[torch.Tensor]:
    """Eigenvalues of many covariance matrices, each as :func:`eigenvalues` gives it, in parallel.

    On the CPU the matrices are decomposed side by side, largest first, one per
    thread (as many as torch's intra-op threads, which are set to one meanwhile
    and restored after): LAPACK's eigensolvers gain little from several
    threads on one matrix, and a busy machine makes them lose. On a GPU,
    matrices of one size go in one batched call.

    With ``thresh``, each matrix is decomposed in float32 (about 2.5 times
    faster) and again in float64 only where float32 could change the
    intrinsic dimensionality at ``thresh``: where a cumulative share of the
    variance lies closer to the threshold than the float32 error bound
    (:data:`FLOAT32_SHARE_ERROR`). The saturation and intrinsic
    dimensionality at ``thresh`` are then those of float64; other statistics
    of the eigenvalues (their sum) are float32-accurate.

    Parameters
    ----------
    covs : sequence of torch.Tensor or numpy.ndarray
        Square symmetric matrices, of any sizes.
    thresh : float, optional
        The share of the variance whose intrinsic dimensionality must be exact.
        ``None`` (default): every matrix in float64.

    Returns
    -------
    list of torch.Tensor
        Float64 eigenvalues of each matrix, largest first, negatives clipped to
        0; NaN for a matrix that is not finite.

    Examples
    --------
    >>> values = eigenvalues_many([torch.diag(torch.tensor([1.0, 3.0])), torch.eye(3)], thresh=0.99)
    >>> [v.tolist() for v in values]
    [[3.0, 1.0], [1.0, 1.0, 1.0]]
    """
    matrices = [_as_float64(cov) for cov in covs]
    if thresh is not None:
        _check_threshold(thresh)
    results: List[Optional[torch.Tensor]] = [None] * len(matrices)
    for index, matrix in enumerate(matrices):
        if not bool(torch.isfinite(matrix).all()):  # as in eigenvalues(): NaN, not LAPACK's zeros
            results[index] = torch.full(matrix.shape[:1], math.nan, dtype=torch.float64, device=matrix.device)
    finite = [index for index, values in enumerate(results) if values is None]
    if thresh is not None:
        for index, values in zip(finite, _decompose([matrices[index] for index in finite], torch.float32)):
            if _float32_decides(matrices[index], values, thresh):
                results[index] = values
    again = [index for index, values in enumerate(results) if values is None]
    for index, values in zip(again, _decompose([matrices[index] for index in again], torch.float64)):
        results[index] = values
    return results  # type: ignore[return-value]


def _decompose(matrices: List[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
    """Eigenvalues (float64, largest first, clipped) of each matrix, computed in ``dtype``."""

    def values_of(matrix: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvalsh(matrix.to(dtype)).to(torch.float64).flip(-1).clamp_min(0.0)

    results: List[Optional[torch.Tensor]] = [None] * len(matrices)
    on_cpu = [index for index, matrix in enumerate(matrices) if matrix.device.type == "cpu"]
    groups: dict = {}
    for index, matrix in enumerate(matrices):
        if matrix.device.type != "cpu":
            groups.setdefault((matrix.device, matrix.shape[0]), []).append(index)
    for indices in groups.values():
        for index, values in zip(indices, values_of(torch.stack([matrices[index] for index in indices]))):
            results[index] = values
    threads = torch.get_num_threads()
    if len(on_cpu) < 2 or threads < 2:
        for index in on_cpu:
            results[index] = values_of(matrices[index])
        return results  # type: ignore[return-value]
    on_cpu.sort(key=lambda index: -matrices[index].shape[0])

    def single_threaded(index: int) -> torch.Tensor:
        # A new thread's OpenMP default is every core: LAPACK would run that many threads per worker.
        torch.set_num_threads(1)
        return values_of(matrices[index])

    try:
        with ThreadPoolExecutor(max_workers=min(threads, len(on_cpu))) as pool:
            for index, values in zip(on_cpu, pool.map(single_threaded, on_cpu)):
                results[index] = values
    finally:
        torch.set_num_threads(threads)
    return results  # type: ignore[return-value]


def _float32_decides(matrix: torch.Tensor, values: torch.Tensor, thresh: float) -> bool:
    """Whether float32 eigenvalues ``values`` of ``matrix`` give its float64 intrinsic dimensionality at ``thresh``.

    They do when the cumulative shares on both sides of the crossing lie
    farther from the threshold than the float32 error bound.
    """
    total = float(values.sum())
    if not math.isfinite(total) or total <= 0.0:
        return False
    eps = torch.finfo(torch.float32).eps
    bound = FLOAT32_SHARE_ERROR * eps * math.sqrt(matrix.shape[0]) * float(torch.linalg.matrix_norm(matrix)) / total
    shares = torch.cumsum(values, 0) / total
    level = thresh - SHARE_TOLERANCE
    crossing = int(torch.searchsorted(shares, torch.tensor([level], dtype=shares.dtype)))
    below = float(shares[crossing - 1]) if crossing > 0 else -math.inf
    above = float(shares[crossing]) if crossing < len(shares) else math.inf
    return level - below > bound and above - level > bound


def intrinsic_dimensionality_from_eigenvalues(eigvals: torch.Tensor, thresh: float = 0.99) -> int:
    """Smallest ``k`` whose ``k`` largest eigenvalues explain ``thresh`` of the variance.

    Parameters
    ----------
    eigvals : torch.Tensor
        Non-negative eigenvalues sorted in descending order (see :func:`eigenvalues`).
    thresh : float
        Share of the total variance to explain, in ``(0, 1]``.

    Returns
    -------
    int
        The intrinsic dimensionality; 0 when the total variance is 0 (a dead layer).
    """
    _check_threshold(thresh)
    values = torch.as_tensor(eigvals, dtype=torch.float64)
    total = float(values.sum())
    if not math.isfinite(total):
        raise ValueError("eigenvalues must be finite")
    if total <= 0.0:
        return 0
    shares = torch.cumsum(values, 0) / total
    reached = shares >= thresh - SHARE_TOLERANCE
    return int(torch.nonzero(reached)[0, 0]) + 1


def compute_intrinsic_dimensionality(cov: MatrixLike, thresh: float = 0.99) -> int:
    """Intrinsic dimensionality of a covariance matrix.

    Parameters
    ----------
    cov : torch.Tensor or numpy.ndarray
        Covariance matrix of shape ``(d, d)``.
    thresh : float
        Share of the total variance the kept eigendirections must explain.

    Returns
    -------
    int
        The smallest number of eigendirections that explain ``thresh`` of the
        variance; 0 for a zero matrix.

    Examples
    --------
    >>> compute_intrinsic_dimensionality(torch.diag(torch.tensor([.5, .4, .1])), thresh=.99)
    3
    >>> compute_intrinsic_dimensionality(torch.diag(torch.tensor([1., 0., 0.])))
    1
    """
    return intrinsic_dimensionality_from_eigenvalues(eigenvalues(cov), thresh)


def saturation_from_eigenvalues(eigvals: torch.Tensor, thresh: float = 0.99) -> float:
    """Intrinsic dimensionality divided by the number of eigenvalues (the feature dimension)."""
    return intrinsic_dimensionality_from_eigenvalues(eigvals, thresh) / len(eigvals)


def compute_saturation(cov: MatrixLike, thresh: float = 0.99) -> float:
    """Saturation: the share of eigendirections needed to explain ``thresh`` of the variance.

    Parameters
    ----------
    cov : torch.Tensor or numpy.ndarray
        Covariance matrix of shape ``(d, d)``.
    thresh : float
        Share of the total variance to explain.

    Returns
    -------
    float
        ``compute_intrinsic_dimensionality(cov, thresh) / d``, between 0 and 1.

    Examples
    --------
    >>> compute_saturation(torch.diag(torch.tensor([.5, .5, 0., 0.])))
    0.5
    """
    return saturation_from_eigenvalues(eigenvalues(cov), thresh)


def compute_cov_determinant(cov: MatrixLike) -> float:
    """Determinant of the covariance matrix (the generalized variance)."""
    return float(torch.linalg.det(_as_float64(cov)))


def compute_cov_trace(cov: MatrixLike) -> float:
    """Trace of the covariance matrix (the total variance)."""
    return float(torch.trace(_as_float64(cov)))


def diagonal_trace_from_eigenvalues(eigvals: torch.Tensor) -> float:
    """Sum of the (non-negative) eigenvalues, the trace of the diagonalised covariance."""
    return float(torch.as_tensor(eigvals, dtype=torch.float64).sum())


def compute_diag_trace(cov: MatrixLike) -> float:
    """Trace of the diagonalised covariance matrix: the sum of its non-negative eigenvalues.

    It equals :func:`compute_cov_trace` up to round-off and the clipping of
    eigenvalues that round-off made negative.
    """
    return diagonal_trace_from_eigenvalues(eigenvalues(cov))
