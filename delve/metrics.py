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
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Union

import numpy as np
import torch

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
    """
    values = torch.linalg.eigvalsh(_as_float64(cov))
    return values.flip(0).clamp_min(0.0)


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
